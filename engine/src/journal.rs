//! The request journal: a bounded ring of the calls received (method,
//! metadata, every request message, the rule that answered, status,
//! latency), kept only when asked for (`--journal N`), and its queries:
//! list and filter, count, verify, unmatched calls with the rule that came
//! closest. Requests are kept as received bytes; the JSON view is made
//! when a query asks, from the plan generation's descriptors.

use crate::state::Generation;
use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// One received call.
pub struct Entry {
    /// Position in the journal, from 1, assigned by [`Journal::record`].
    pub seq: u64,
    /// When the call started.
    pub time: SystemTime,
    /// The plan generation that answered (for descriptors and rules).
    pub generation: Arc<Generation>,
    /// Index of the method in `generation.served.methods`.
    pub method: usize,
    /// Request metadata as received (lower-case names; pseudo-headers,
    /// `te` and `content-type` left out), in order.
    pub metadata: Vec<(Box<str>, Bytes)>,
    /// Every request message, unframed, in order.
    pub messages: Vec<Bytes>,
    /// The rule that answered, as an index into the method's plan rules;
    /// None when no rule matched (or the call failed before matching).
    pub rule: Option<u32>,
    /// The gRPC status sent.
    pub status: u8,
    /// `grpc-message` sent, percent-decoded; empty for none.
    pub message: String,
    /// From the request's headers to the status sent.
    pub latency: Duration,
    /// For a call no rule matched: the rule that held the most conditions.
    pub closest: Option<Closest>,
}

/// The rule that came closest to answering an unmatched call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closest {
    /// Index into the method's plan rules.
    pub rule: u32,
    /// Index of the first condition of that rule that failed.
    pub failed: u32,
    /// How many of its conditions held.
    pub held: u32,
}

/// The bounded ring of entries.
pub struct Journal {}

impl Journal {
    /// A journal keeping the last `capacity` calls (at least 1).
    pub fn new(_capacity: usize) -> Journal {
        unimplemented!()
    }

    /// Appends a call, dropping the oldest one when full.
    pub fn record(&self, _entry: Entry) {
        unimplemented!()
    }
}
