//! An upstream's answer read as gRPC, bytes it sends being untrusted:
//! response messages cut from its DATA as it arrives, each bounded by the
//! message limit (so at most one message and one chunk are ever held),
//! compressed ones inflated within that limit; and the status of its
//! trailer block.

use crate::protocol::compression::{self, Encoding};
use bytes::{BufMut, Bytes, BytesMut};

/// Response messages cut from the bytes of a response body.
pub struct Messages {
    buffer: BytesMut,
    max: usize,
    encoding: Encoding,
}

impl Messages {
    /// Messages of at most `max` bytes (compressed ones in `encoding`).
    pub fn new(max: usize, encoding: Encoding) -> Messages {
        Messages { buffer: BytesMut::new(), max, encoding }
    }

    /// More of the body.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buffer.extend_from_slice(chunk);
    }

    /// Bytes held: the message in progress.
    pub fn held(&self) -> usize {
        self.buffer.len()
    }

    /// The next whole message, gRPC-framed and uncompressed; None until
    /// more bytes come; an error for a message over the limit or one that
    /// does not inflate.
    pub fn cut(&mut self) -> Result<Option<Bytes>, String> {
        let b = &self.buffer;
        if b.len() < 5 {
            return Ok(None);
        }
        let compressed = match b[0] {
            0 => false,
            1 => true,
            flag => return Err(format!("a message with flags {flag:#04x} (only 0 and 1 are gRPC's)")),
        };
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        if len > self.max {
            return Err(format!("a message of {len} bytes, over the limit of {}", self.max));
        }
        if b.len() < 5 + len {
            return Ok(None);
        }
        let framed = self.buffer.split_to(5 + len).freeze();
        if self.buffer.is_empty() {
            // Let go of the buffer the message was cut from.
            self.buffer = BytesMut::new();
        }
        if !compressed {
            return Ok(Some(framed));
        }
        let inflated = compression::decompress(self.encoding, &framed[5..], self.max).map_err(|e| e.to_string())?;
        let mut m = BytesMut::with_capacity(5 + inflated.len());
        m.put_u8(0);
        m.put_u32(inflated.len() as u32);
        m.put(inflated);
        Ok(Some(m.freeze()))
    }

    /// Checks the body ended between messages.
    pub fn finish(&self) -> Result<(), String> {
        match self.buffer.is_empty() {
            true => Ok(()),
            false => Err("the answer ended within a message".into()),
        }
    }
}

/// The status of a trailer block (or a trailers-only answer): its
/// `grpc-status`, UNKNOWN (2) when missing or not a number the wire can
/// carry.
pub fn status(block: &http::HeaderMap) -> u8 {
    block
        .get("grpc-status")
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .and_then(|v| v.trim().parse::<u8>().ok())
        .unwrap_or(2)
}
