//! Protocols carried over a transport: how a request becomes a call's
//! inputs and a call's outputs become a response. [`grpc`] holds the
//! gRPC status codes, `grpc-timeout` and message framing.

pub mod grpc;
