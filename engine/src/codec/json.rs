//! The protobuf JSON mapping for one method, from the plan's descriptors
//! (prost-reflect): JSON requests become protobuf bytes before rules read
//! them, so the matcher never sees JSON; protobuf answers become JSON.
//! Static answers are transcoded once, when the plan is prepared; only
//! JSON clients and templated answers pay for it per call.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, SerializeOptions};

/// A method's request and response types.
#[derive(Debug, Clone)]
pub struct JsonCodec {
    input: MessageDescriptor,
    output: MessageDescriptor,
}

impl JsonCodec {
    /// The codec of a method whose types are `input` and `output` (full
    /// names), None when the pool lacks either.
    pub fn new(pool: &DescriptorPool, input: &str, output: &str) -> Option<JsonCodec> {
        Some(JsonCodec { input: pool.get_message_by_name(input)?, output: pool.get_message_by_name(output)? })
    }

    /// The request message type.
    pub fn input(&self) -> &MessageDescriptor {
        &self.input
    }

    /// A JSON request message as protobuf bytes; the error says what is
    /// wrong and where (a field's name, a line and column).
    pub fn request(&self, json: &[u8]) -> Result<Bytes, String> {
        let mut de = serde_json::Deserializer::from_slice(json);
        let m = DynamicMessage::deserialize(self.input.clone(), &mut de).map_err(|e| e.to_string())?;
        de.end().map_err(|e| e.to_string())?;
        Ok(Bytes::from(m.encode_to_vec()))
    }

    /// A gRPC-framed protobuf response message as a framed JSON one.
    /// Messages that do not decode (a rule's hand-written bytes) become
    /// `{}`: the plan checked every static answer against its type.
    /// [`JsonCodec::response`], or None when the message does not decode
    /// as the response type.
    pub fn try_response(&self, framed: &[u8]) -> Option<Bytes> {
        let proto = framed.get(5..).unwrap_or_default();
        DynamicMessage::decode(self.output.clone(), proto).ok()?;
        Some(self.response(framed))
    }

    /// The response type's full name.
    pub fn output_name(&self) -> &str {
        self.output.full_name()
    }

    pub fn response(&self, framed: &[u8]) -> Bytes {
        let proto = framed.get(5..).unwrap_or_default();
        let json = match DynamicMessage::decode(self.output.clone(), proto) {
            Ok(m) => {
                let mut out = Vec::with_capacity(proto.len() * 2 + 2);
                let mut ser = serde_json::Serializer::new(&mut out);
                match m.serialize_with_options(&mut ser, &SerializeOptions::new()) {
                    Ok(()) => out,
                    Err(_) => b"{}".to_vec(),
                }
            }
            Err(_) => b"{}".to_vec(),
        };
        let mut b = BytesMut::with_capacity(5 + json.len());
        b.put_u8(0);
        b.put_u32(json.len() as u32);
        b.put_slice(&json);
        b.freeze()
    }
}
