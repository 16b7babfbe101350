//! Leaf encodings with no knowledge of calls or connections: the protobuf
//! wire format read in place ([`wire`]) and shown without a schema
//! ([`wire_dump`]), HPACK with its Huffman code
//! ([`hpack`], [`huffman`]) the protobuf JSON mapping ([`json`]) and percent-decoding
//! ([`percent`]). Everything above may use them; they use
//! nothing of the engine.

pub mod hpack;
pub(crate) mod huffman;
pub mod json;
pub mod percent;
pub mod wire;
pub mod wire_dump;
