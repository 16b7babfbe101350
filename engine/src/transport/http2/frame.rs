//! HTTP/2 frames (RFC 9113 §4 and §6): the 9-byte frame header, the frame
//! types, flags, error codes and settings the server layer uses, checks on
//! frame payloads, and writers that append frames to an output buffer.
//!
//! Parsing never allocates and never panics on any input: every function
//! that reads a payload checks its length first and reports a violation as
//! the error code RFC 9113 assigns to it.

use bytes::{BufMut, BytesMut};

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Length of a frame header.
pub const HEAD_LEN: usize = 9;
/// SETTINGS_MAX_FRAME_SIZE's initial value, the largest frame a peer may
/// send before it has seen ours (we never advertise more).
pub const DEFAULT_MAX_FRAME: u32 = 16_384;
/// Largest legal flow-control window (2^31 - 1).
pub const MAX_WINDOW: i64 = (1 << 31) - 1;
/// The initial window of every stream and of the connection (RFC 9113 §6.9.2).
pub const DEFAULT_WINDOW: i64 = 65_535;

/// Frame types.
pub mod kind {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const PRIORITY: u8 = 0x2;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PUSH_PROMISE: u8 = 0x5;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;
}

/// Frame flags.
pub mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

/// Error codes (RFC 9113 §7).
pub mod code {
    pub const NO_ERROR: u32 = 0x0;
    pub const PROTOCOL_ERROR: u32 = 0x1;
    pub const INTERNAL_ERROR: u32 = 0x2;
    pub const FLOW_CONTROL_ERROR: u32 = 0x3;
    pub const SETTINGS_TIMEOUT: u32 = 0x4;
    pub const STREAM_CLOSED: u32 = 0x5;
    pub const FRAME_SIZE_ERROR: u32 = 0x6;
    pub const REFUSED_STREAM: u32 = 0x7;
    pub const CANCEL: u32 = 0x8;
    pub const COMPRESSION_ERROR: u32 = 0x9;
    pub const CONNECT_ERROR: u32 = 0xa;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;
    pub const INADEQUATE_SECURITY: u32 = 0xc;
    pub const HTTP_1_1_REQUIRED: u32 = 0xd;
}

/// Setting identifiers (RFC 9113 §6.5.2).
pub mod setting {
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    pub const ENABLE_PUSH: u16 = 0x2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub const MAX_FRAME_SIZE: u16 = 0x5;
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub len: u32,
    pub kind: u8,
    pub flags: u8,
    /// The stream identifier, reserved bit cleared.
    pub stream: u32,
}

impl Head {
    pub fn parse(b: &[u8; HEAD_LEN]) -> Head {
        Head {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    pub fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }
}

/// The header block fragment of a HEADERS payload, with padding and the
/// priority fields removed, and the stream it depends on, if given.
pub fn headers_fragment(flags: u8, payload: &[u8]) -> Result<(&[u8], Option<u32>), u32> {
    let (mut rest, pad) = pad_length(flags, payload)?;
    let mut dependency = None;
    if flags & flag::PRIORITY != 0 {
        if rest.len() < 5 {
            return Err(code::FRAME_SIZE_ERROR);
        }
        dependency = Some(u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) & 0x7fff_ffff);
        rest = &rest[5..];
    }
    // Padding may not reach into the priority fields or past the end.
    if pad > rest.len() {
        return Err(code::PROTOCOL_ERROR);
    }
    Ok((&rest[..rest.len() - pad], dependency))
}

/// The data of a DATA payload, padding removed.
pub fn data_payload(flags: u8, payload: &[u8]) -> Result<&[u8], u32> {
    let (rest, pad) = pad_length(flags, payload)?;
    if pad > rest.len() {
        return Err(code::PROTOCOL_ERROR);
    }
    Ok(&rest[..rest.len() - pad])
}

/// Splits off the Pad Length field of a padded payload.
fn pad_length(flags: u8, payload: &[u8]) -> Result<(&[u8], usize), u32> {
    if flags & flag::PADDED == 0 {
        return Ok((payload, 0));
    }
    match payload.split_first() {
        Some((&pad, rest)) => Ok((rest, pad as usize)),
        None => Err(code::FRAME_SIZE_ERROR),
    }
}

/// The stream a PRIORITY payload depends on.
pub fn priority_dependency(payload: &[u8]) -> Result<u32, u32> {
    if payload.len() != 5 {
        return Err(code::FRAME_SIZE_ERROR);
    }
    Ok(u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff)
}

/// A 4-byte payload (RST_STREAM's error code, WINDOW_UPDATE's increment).
pub fn u32_payload(payload: &[u8]) -> Result<u32, u32> {
    match payload {
        [a, b, c, d] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => Err(code::FRAME_SIZE_ERROR),
    }
}

/// Checks a SETTINGS payload and yields its (identifier, value) pairs.
/// Values that RFC 9113 §6.5.2 forbids are reported with their error code.
pub fn settings(payload: &[u8]) -> Result<impl Iterator<Item = (u16, u32)> + '_, u32> {
    if !payload.len().is_multiple_of(6) {
        return Err(code::FRAME_SIZE_ERROR);
    }
    let pairs = payload
        .chunks_exact(6)
        .map(|c| (u16::from_be_bytes([c[0], c[1]]), u32::from_be_bytes([c[2], c[3], c[4], c[5]])));
    for (id, value) in pairs.clone() {
        match id {
            setting::ENABLE_PUSH if value > 1 => return Err(code::PROTOCOL_ERROR),
            setting::INITIAL_WINDOW_SIZE if value as i64 > MAX_WINDOW => return Err(code::FLOW_CONTROL_ERROR),
            setting::MAX_FRAME_SIZE if !(DEFAULT_MAX_FRAME..=(1 << 24) - 1).contains(&value) => {
                return Err(code::PROTOCOL_ERROR)
            }
            _ => {}
        }
    }
    Ok(pairs)
}

/// Appends a frame header.
pub fn put_head(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    debug_assert!(len < 1 << 24);
    let l = (len as u32).to_be_bytes();
    let s = stream.to_be_bytes();
    out.put_slice(&[l[1], l[2], l[3], kind, flags, s[0], s[1], s[2], s[3]]);
}

/// Appends a SETTINGS frame with the given pairs.
pub fn put_settings(out: &mut BytesMut, pairs: &[(u16, u32)]) {
    put_head(out, pairs.len() * 6, kind::SETTINGS, 0, 0);
    for (id, value) in pairs {
        out.put_u16(*id);
        out.put_u32(*value);
    }
}

pub fn put_settings_ack(out: &mut BytesMut) {
    put_head(out, 0, kind::SETTINGS, flag::ACK, 0);
}

pub fn put_ping(out: &mut BytesMut, ack: bool, data: &[u8; 8]) {
    put_head(out, 8, kind::PING, if ack { flag::ACK } else { 0 }, 0);
    out.put_slice(data);
}

pub fn put_goaway(out: &mut BytesMut, last_stream: u32, error: u32, debug: &[u8]) {
    put_head(out, 8 + debug.len(), kind::GOAWAY, 0, 0);
    out.put_u32(last_stream);
    out.put_u32(error);
    out.put_slice(debug);
}

pub fn put_rst(out: &mut BytesMut, stream: u32, error: u32) {
    put_head(out, 4, kind::RST_STREAM, 0, stream);
    out.put_u32(error);
}

pub fn put_window_update(out: &mut BytesMut, stream: u32, increment: u32) {
    put_head(out, 4, kind::WINDOW_UPDATE, 0, stream);
    out.put_u32(increment);
}

/// Appends a header block as one HEADERS frame, or HEADERS and
/// CONTINUATION frames when it is larger than the peer's frame size.
pub fn put_headers(out: &mut BytesMut, stream: u32, block: &[u8], end_stream: bool, max_frame: usize) {
    let es = if end_stream { flag::END_STREAM } else { 0 };
    if block.len() <= max_frame {
        put_head(out, block.len(), kind::HEADERS, es | flag::END_HEADERS, stream);
        out.put_slice(block);
        return;
    }
    let mut chunks = block.chunks(max_frame).peekable();
    let mut first = true;
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let end = if last { flag::END_HEADERS } else { 0 };
        if first {
            put_head(out, chunk.len(), kind::HEADERS, es | end, stream);
            first = false;
        } else {
            put_head(out, chunk.len(), kind::CONTINUATION, end, stream);
        }
        out.put_slice(chunk);
    }
}

/// Appends one DATA frame.
pub fn put_data(out: &mut BytesMut, stream: u32, data: &[u8], end_stream: bool) {
    put_head(out, data.len(), kind::DATA, if end_stream { flag::END_STREAM } else { 0 }, stream);
    out.put_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_round_trip() {
        let mut out = BytesMut::new();
        put_head(&mut out, 0x12345, kind::HEADERS, flag::END_HEADERS, 0x8000_0007);
        let h = Head::parse(out[..9].try_into().unwrap());
        assert_eq!(h, Head { len: 0x12345, kind: kind::HEADERS, flags: flag::END_HEADERS, stream: 7 });
    }

    #[test]
    fn padding() {
        assert_eq!(data_payload(0, b"abc"), Ok(&b"abc"[..]));
        assert_eq!(data_payload(flag::PADDED, b"\x01abc"), Ok(&b"ab"[..]));
        assert_eq!(data_payload(flag::PADDED, b"\x03abc"), Ok(&b""[..]));
        assert_eq!(data_payload(flag::PADDED, b"\x04abc"), Err(code::PROTOCOL_ERROR));
        assert_eq!(data_payload(flag::PADDED, b""), Err(code::FRAME_SIZE_ERROR));
        let f = headers_fragment(flag::PADDED | flag::PRIORITY, b"\x01\x00\x00\x00\x03\x10ab!");
        assert_eq!(f, Ok((&b"ab"[..], Some(3))));
        assert_eq!(headers_fragment(flag::PRIORITY, b"\x00\x00"), Err(code::FRAME_SIZE_ERROR));
    }

    #[test]
    fn settings_checks() {
        let ok = [0, 4, 0, 1, 0, 0, 0, 5, 0, 0, 0x40, 0];
        assert_eq!(settings(&ok).unwrap().collect::<Vec<_>>(), vec![(4, 65536), (5, 16384)]);
        assert_eq!(settings(&ok[..5]).err(), Some(code::FRAME_SIZE_ERROR));
        assert_eq!(settings(&[0, 2, 0, 0, 0, 2]).err(), Some(code::PROTOCOL_ERROR));
        assert_eq!(settings(&[0, 4, 0x80, 0, 0, 0]).err(), Some(code::FLOW_CONTROL_ERROR));
        assert_eq!(settings(&[0, 5, 0, 0, 0x3f, 0xff]).err(), Some(code::PROTOCOL_ERROR));
        assert_eq!(settings(&[0, 5, 1, 0, 0, 0]).err(), Some(code::PROTOCOL_ERROR));
        assert!(settings(&[0, 0x99, 1, 0, 0, 0]).is_ok());
    }

    #[test]
    fn continuation_split() {
        let block = vec![7u8; 40];
        let mut out = BytesMut::new();
        put_headers(&mut out, 1, &block, true, 16);
        let kinds: Vec<(u8, u8, u32)> = {
            let mut v = Vec::new();
            let mut b = &out[..];
            while !b.is_empty() {
                let h = Head::parse(b[..9].try_into().unwrap());
                v.push((h.kind, h.flags, h.len));
                b = &b[9 + h.len as usize..];
            }
            v
        };
        assert_eq!(
            kinds,
            vec![
                (kind::HEADERS, flag::END_STREAM, 16),
                (kind::CONTINUATION, 0, 16),
                (kind::CONTINUATION, flag::END_HEADERS, 8)
            ]
        );
    }
}
