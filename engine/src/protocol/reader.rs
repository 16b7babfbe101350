//! A request body, as any transport delivers it ([`Chunks`]), cut into the
//! call's request messages in a protocol's framing: the [`Inbound`] side
//! of [`crate::call::drive`]. gRPC, gRPC-Web and Connect streaming use
//! the 5-byte envelope (gRPC-Web text under base64); a Connect unary body
//! is the message itself. Compressed messages are inflated within the
//! message limit; every byte held counts in the process's budget.

use super::compression::{self, Encoding, Inflated};
use super::grpc::{self, Code, Status};
use super::web_text::TextDecoder;
use super::{Dialect, Protocol};
use crate::budget::Held;
use crate::call::drive::Inbound;
use bytes::{Buf, Bytes, BytesMut};
use std::future::Future;

/// A request body as it arrives.
pub trait Chunks {
    /// The next piece of the body, None at its end.
    fn chunk(&mut self) -> impl Future<Output = Result<Option<Bytes>, Status>>;
}

/// Turns a message in the dialect's codec into protobuf bytes (JSON
/// transcoding); None for protobuf dialects.
pub type Decode = Box<dyn FnMut(Bytes) -> Result<Bytes, Status>>;

/// Reads request messages from a body.
pub struct Reader<C: Chunks> {
    dialect: Dialect,
    chunks: C,
    buf: BytesMut,
    text: Option<TextDecoder>,
    encoding: Encoding,
    max: usize,
    held: Held,
    done: bool,
    /// Connect unary: the one message has been returned.
    taken: bool,
    pub decode: Option<Decode>,
}

impl<C: Chunks> Reader<C> {
    /// A reader for `dialect` with the request's message `encoding`,
    /// refusing messages over `max` bytes (after inflation) and holding
    /// bytes under `budget` (the process-wide limit).
    pub fn new(dialect: Dialect, chunks: C, encoding: Encoding, max: usize, budget: usize) -> Self {
        Reader {
            dialect,
            chunks,
            buf: BytesMut::new(),
            text: (dialect.protocol == Protocol::GrpcWebText).then(TextDecoder::new),
            encoding,
            max,
            held: Held::new(budget),
            done: false,
            taken: false,
            decode: None,
        }
    }

    /// Reads one more piece of the body into the buffer; false at its end.
    async fn fill(&mut self) -> Result<bool, Status> {
        if self.done {
            return Ok(false);
        }
        let Some(chunk) = self.chunks.chunk().await? else {
            self.done = true;
            if let Some(t) = &self.text {
                t.finish().map_err(|e| malformed_text(&e))?;
            }
            return Ok(false);
        };
        let before = self.buf.len();
        match &mut self.text {
            Some(t) => t.push(&chunk, &mut self.buf).map_err(|e| malformed_text(&e))?,
            None => self.buf.extend_from_slice(&chunk),
        }
        self.held.grow(self.buf.len() - before)?;
        Ok(true)
    }

    fn inflate(&self, data: &[u8]) -> Result<Bytes, Status> {
        inflate(self.encoding, data, self.max)
    }

    fn finish(&mut self, m: Bytes) -> Result<Option<Bytes>, Status> {
        match &mut self.decode {
            Some(d) => d(m).map(Some),
            None => Ok(Some(m)),
        }
    }

    async fn whole(&mut self) -> Result<Option<Bytes>, Status> {
        if self.taken {
            return Ok(None);
        }
        self.taken = true;
        while self.fill().await? {
            if self.buf.len() > self.max {
                return Err(grpc::too_large(self.buf.len(), self.max));
            }
        }
        let body = std::mem::take(&mut self.buf).freeze();
        self.held.shrink(body.len());
        let m = match self.encoding {
            Encoding::Identity => body,
            _ => self.inflate(&body)?,
        };
        self.finish(m)
    }
}

/// A compressed request message, inflated within `max` bytes; a message
/// flagged compressed in a request that names no encoding is refused. An
/// empty one is empty, compressed or not.
pub fn inflate(encoding: Encoding, data: &[u8], max: usize) -> Result<Bytes, Status> {
    if encoding == Encoding::Identity {
        return Err(grpc::compressed());
    }
    if data.is_empty() {
        return Ok(Bytes::new());
    }
    compression::decompress(encoding, data, max).map_err(|e| match e {
        Inflated::TooLarge { limit } => Status::new(
            Code::ResourceExhausted,
            format!("request message is larger than the limit of {limit} bytes once decompressed"),
        ),
        Inflated::Corrupt(why) => Status::new(Code::Internal, format!("cannot decompress request message: {why}")),
    })
}

/// INVALID_ARGUMENT for a JSON request message that does not map onto the
/// method's request type.
pub fn invalid_json(e: &str) -> Status {
    Status::new(Code::InvalidArgument, format!("invalid JSON request message: {e}"))
}

/// INTERNAL for a gRPC-Web text body that is not base64.
pub fn malformed_text(e: &dyn std::fmt::Display) -> Status {
    Status::new(Code::Internal, format!("malformed grpc-web-text body: {e}"))
}

/// Where a call's request messages come from: the body, or the query of
/// a Connect GET (one message).
pub enum Source<C: Chunks> {
    Body(C),
    Query(Option<Bytes>),
}

impl<C: Chunks> Chunks for Source<C> {
    async fn chunk(&mut self) -> Result<Option<Bytes>, Status> {
        match self {
            Source::Body(b) => b.chunk().await,
            Source::Query(m) => Ok(m.take()),
        }
    }
}

/// Cuts the message of `len` bytes (after its 5-byte prefix) off the
/// front of `buf`: copied out when it fills less than half of the buffer
/// (a small message kept for long, a client stream's last, must not keep a
/// large buffer alive), split off otherwise, with the rest of the buffer
/// moved to one of its own for the same reason.
fn cut(buf: &mut BytesMut, len: usize) -> Bytes {
    if 2 * (5 + len) < buf.capacity() {
        let m = Bytes::copy_from_slice(&buf[5..5 + len]);
        buf.advance(5 + len);
        if buf.is_empty() {
            *buf = BytesMut::new();
        }
        return m;
    }
    let mut m = buf.split_to(5 + len);
    *buf = if buf.is_empty() { BytesMut::new() } else { BytesMut::from(&buf[..]) };
    m.split_off(5).freeze()
}

impl<C: Chunks> Inbound for Reader<C> {
    async fn next(&mut self) -> Result<Option<Bytes>, Status> {
        if !self.dialect.enveloped() {
            return self.whole().await;
        }
        loop {
            if self.buf.len() >= 5 {
                let flag = self.buf[0];
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
                if flag > 1 {
                    return Err(Status::new(Code::Internal, format!("invalid message flag {flag}")));
                }
                let compressed = flag == 1;
                if compressed && self.encoding == Encoding::Identity {
                    return Err(grpc::compressed());
                }
                if len > self.max {
                    return Err(grpc::too_large(len, self.max));
                }
                if self.buf.len() >= 5 + len {
                    let m = cut(&mut self.buf, len);
                    self.held.shrink(5 + len);
                    let m = if compressed { self.inflate(&m)? } else { m };
                    return self.finish(m);
                }
            }
            if !self.fill().await? {
                if !self.buf.is_empty() {
                    return Err(Status::new(Code::Internal, "request message is truncated"));
                }
                return Ok(None);
            }
        }
    }
}
