//! Transport faults a rule injects into a native connection: the stream
//! reset with a chosen code, GOAWAY (graceful or immediate), the TCP
//! connection closed, reads or writes stalled for a while, the output
//! trickled a few bytes at a time, and a frame the protocol forbids. The
//! call driver decides when (after how many response messages); this
//! applies them, and the socket loop asks [`ConnFaults`] what it may do.

use super::*;
use wirestub_plan::{Transport, TransportFault};

/// The connection faults in force, until they lapse.
#[derive(Default)]
pub(super) struct ConnFaults {
    /// No reading from the socket until then.
    read_until: Option<Instant>,
    /// No writing to the socket until then.
    write_until: Option<Instant>,
    /// The output trickles while a stream lasts.
    trickle: Option<Trickle>,
}

struct Trickle {
    /// The stream whose call asked for it; it ends with that stream.
    stream: u32,
    bytes: usize,
    every: Duration,
    /// When the next write may go.
    next: Instant,
    /// Once the stream is gone: the count of bytes written to the socket
    /// at which its last output has gone too, and the trickle ends.
    until: Option<u64>,
}

impl ConnFaults {
    /// Whether reading waits (lifting a stall that has lapsed).
    pub(super) fn read_stalled(&mut self, now: Instant) -> bool {
        match self.read_until {
            Some(t) if now < t => true,
            _ => {
                self.read_until = None;
                false
            }
        }
    }

    /// How many bytes the socket may take now: None for no limit, 0 while
    /// writes are stalled or the trickle waits. `open` tells whether the
    /// trickling stream is still open; `written` counts the bytes written
    /// to the socket so far and `queued` those waiting: the trickle ends
    /// once its stream is gone and what it queued has gone out.
    pub(super) fn write_budget(
        &mut self,
        now: Instant,
        open: impl Fn(u32) -> bool,
        written: u64,
        queued: usize,
    ) -> Option<usize> {
        if let Some(t) = self.write_until {
            if now < t {
                return Some(0);
            }
            self.write_until = None;
        }
        let t = self.trickle.as_mut()?;
        if t.until.is_none() && !open(t.stream) {
            t.until = Some(written + queued as u64);
        }
        if t.until.is_some_and(|u| written >= u) {
            self.trickle = None;
            return None;
        }
        Some(if now >= t.next { t.bytes } else { 0 })
    }

    /// A trickled write of `n` bytes went out at `now`.
    pub(super) fn wrote(&mut self, now: Instant, n: usize) {
        if let Some(t) = &mut self.trickle {
            if n > 0 {
                t.next = now + t.every;
            }
        }
    }

    /// The next time something lapses or may go, for the loop's timer:
    /// only times still ahead (a trickle whose turn has come waits for
    /// output, which wakes the loop by itself).
    pub(super) fn wake_at(&self, now: Instant) -> Option<Instant> {
        [self.read_until, self.write_until, self.trickle.as_ref().map(|t| t.next)]
            .into_iter()
            .flatten()
            .filter(|t| *t > now)
            .min()
    }

    /// Whether nothing is in force any more.
    pub(super) fn is_idle(&self) -> bool {
        self.read_until.is_none() && self.write_until.is_none() && self.trickle.is_none()
    }
}

impl Conn<'_> {
    /// Applies a transport fault to stream `id`'s call; returns whether the
    /// call goes on. A fault that ends the call notes the status its
    /// client reports first.
    pub(super) fn inject(&mut self, id: u32, fault: &TransportFault) -> bool {
        let ends = !fault.call_goes_on();
        if ends {
            let (code, message) = call::client_status(fault);
            self.note_status(id, code as u8, message);
        }
        let now = Instant::now();
        match fault.action {
            Transport::Reset(code) => {
                if let Some(mut s) = self.streams.remove(&id) {
                    self.forget(id, &mut s);
                    frame::put_rst(&mut self.out, id, code);
                }
            }
            Transport::GoAway { graceful: true } => self.drain(),
            Transport::GoAway { graceful: false } => {
                self.goaway(code::NO_ERROR, b"injected fault");
                self.end_now();
            }
            // The output queued so far still goes; then the connection
            // closes without a GOAWAY.
            Transport::Close => self.end_now(),
            Transport::Malformed => {
                // A response header block with an upper-case field name:
                // a malformed response (RFC 9113 §8.2.1), which a client
                // treats as a stream error. The stream ends here.
                let block: &[u8] = &[0x88, 0x00, 0x05, b'X', b'-', b'B', b'a', b'd', 0x01, b'1'];
                frame::put_head(&mut self.out, block.len(), kind::HEADERS, flag::END_HEADERS, id);
                self.out.extend_from_slice(block);
                if let Some(mut s) = self.streams.remove(&id) {
                    self.forget(id, &mut s);
                }
            }
            Transport::StallWrite(ms) => {
                self.faults.get_or_insert_default().write_until = Some(now + Duration::from_millis(ms.into()));
            }
            Transport::StallRead(ms) => {
                self.faults.get_or_insert_default().read_until = Some(now + Duration::from_millis(ms.into()));
            }
            Transport::Trickle { bytes, every_ms } => {
                self.faults.get_or_insert_default().trickle = Some(Trickle {
                    stream: id,
                    bytes: bytes.max(1) as usize,
                    every: Duration::from_millis(every_ms.into()),
                    next: now,
                    until: None,
                });
            }
        }
        !ends
    }
}
