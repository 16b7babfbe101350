//! The checks of the `message_reader` fuzz target (input layout and
//! invariants: `fuzz_targets/message_reader.rs`), shared with
//! `tests/fuzz_regressions.rs`, which replays the seed corpus and every past
//! crash through them.

use bytes::{Bytes, BytesMut};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use wirestub_engine::call::drive::Inbound;
use wirestub_engine::observe::metrics::BUFFERED_REQUEST_BYTES;
use wirestub_engine::protocol::compression::{self, Encoding, Inflated};
use wirestub_engine::protocol::grpc::{self, Code, Status};
use wirestub_engine::protocol::reader::{Chunks, Reader};
use wirestub_engine::protocol::web_text::TextDecoder;
use wirestub_engine::protocol::{Codec, Dialect, Protocol};

/// The dialects, by the first byte's bits 0-2 (modulo 5).
const PROTOCOLS: [Protocol; 5] =
    [Protocol::Grpc, Protocol::GrpcWeb, Protocol::GrpcWebText, Protocol::Connect, Protocol::ConnectStream];

/// The message size limits, by the first byte's bits 4-5.
const MAXES: [usize; 4] = [0, 16, 1024, 64 << 10];

/// The budget of held request bytes: 1 MiB, or 64 bytes with bit 6.
const BUDGETS: [usize; 2] = [1 << 20, 64];

/// The error a body that fails (bit 7) ends with instead of its end.
fn body_failed() -> Status {
    Status::new(Code::Canceled, "the request body failed (fuzz)")
}

/// The process-wide count of request bytes held, which the reader's budget
/// (`Held`) keeps.
fn held_everywhere() -> i64 {
    BUFFERED_REQUEST_BYTES.load(Ordering::Relaxed)
}

/// What the body's side sees of the reader, shared between the body (moved
/// into the reader) and the loop driving the reader.
struct Probe {
    /// The count of held bytes before the reader existed.
    baseline: i64,
    budget: usize,
    /// Bytes the reader was given so far, after base64 in text mode.
    delivered: Cell<usize>,
    /// Bytes of the messages the reader has returned, with their prefixes.
    consumed: Cell<usize>,
    /// The last piece handed over would take the held bytes past the budget.
    over_budget: Cell<bool>,
    /// The body has ended (None or its error handed over).
    ended: Cell<bool>,
    /// A decoder fed what the reader is fed, to know how many bytes it holds
    /// in text mode.
    text: RefCell<Option<TextDecoder>>,
}

impl Probe {
    /// Bytes the reader holds in the process-wide count, checked against
    /// the budget.
    fn held(&self) -> usize {
        let held = held_everywhere() - self.baseline;
        assert!(held >= 0, "the reader gave back {} bytes it never held", -held);
        let held = held as usize;
        assert!(held <= self.budget, "the reader holds {held} bytes, over its budget of {}", self.budget);
        held
    }
}

/// The request body: the pieces in order, then its end (or an error).
struct Body<'a> {
    pieces: std::vec::IntoIter<&'a [u8]>,
    fails: bool,
    probe: Rc<Probe>,
}

impl Chunks for Body<'_> {
    async fn chunk(&mut self) -> Result<Option<Bytes>, Status> {
        let p = &self.probe;
        assert!(!p.ended.get(), "the body was read again after its end");
        // Every byte the reader was given and has not returned in a message
        // is counted, no more.
        let held = p.held();
        let holding = p.delivered.get() - p.consumed.get();
        assert_eq!(held, holding, "the reader counts {held} bytes held but holds {holding}");
        let Some(piece) = self.pieces.next() else {
            p.ended.set(true);
            return if self.fails { Err(body_failed()) } else { Ok(None) };
        };
        let decoded = match &mut *p.text.borrow_mut() {
            Some(t) => {
                let mut out = BytesMut::new();
                // On an error, the reader fails too and reads no more.
                let _ = t.push(piece, &mut out);
                out.len()
            }
            None => piece.len(),
        };
        // What the budget compares: every byte held in the process.
        p.over_budget.set(held_everywhere().max(0) as usize + decoded > p.budget);
        p.delivered.set(p.delivered.get() + decoded);
        Ok(Some(Bytes::copy_from_slice(piece)))
    }
}

/// How the reader ends, after the expected messages.
#[derive(Debug)]
enum End {
    /// `Ok(None)`, and again if asked once more.
    Clean,
    /// This error.
    Exactly(Status),
    /// An error with this code.
    Code(Code),
    /// Some error (a gRPC-Web text body that does not decode: where it
    /// stops depends on the pieces).
    Any,
}

/// What a reader must return for a body.
struct Expected {
    messages: Vec<Bytes>,
    /// The bytes of each message as it arrived (with its prefix, after
    /// base64), which the reader stops holding when it returns it.
    sizes: Vec<usize>,
    end: End,
}

/// The body cut into messages by a plain reading of the 5-byte envelope:
/// flag 0 or 1 (1 only with an encoding), a length within `max`, compressed
/// messages inflated within `max` (an empty one as is).
fn deframe(plain: &[u8], encoding: Encoding, max: usize, fails: bool) -> Expected {
    let mut e = Expected { messages: Vec::new(), sizes: Vec::new(), end: End::Clean };
    // The body runs out: at a message boundary or inside one.
    let out_of_body = |clean: bool| match (fails, clean) {
        (true, _) => End::Exactly(body_failed()),
        (false, true) => End::Clean,
        (false, false) => End::Code(Code::Internal),
    };
    let mut rest = plain;
    e.end = loop {
        if rest.len() < 5 {
            break out_of_body(rest.is_empty());
        }
        let flag = rest[0];
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        if flag > 1 {
            break End::Code(Code::Internal);
        }
        if flag == 1 && encoding == Encoding::Identity {
            break End::Exactly(grpc::compressed());
        }
        if len > max {
            break End::Exactly(grpc::too_large(len, max));
        }
        let Some(data) = rest.get(5..5 + len) else { break out_of_body(false) };
        let message = match inflate(flag == 1, encoding, data, max) {
            Ok(m) => m,
            Err(end) => break end,
        };
        e.messages.push(message);
        e.sizes.push(5 + len);
        rest = &rest[5 + len..];
    };
    e
}

/// A message's bytes as the reader should return them.
fn inflate(compressed: bool, encoding: Encoding, data: &[u8], max: usize) -> Result<Bytes, End> {
    if !compressed || data.is_empty() {
        return Ok(Bytes::copy_from_slice(data));
    }
    compression::decompress(encoding, data, max).map_err(|e| match e {
        Inflated::TooLarge { .. } => End::Code(Code::ResourceExhausted),
        Inflated::Corrupt(_) => End::Code(Code::Internal),
    })
}

/// A Connect unary body: the one message, within `max` before and after
/// inflation.
fn whole(body: &[u8], encoding: Encoding, max: usize, fails: bool) -> Expected {
    let mut e = Expected { messages: Vec::new(), sizes: Vec::new(), end: End::Clean };
    if body.len() > max {
        e.end = End::Code(Code::ResourceExhausted);
        return e;
    }
    if fails {
        e.end = End::Exactly(body_failed());
        return e;
    }
    match inflate(encoding != Encoding::Identity, encoding, body, max) {
        Ok(m) => {
            e.messages.push(m);
            e.sizes.push(body.len());
        }
        Err(end) => e.end = end,
    }
    e
}

/// Runs the checks on one input.
pub fn check(data: &[u8]) {
    let [setup, chunking, body @ ..] = data else { return };
    let protocol = PROTOCOLS[usize::from(setup & 7) % PROTOCOLS.len()];
    let dialect = Dialect { protocol, codec: Codec::Proto };
    let encoding = if setup & 8 == 0 { Encoding::Identity } else { Encoding::Gzip };
    let max = MAXES[usize::from(setup >> 4 & 3)];
    let budget = BUDGETS[usize::from(setup >> 6 & 1)];
    let fails = setup & 0x80 != 0;
    let size = usize::from(chunking & 0x7f);
    let mut pieces: Vec<&[u8]> = match size {
        0 if body.is_empty() => Vec::new(),
        0 => vec![body],
        n => body.chunks(n).collect(),
    };
    if chunking & 0x80 != 0 {
        // An empty piece after every piece.
        pieces = pieces.into_iter().flat_map(|p| [p, &[][..]]).collect();
    }

    let text = protocol == Protocol::GrpcWebText;
    let expected = if !dialect.enveloped() {
        whole(body, encoding, max, fails)
    } else if text {
        let mut decoder = TextDecoder::new();
        let mut plain = BytesMut::new();
        let decoded = decoder.push(body, &mut plain).and_then(|()| decoder.finish());
        let mut e = deframe(&plain, encoding, max, fails);
        if decoded.is_err() {
            e.end = End::Any;
        }
        e
    } else {
        deframe(body, encoding, max, fails)
    };

    let probe = Rc::new(Probe {
        baseline: held_everywhere(),
        budget,
        delivered: Cell::new(0),
        consumed: Cell::new(0),
        over_budget: Cell::new(false),
        ended: Cell::new(false),
        text: RefCell::new(text.then(TextDecoder::new)),
    });
    let source = Body { pieces: pieces.into_iter(), fails, probe: probe.clone() };
    let mut reader = Reader::new(dialect, source, encoding, max, budget);
    let context = || format!("{protocol:?} {encoding:?}, max {max}, budget {budget}, pieces of {size}, fails: {fails}");

    let (got, outcome) = runtime().block_on(async {
        let mut got: Vec<Bytes> = Vec::new();
        let outcome = loop {
            // Each message holds at least its 5-byte prefix (Connect unary:
            // one message).
            assert!(got.len() <= body.len() / 5 + 1, "{} messages from {} bytes: {}", got.len(), body.len(), context());
            match reader.next().await {
                Ok(Some(m)) => {
                    let i = got.len();
                    assert!(m.len() <= max, "message {i} of {} bytes over the limit of {max}: {}", m.len(), context());
                    assert!(
                        expected.messages.get(i) == Some(&m),
                        "message {i} is {m:02x?}, expected {:02x?} then {:?}: {}",
                        expected.messages.get(i),
                        expected.end,
                        context()
                    );
                    probe.consumed.set(probe.consumed.get() + expected.sizes[i]);
                    probe.held();
                    got.push(m);
                }
                Ok(None) => {
                    let again = reader.next().await;
                    assert!(matches!(again, Ok(None)), "after its end the reader returned {again:?}: {}", context());
                    break Ok(());
                }
                Err(s) => break Err(s),
            }
        };
        probe.held();
        (got, outcome)
    });
    drop(reader);
    let left = held_everywhere() - probe.baseline;
    assert_eq!(left, 0, "{left} bytes still counted once the reader is gone: {}", context());

    if outcome.as_ref().err() == Some(&grpc::buffers_full(budget)) {
        // The budget may end the call at any piece that would go past it.
        assert!(probe.over_budget.get(), "the budget of {budget} refused a piece within it: {}", context());
        return;
    }
    let complete = got.len() == expected.messages.len();
    let ended_well = match (&expected.end, &outcome) {
        (End::Clean, Ok(())) => complete,
        (End::Exactly(want), Err(s)) => complete && want == s,
        (End::Code(code), Err(s)) => complete && *code == s.code,
        (End::Any, Err(_)) => true,
        _ => false,
    };
    assert!(
        ended_well,
        "{} of {} messages, then {outcome:?}; expected {:?}: {}",
        got.len(),
        expected.messages.len(),
        expected.end,
        context()
    );
    if dialect.enveloped() && !text && encoding == Encoding::Identity {
        // The messages framed again are the start of the body.
        let mut framed = Vec::new();
        for m in &got {
            framed.push(0);
            framed.extend_from_slice(&(m.len() as u32).to_be_bytes());
            framed.extend_from_slice(m);
        }
        assert!(body.starts_with(&framed), "the messages framed again are not the start of the body: {}", context());
    } else if !dialect.enveloped() && encoding == Encoding::Identity && body.len() <= max && !fails {
        assert_eq!(got, [Bytes::copy_from_slice(body)], "Connect unary: the body is the message: {}", context());
    }
}

/// A current-thread runtime for the reader's futures, one per thread.
fn runtime() -> &'static tokio::runtime::Runtime {
    thread_local! {
        static RUNTIME: &'static tokio::runtime::Runtime = Box::leak(Box::new(
            tokio::runtime::Builder::new_current_thread().build().expect("a current-thread runtime"),
        ));
    }
    RUNTIME.with(|r| *r)
}
