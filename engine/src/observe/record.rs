//! What a call leaves behind, collected while it runs and handed over when
//! it ends: its metrics (started, the rule that answered, the status and
//! latency) and its journal entry. Used by the transports whose calls are
//! driven by [`crate::call::drive`]; the engine's own HTTP/2 stack keeps
//! the same data on its streams.

use crate::call::drive::Report;
use crate::call::matcher::{Broken, Closest};
use crate::codec::percent;
use crate::observe::journal::{Entry, Journal, RequestMessages, Upstreamed};
use crate::observe::metrics::WorkerStats;
use crate::served::generation::Generation;
use bytes::Bytes;
use http::HeaderMap;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::time::Instant;

/// The journal's part: what is kept of the request and the answer.
struct Journaled<'a> {
    journal: &'a Journal,
    generation: Arc<Generation>,
    time: SystemTime,
    /// The request's headers, copied into the entry only when the call
    /// ends (an idle call holds nothing more for the journal).
    metadata: &'a HeaderMap,
    messages: RequestMessages,
    rule: Option<u32>,
    closest: Option<Closest>,
    similarity: Option<f32>,
    upstream: Option<Box<Upstreamed>>,
    fault: Option<Box<str>>,
    violations: Option<Box<[Broken]>>,
}

/// One call's record. Counted as started when made; recorded as handled
/// (CANCELLED unless a status was set) and journaled when dropped, so a
/// call cut short by the client is counted too.
pub struct CallRecord<'a> {
    stats: Option<WorkerStats<'a>>,
    method: usize,
    started: Instant,
    code: u8,
    message: String,
    protocol: &'static str,
    journal: Option<Box<Journaled<'a>>>,
}

impl<'a> CallRecord<'a> {
    /// Starts the record of a call to method `method` of `generation`;
    /// `metadata` is kept for the journal when there is one.
    pub fn start(
        stats: Option<WorkerStats<'a>>,
        journal: Option<&'a Journal>,
        generation: &Arc<Generation>,
        method: usize,
        protocol: &'static str,
        metadata: &'a HeaderMap,
    ) -> Self {
        if let Some(s) = &stats {
            s.started(method);
            if let Some(p) = crate::observe::metrics::PROTOCOLS.iter().position(|&n| n == protocol) {
                s.protocol(p);
            }
        }
        CallRecord {
            stats,
            method,
            started: Instant::now(),
            code: 1,
            message: String::new(),
            protocol,
            journal: journal.map(|journal| {
                Box::new(Journaled {
                    journal,
                    generation: generation.clone(),
                    time: SystemTime::now(),
                    metadata,
                    messages: RequestMessages::default(),
                    rule: None,
                    closest: None,
                    similarity: None,
                    upstream: None,
                    fault: None,
                    violations: None,
                })
            }),
        }
    }
}

impl Report for CallRecord<'_> {
    /// Whether the journal wants the closest rule of an unmatched call.
    fn explain(&self) -> bool {
        self.journal.is_some()
    }

    /// A request message arrived (kept for the journal, within its limits).
    fn message(&mut self, m: &[u8]) {
        if let Some(j) = &mut self.journal {
            j.messages.push(m);
        }
    }

    /// The rule that answered (None: no rule matched).
    fn rule(&mut self, rule: Option<u32>, closest: Option<Closest>) {
        if let Some(s) = &self.stats {
            s.rule(self.method, rule);
        }
        if let Some(j) = &mut self.journal {
            j.rule = rule;
            j.closest = closest;
        }
    }

    fn similarity(&mut self, score: f32) {
        if let Some(j) = &mut self.journal {
            j.similarity = Some(score);
        }
    }

    /// The status the call ends with.
    fn status(&mut self, code: u8, message: &str) {
        self.code = code;
        self.message = percent::decode(message, false);
    }

    /// The request broke validation checks.
    fn invalid(&mut self, failed: &[Broken]) {
        if let Some(s) = &self.stats {
            for b in failed {
                s.check_failed(self.method, b.check);
            }
        }
        if let Some(j) = &mut self.journal {
            j.violations = Some(failed.into());
        }
    }

    /// A rule injected a fault.
    fn fault(&mut self, kind: &'static str, what: String) {
        if let Some(s) = &self.stats {
            s.fault(self.method, kind);
        }
        if let Some(j) = &mut self.journal {
            j.fault = Some(what.into());
        }
    }

    /// The call went to the upstream.
    fn forwarded(&mut self, path: &str, latency: std::time::Duration, failed: bool) {
        if let Some(s) = &self.stats {
            s.forwarded(self.method, failed);
        }
        if let Some(j) = &mut self.journal {
            j.upstream = Some(Box::new(Upstreamed { path: path.into(), latency, failed }));
        }
    }
}

impl Drop for CallRecord<'_> {
    fn drop(&mut self) {
        let latency = self.started.elapsed();
        if let Some(s) = &self.stats {
            s.handled(self.method, self.code, latency);
        }
        tracing::debug!(target: "wirestub::calls", protocol = self.protocol, code = self.code, "call ended");
        if let Some(j) = self.journal.take() {
            let j = *j;
            j.journal.record(Entry {
                seq: 0,
                time: j.time,
                generation: j.generation,
                method: self.method,
                metadata: journal_metadata(j.metadata),
                messages: j.messages,
                rule: j.rule,
                status: self.code,
                message: std::mem::take(&mut self.message),
                latency,
                closest: j.closest,
                similarity: j.similarity,
                protocol: self.protocol,
                upstream: j.upstream,
                fault: j.fault,
                violations: j.violations,
            });
        }
    }
}

/// Request headers the journal keeps: all but the transport's own.
fn journal_metadata(h: &HeaderMap) -> Vec<(Box<str>, Bytes)> {
    h.iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "host" | "content-type" | "content-length" | "connection" | "keep-alive" | "transfer-encoding" | "te"
            )
        })
        .map(|(k, v)| (k.as_str().into(), Bytes::copy_from_slice(v.as_bytes())))
        .collect()
}
