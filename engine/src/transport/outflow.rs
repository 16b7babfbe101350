//! The output backlog of a connection on the `h2` reference stack: what
//! its calls have handed h2 to send against what has reached the socket.
//! h2 bounds the data it buffers per stream in bytes, not in frames, so a
//! client that grants huge windows and never reads could make it queue
//! millions of small frames; with this, a call waits while the
//! connection's backlog is over [`HIGH`], as calls on the native stack do.
//!
//! The socket is wrapped in [`Counted`], which counts bytes written and
//! wakes the waiting calls; the calls find their connection's [`Outflow`]
//! through a task-local (a connection is one task, its calls futures in
//! it), so nothing has to be threaded through the call functions.

use crate::budget::Held;
use crate::protocol::grpc::Status;
use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes handed to h2 and not yet written above which calls wait.
pub const HIGH: u64 = 256 << 10;
/// What h2 adds on the wire to each message handed to it (a DATA frame's
/// header).
const FRAME_HEAD: u64 = 9;

tokio::task_local! {
    static OUTFLOW: Rc<Outflow>;
}

/// One connection's counts.
#[derive(Default)]
pub struct Outflow {
    handed: Cell<u64>,
    written: Cell<u64>,
    waiters: RefCell<Vec<Waker>>,
    /// `--max-buffered-bytes`, for the answers calls hold while they wait.
    limit: usize,
}

impl Outflow {
    pub fn new(limit: usize) -> Outflow {
        Outflow { limit, ..Outflow::default() }
    }

    fn backlog(&self) -> u64 {
        self.handed.get().saturating_sub(self.written.get())
    }

    /// Bytes the socket has taken so far.
    pub fn written(&self) -> u64 {
        self.written.get()
    }

    /// Whether calls wait for the socket (the backlog is at its mark).
    pub fn backed_up(&self) -> bool {
        self.backlog() >= HIGH
    }

    fn wrote(&self, n: usize) {
        let written = self.written.get() + n as u64;
        self.written.set(written);
        // The socket also carries what h2 writes of its own (headers,
        // acknowledgements): once it has written more than was handed,
        // everything handed is out.
        if written > self.handed.get() {
            self.handed.set(written);
        }
        if self.backlog() < HIGH {
            for w in self.waiters.borrow_mut().drain(..) {
                w.wake();
            }
        }
    }
}

/// Runs a connection's future with `flow` as its calls' [`Outflow`].
pub async fn scope<F: std::future::Future>(flow: Rc<Outflow>, f: F) -> F::Output {
    OUTFLOW.scope(flow, f).await
}

/// Counts an answer of `len` bytes that a call holds while it waits for
/// window, in the process-wide budget (see [`crate::budget`]), or fails
/// the call when that would pass the budget. Outside a connection (no
/// outflow in scope) nothing is counted.
pub fn hold(len: usize) -> Result<Option<Held>, Status> {
    let Ok(limit) = OUTFLOW.try_with(|f| f.limit) else { return Ok(None) };
    let mut held = Held::new(limit);
    held.grow(len)?;
    Ok(Some(held))
}

/// Waits until the current connection's backlog is under [`HIGH`], then
/// counts `len` bytes as handed to h2. Outside a connection (no outflow
/// in scope) it returns at once.
pub async fn room(len: usize) {
    let Ok(flow) = OUTFLOW.try_with(Rc::clone) else { return };
    poll_fn(|cx| {
        if flow.backlog() < HIGH {
            return Poll::Ready(());
        }
        flow.waiters.borrow_mut().push(cx.waker().clone());
        Poll::Pending
    })
    .await;
    flow.handed.set(flow.handed.get() + len as u64 + FRAME_HEAD);
}

/// A socket that counts the bytes written into its connection's
/// [`Outflow`].
pub struct Counted<T> {
    pub inner: T,
    pub flow: Rc<Outflow>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.flow.wrote(n);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backlog_counts_what_was_handed_and_not_written() {
        let f = Outflow::default();
        f.handed.set(HIGH + 100);
        assert_eq!(f.backlog(), HIGH + 100);
        f.wrote(200);
        assert_eq!(f.backlog(), HIGH - 100);
        // More written than handed (h2's own frames): nothing is behind.
        f.wrote(10 * HIGH as usize);
        assert_eq!(f.backlog(), 0);
    }
}
