//! gRPC-Web framing (grpc/grpc `doc/PROTOCOL-WEB.md`): messages keep
//! gRPC's 5-byte envelope, and the trailers travel as the body's last
//! frame, flag `0x80`, holding an HTTP/1-style header block.

use bytes::{BufMut, Bytes, BytesMut};
use http::HeaderMap;

/// The flag of the frame that carries the trailers.
pub const TRAILER_FLAG: u8 = 0x80;

/// The trailer frame for a trailer map: `name:value\r\n` lines (names
/// are lower case already), no terminating blank line.
pub fn trailer_frame(trailers: &HeaderMap) -> Bytes {
    let len: usize = trailers.iter().map(|(k, v)| k.as_str().len() + v.len() + 3).sum();
    let mut b = BytesMut::with_capacity(5 + len);
    b.put_u8(TRAILER_FLAG);
    b.put_u32(len as u32);
    for (k, v) in trailers {
        b.put_slice(k.as_str().as_bytes());
        b.put_u8(b':');
        b.put_slice(v.as_bytes());
        b.put_slice(b"\r\n");
    }
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn trailers_become_the_last_frame() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("5"));
        t.insert("grpc-message", HeaderValue::from_static("no%20room"));
        t.append("x-trail", HeaderValue::from_static("a"));
        let f = trailer_frame(&t);
        let body = b"grpc-status:5\r\ngrpc-message:no%20room\r\nx-trail:a\r\n";
        assert_eq!(f[0], 0x80);
        assert_eq!(u32::from_be_bytes([f[1], f[2], f[3], f[4]]) as usize, body.len());
        assert_eq!(&f[5..], &body[..]);
    }
}
