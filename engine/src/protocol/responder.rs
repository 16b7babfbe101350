//! A call's answer in a protocol's framing, over any transport that can
//! send an HTTP response ([`Sink`]): the [`Outbound`] side of
//! [`crate::call::drive`]. gRPC sends HTTP trailers; gRPC-Web and Connect
//! streaming end the body with their own frame; Connect unary holds the
//! message until the status is known, then sends the whole response.

use super::compression::{compress, compress_framed, Encoding};
use super::{connect, stream_end, stream_head, without_messages, Dialect, Head, Protocol, Response};
use crate::call::drive::{Gone, Halt, Outbound};
use crate::served::Prepared;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use std::future::Future;

/// An HTTP response as a transport sends it.
pub trait Sink {
    /// The status and headers; called once, first.
    fn head(&mut self, head: Head);
    /// Body bytes.
    fn data(&mut self, data: Bytes);
    /// Resolves once `len` more body bytes may be queued; Gone when the
    /// client has left.
    fn ready(&mut self, len: usize) -> impl Future<Output = Result<(), Gone>>;
    /// Ends the response, with HTTP trailers when given.
    fn finish(&mut self, trailers: Option<HeaderMap>);
    /// Ends the response abruptly (the stream reset, or the connection
    /// closed for HTTP/1.1).
    fn abort(&mut self);
    /// Resets the stream with this HTTP/2 error code (HTTP/1.1: aborts).
    fn reset(&mut self, code: u32) {
        let _ = code;
        self.abort();
    }
}

/// Frames a call's answer for `dialect` onto a [`Sink`].
pub struct Responder<S: Sink> {
    pub dialect: Dialect,
    pub sink: S,
    head_sent: bool,
    ended: bool,
    /// Connect unary: the initial metadata and the message, sent with the
    /// end.
    deferred: Option<(HeaderMap, Option<Bytes>)>,
    /// Response messages go out gzip-compressed (the client accepts it and
    /// `--compress-responses` allows it).
    pub compress: bool,
}

impl<S: Sink> Responder<S> {
    pub fn new(dialect: Dialect, sink: S) -> Self {
        Responder { dialect, sink, head_sent: false, ended: false, deferred: None, compress: false }
    }

    /// Whether the response has ended.
    pub fn ended(&self) -> bool {
        self.ended
    }

    fn whole(&mut self, r: Response) {
        self.head_sent = true;
        self.ended = true;
        self.sink.head(r.head);
        if !r.body.is_empty() {
            self.sink.data(r.body);
        }
        self.sink.finish(None);
    }

    /// Body bytes of a streamed response: base64 in gRPC-Web text mode,
    /// each piece encoded on its own (the protocol lets padding fall at
    /// any flush).
    fn body(&mut self, b: Bytes) {
        if self.dialect.protocol == Protocol::GrpcWebText {
            let mut t = bytes::BytesMut::with_capacity(b.len().div_ceil(3) * 4);
            super::web_text::encode(&b, &mut t);
            return self.sink.data(t.freeze());
        }
        self.sink.data(b)
    }

    /// Answers a call refused before it started (no head sent yet).
    pub fn refuse(&mut self, p: &Prepared) {
        if !self.ended {
            let r = without_messages(self.dialect, &p.headers, &p.trailers);
            self.whole(r);
        }
    }
}

impl<S: Sink> Outbound for Responder<S> {
    fn head(&mut self, p: &Prepared) {
        if self.head_sent || self.ended {
            return;
        }
        match self.dialect.protocol {
            Protocol::Connect => {
                self.deferred = Some((p.headers.clone(), None));
                return;
            }
            Protocol::Grpc => {
                let mut head = Head { status: 200, headers: p.headers.clone() };
                if self.compress {
                    head.headers.insert("grpc-encoding", HeaderValue::from_static("gzip"));
                }
                self.sink.head(head)
            }
            _ => {
                let mut head = stream_head(self.dialect, &p.headers);
                if self.compress {
                    let name = match self.dialect.protocol {
                        Protocol::ConnectStream => "connect-content-encoding",
                        _ => "grpc-encoding",
                    };
                    head.headers.insert(name, HeaderValue::from_static("gzip"));
                }
                self.sink.head(head)
            }
        }
        self.head_sent = true;
    }

    async fn ready(&mut self, len: usize) -> Result<(), Halt> {
        if self.deferred.is_some() {
            // Connect unary: the message waits for the end, whatever the
            // window.
            return Ok(());
        }
        Ok(self.sink.ready(len).await?)
    }

    fn message(&mut self, framed: Bytes) {
        if self.ended {
            return;
        }
        match (&mut self.deferred, self.dialect.protocol) {
            (Some((_, message)), Protocol::Connect) => *message = Some(framed.slice(5.min(framed.len())..)),
            _ if self.compress => self.body(compress_framed(Encoding::Gzip, framed)),
            _ => self.body(framed),
        }
    }

    fn end(&mut self, p: &Prepared) {
        if self.ended {
            return;
        }
        if self.dialect.protocol == Protocol::Connect {
            let (headers, message) = self.deferred.take().unwrap_or_default();
            let headers = if message.is_some() { headers } else { p.headers.clone() };
            let mut r = connect::unary(&headers, &p.trailers, message, self.dialect.codec);
            if self.compress && r.head.status == 200 && !r.body.is_empty() {
                r.body = compress(Encoding::Gzip, &r.body);
                r.head.headers.insert(http::header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            }
            return self.whole(r);
        }
        if !self.head_sent {
            let r = without_messages(self.dialect, &p.headers, &p.trailers);
            return self.whole(r);
        }
        self.ended = true;
        match stream_end(self.dialect, &p.trailers) {
            Some(end) => {
                self.body(end);
                self.sink.finish(None);
            }
            None => self.sink.finish(Some(p.trailers.clone())),
        }
    }

    fn abort(&mut self) {
        self.ended = true;
        self.sink.abort();
    }

    /// Only a stream reset reaches these transports (the h2 crate keeps
    /// its connection to itself; HTTP/1.1 has no streams): every other
    /// transport fault resets the stream too (or aborts the response).
    fn transport(&mut self, fault: &wirestub_plan::TransportFault) -> Option<wirestub_plan::TransportFault> {
        use wirestub_plan::{Transport, TransportFault};
        self.ended = true;
        let code = match fault.action {
            Transport::Reset(code) => code,
            _ => 2,
        };
        self.sink.reset(code);
        Some(TransportFault { action: Transport::Reset(code), ..*fault })
    }
}
