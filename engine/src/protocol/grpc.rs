//! gRPC-over-HTTP/2 protocol details that do not depend on the HTTP/2
//! library: status codes, `grpc-timeout`, and request message framing.

use std::time::Duration;

/// The gRPC status codes the engine produces itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    Ok = 0,
    Canceled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    Unauthenticated = 16,
}

/// A status the engine answers with when no rule is involved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub code: Code,
    pub message: String,
    /// A refusal of a message encoding: sent with `grpc-accept-encoding`.
    pub accept_encoding: bool,
}

impl Status {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Status { code, message: message.into(), accept_encoding: false }
    }
}

/// Parses a `grpc-timeout` value: 1 to 8 ASCII digits and a unit (H, M, S,
/// m, u, n). Returns None when malformed.
pub fn parse_timeout(v: &[u8]) -> Option<Duration> {
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Incremental checks on a unary request body as it arrives, so that an
/// oversized or second message is refused from its 5-byte prefix, before the
/// rest is buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Fewer than one full message so far.
    Incomplete,
    /// Exactly one complete message.
    One,
}

/// RESOURCE_EXHAUSTED for a request message over the limit.
pub fn too_large(len: usize, max_len: usize) -> Status {
    Status::new(
        Code::ResourceExhausted,
        format!("request message of {len} bytes is larger than the limit of {max_len} bytes"),
    )
}

/// Reads a message's 5-byte prefix (`p` holds at least five bytes):
/// whether it is compressed, and its length. An invalid flag or a length
/// over `max_len` ends the call.
pub fn message_prefix(p: &[u8], max_len: usize) -> Result<(bool, usize), Status> {
    let flag = p[0];
    if flag > 1 {
        return Err(Status::new(Code::Internal, format!("invalid gRPC message flag {flag}")));
    }
    let len = u32::from_be_bytes([p[1], p[2], p[3], p[4]]) as usize;
    if len > max_len {
        return Err(too_large(len, max_len));
    }
    Ok((flag == 1, len))
}

/// The message encodings the engine accepts, sent as
/// `grpc-accept-encoding` with every refusal of another one.
pub const ACCEPT_ENCODING: &str = "identity,gzip";

/// The answer to a message flagged compressed in a request that names no
/// encoding.
pub fn compressed() -> Status {
    let message = "request message is flagged compressed but the request names no grpc-encoding";
    Status { accept_encoding: true, ..Status::new(Code::Internal, message) }
}

/// The answer to a request whose `grpc-encoding` is not supported.
pub fn unsupported_encoding(encoding: &[u8]) -> Status {
    let e = String::from_utf8_lossy(encoding);
    let message = format!("message encoding {e} is not supported; this server accepts identity and gzip");
    Status { accept_encoding: true, ..Status::new(Code::Unimplemented, message) }
}

/// The answer to a request message that would take the request bytes the
/// server holds past its limit.
pub fn buffers_full(limit: usize) -> Status {
    Status::new(
        Code::ResourceExhausted,
        format!("the server holds {limit} bytes of requests still arriving (--max-buffered-bytes); try again later"),
    )
}

/// The answer to a request message on a connection that holds more
/// request bytes than it may.
pub fn connection_buffers_full(limit: usize) -> Status {
    Status::new(
        Code::ResourceExhausted,
        format!("this connection holds more than {limit} bytes of requests still arriving"),
    )
}

/// Inspects the bytes received so far (`prefix` is at least the first
/// five bytes if `total >= 5`).
pub fn check_unary(prefix: &[u8], total: usize, max_len: usize) -> Result<Framing, Status> {
    if total < 5 {
        return Ok(Framing::Incomplete);
    }
    let (_, len) = message_prefix(prefix, max_len)?;
    let end = 5 + len;
    if total < end {
        return Ok(Framing::Incomplete);
    }
    if total > end {
        // Anything after the first message is the start of another one.
        return Err(Status::new(Code::Unimplemented, "unary method received more than one request message"));
    }
    Ok(Framing::One)
}

/// The final verdict once the client has half-closed.
pub fn finish_unary(prefix: &[u8], total: usize, max_len: usize) -> Result<(), Status> {
    match check_unary(prefix, total, max_len)? {
        Framing::One => Ok(()),
        Framing::Incomplete if total == 0 => {
            Err(Status::new(Code::Unimplemented, "unary method received no request message"))
        }
        Framing::Incomplete => Err(Status::new(Code::Internal, "request message is truncated")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout(b"99999999n"), Some(Duration::from_nanos(99_999_999)));
        assert_eq!(parse_timeout(b"123456789S"), None);
        assert_eq!(parse_timeout(b"m"), None);
        assert_eq!(parse_timeout(b"10x"), None);
        assert_eq!(parse_timeout(b"-1S"), None);
    }

    #[test]
    fn framing() {
        let one = [0, 0, 0, 0, 2, 8, 1];
        assert_eq!(check_unary(&one, 3, 100), Ok(Framing::Incomplete));
        assert_eq!(check_unary(&one, 6, 100), Ok(Framing::Incomplete));
        assert_eq!(check_unary(&one, 7, 100), Ok(Framing::One));
        assert_eq!(check_unary(&one, 8, 100).unwrap_err().code, Code::Unimplemented);
        assert_eq!(check_unary(&one, 7, 1).unwrap_err().code, Code::ResourceExhausted);
        assert_eq!(check_unary(&[2, 0, 0, 0, 0], 5, 1).unwrap_err().code, Code::Internal);
        assert_eq!(finish_unary(&[], 0, 10).unwrap_err().code, Code::Unimplemented);
        assert_eq!(finish_unary(&one, 6, 10).unwrap_err().code, Code::Internal);
        assert_eq!(finish_unary(&one, 3, 10).unwrap_err().code, Code::Internal);
        assert_eq!(finish_unary(&[0, 0, 0, 0, 0], 5, 10), Ok(()));
    }
}
