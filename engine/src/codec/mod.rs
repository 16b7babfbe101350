//! Leaf encodings with no knowledge of calls or connections: the protobuf
//! wire format read in place ([`wire`]) and HPACK with its Huffman code
//! ([`hpack`], [`huffman`]). Everything above may use them; they use
//! nothing of the engine.

pub mod hpack;
pub(crate) mod huffman;
pub mod wire;
