//! Server reflection (`grpc.reflection.v1` and `v1alpha`, which share one
//! wire format), answered from the plan's descriptors.

use bytes::Bytes;

/// `/grpc.reflection.v1.ServerReflection/ServerReflectionInfo`.
pub const V1: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
/// `/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo`.
pub const V1ALPHA: &str = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";

/// An index of a plan's descriptors (plus the engine's built-in services)
/// by file name and by symbol.
pub struct Reflection {}

impl Reflection {
    /// `descriptors` is an encoded `google.protobuf.FileDescriptorSet` (the
    /// plan's). Never fails: descriptors that do not decode give an index
    /// with the built-in services only.
    pub fn new(_descriptors: &[u8]) -> Reflection {
        Reflection {}
    }

    /// Answers one `ServerReflectionRequest` (encoded, unframed) with an
    /// encoded `ServerReflectionResponse` (unframed).
    pub fn answer(&self, _request: &[u8]) -> Bytes {
        unimplemented!()
    }
}
