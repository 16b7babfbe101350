//! The engine's own HTTP/2 server layer, specialised for gRPC: the frame
//! codec ([`frame`]), HPACK ([`crate::codec::hpack`]), request header checks
//! ([`request`]) and the connection with its calls ([`conn`]). It holds to
//! RFC 9113 for everything a client can send, and answers the common unary
//! call from the read buffer without a task or an allocation.
//!
//! The `h2` crate stays the reference implementation (`--http2 h2`): the
//! end-to-end cases run through both stacks and must give the same gRPC
//! results.

pub mod conn;
pub mod frame;
pub(crate) mod request;
