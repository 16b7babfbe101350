//! One port, two HTTP versions: a connection that opens with the HTTP/2
//! client preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`, RFC 9113 §3.4) is
//! HTTP/2, anything else HTTP/1.1. The bytes read to decide are handed to
//! the chosen transport first ([`Prefixed`]).

use bytes::{Buf, BytesMut};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The HTTP/2 client connection preface.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The HTTP version a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http1,
    Http2,
}

/// Reads until the first bytes settle the version: the whole preface, or
/// the first byte that differs from it. Returns what was read with it;
/// None when the client closed (or failed) before saying anything.
pub async fn sniff<T: AsyncRead + Unpin>(io: &mut T) -> Option<(Version, BytesMut)> {
    let mut head = BytesMut::with_capacity(PREFACE.len());
    loop {
        let n = io.read_buf(&mut head).await.ok()?;
        if n == 0 {
            return None;
        }
        let seen = head.len().min(PREFACE.len());
        if head[..seen] != PREFACE[..seen] {
            return Some((Version::Http1, head));
        }
        if seen == PREFACE.len() {
            return Some((Version::Http2, head));
        }
    }
}

/// A socket whose first bytes were already read: they are read again
/// first.
pub struct Prefixed<T> {
    head: BytesMut,
    io: T,
}

impl<T> Prefixed<T> {
    pub fn new(head: BytesMut, io: T) -> Self {
        Prefixed { head, io }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.head.is_empty() {
            let n = self.head.len().min(buf.remaining());
            buf.put_slice(&self.head[..n]);
            self.head.advance(n);
            if self.head.is_empty() {
                self.head = BytesMut::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_preface_picks_http2_and_anything_else_http1() {
        let mut h2: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00";
        let (v, head) = sniff(&mut h2).await.unwrap();
        assert_eq!(v, Version::Http2);
        assert_eq!(&head[..24], PREFACE);
        let mut h1: &[u8] = b"POST /a HTTP/1.1\r\n";
        assert_eq!(sniff(&mut h1).await.unwrap().0, Version::Http1);
        let mut short: &[u8] = b"PRI * HT";
        assert!(sniff(&mut short).await.is_none());
        let mut prefixed = Prefixed::new(BytesMut::from(&b"ab"[..]), &b"cd"[..]);
        let mut all = Vec::new();
        prefixed.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"abcd");
    }
}
