//! Transports: bytes on a socket to requests and responses, and back.
//! HTTP/2 on the engine's own stack ([`http2`]) or on the `h2` crate
//! ([`h2_ref`], the reference), HTTP/1.1 ([`http1`], on hyper), the
//! listener's choice between them ([`sniff`]), TLS under either ([`tls`]),
//! and the `h2` stack's output bound ([`outflow`]).

pub mod h2_ref;
pub mod http1;
pub mod http2;
pub mod outflow;
pub mod sniff;
pub mod tls;
