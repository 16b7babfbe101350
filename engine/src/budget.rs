//! The process-wide budget of request bytes held for calls whose request
//! is still arriving ([`crate::Config::max_buffered`]), counted in
//! [`crate::observe::metrics::BUFFERED_REQUEST_BYTES`] by both HTTP/2 stacks: the
//! native stack per connection ([`Reported`], brought up to date a few
//! times per read), the `h2` stack per call ([`Held`]).

use crate::observe::metrics::BUFFERED_REQUEST_BYTES;
use crate::protocol::grpc::{self, Status};
use std::sync::atomic::Ordering;

/// What an open call counts for besides the bytes it holds, on the native
/// stack: its stream's state (measured: about 1.3 KB of resident memory
/// per idle open call).
pub const CALL_COST: usize = 1536;
/// The same on the `h2` stack, whose streams cost more (measured: about
/// 4 KB per idle open call).
pub const H2_CALL_COST: usize = 4096;

/// One connection's part of the count: what it last reported.
#[derive(Debug, Default)]
pub struct Reported(usize);

impl Reported {
    /// Reports that the connection now holds `buffered` bytes.
    pub fn sync(&mut self, buffered: usize) {
        if buffered != self.0 {
            BUFFERED_REQUEST_BYTES.fetch_add(buffered as i64 - self.0 as i64, Ordering::Relaxed);
            self.0 = buffered;
        }
    }

    /// Bytes held by every connection, this one's counted as `buffered`.
    pub fn total(&self, buffered: usize) -> usize {
        let all = BUFFERED_REQUEST_BYTES.load(Ordering::Relaxed);
        (all - self.0 as i64 + buffered as i64).max(0) as usize
    }
}

impl Drop for Reported {
    fn drop(&mut self) {
        self.sync(0);
    }
}

/// One call's part of the count, given back when dropped.
#[derive(Debug)]
pub struct Held {
    bytes: usize,
    limit: usize,
}

impl Held {
    pub fn new(limit: usize) -> Held {
        Held { bytes: 0, limit }
    }

    /// Takes `n` more bytes, unless that would take the total past the
    /// limit: then the call fails with RESOURCE_EXHAUSTED.
    pub fn grow(&mut self, n: usize) -> Result<(), Status> {
        let before = BUFFERED_REQUEST_BYTES.fetch_add(n as i64, Ordering::Relaxed);
        if before.max(0) as usize + n > self.limit {
            BUFFERED_REQUEST_BYTES.fetch_sub(n as i64, Ordering::Relaxed);
            return Err(grpc::buffers_full(self.limit));
        }
        self.bytes += n;
        Ok(())
    }

    /// Gives back `n` bytes the call no longer holds.
    pub fn shrink(&mut self, n: usize) {
        let n = n.min(self.bytes);
        BUFFERED_REQUEST_BYTES.fetch_sub(n as i64, Ordering::Relaxed);
        self.bytes -= n;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        BUFFERED_REQUEST_BYTES.fetch_sub(self.bytes as i64, Ordering::Relaxed);
    }
}
