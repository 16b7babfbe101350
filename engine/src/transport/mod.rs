//! Transports: bytes on a socket to requests and responses, and back.
//! HTTP/2 on the engine's own stack ([`http2`]) or on the `h2` crate
//! ([`h2_ref`], the reference), TLS under either ([`tls`]), and the
//! per-connection bounds they share ([`budget`], [`outflow`]).

pub mod budget;
pub mod h2_ref;
pub mod http2;
pub mod outflow;
pub mod tls;
