//! Server reflection (`grpc.reflection.v1` and `v1alpha`, which share one
//! wire format), answered from the plan's descriptors.
//!
//! [`Reflection::new`] runs once per plan load: it decodes the plan's
//! `FileDescriptorSet` into a `prost_reflect::DescriptorPool`, adds the
//! engine's built-in files (health and reflection, compiled into
//! `builtin/descriptors.bin`) unless the plan has files of those names,
//! indexes every symbol by its full name, and encodes, per file, the
//! `file_descriptor_response` that answers for it: the file and all its
//! transitive dependencies as encoded `FileDescriptorProto`s, under the names
//! the importing files use. [`Reflection::answer`] then decodes one request,
//! looks the name up and writes the echoed fields followed by the prepared
//! bytes.
//!
//! Errors are answered in-band, as `error_response`: NOT_FOUND for unknown
//! files, symbols and extensions, INVALID_ARGUMENT for a request that does
//! not decode or asks nothing. `valid_host` and `original_request` echo the
//! request, as grpc-go does.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use prost_reflect::{DescriptorPool, EnumDescriptor, ExtensionDescriptor, FileDescriptor, MessageDescriptor};
use std::collections::HashMap;

/// `/grpc.reflection.v1.ServerReflection/ServerReflectionInfo`.
pub const V1: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
/// `/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo`.
pub const V1ALPHA: &str = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";

/// The engine's built-in files (`grpc/health/v1/health.proto`,
/// `grpc/reflection/v1/reflection.proto`,
/// `grpc/reflection/v1alpha/reflection.proto`) as an encoded
/// `FileDescriptorSet`, compiled from the sources next to it; the tests
/// crate checks that it is up to date.
pub const BUILTIN_DESCRIPTORS: &[u8] = include_bytes!("builtin/descriptors.bin");

/// gRPC status codes used in `error_response`.
const INVALID_ARGUMENT: i32 = 3;
const NOT_FOUND: i32 = 5;

/// `ServerReflectionResponse` field numbers of the prepared answers.
const FILE_DESCRIPTOR_RESPONSE: u32 = 4;
const LIST_SERVICES_RESPONSE: u32 = 6;

// ----------------------------------------------------------------------------
// Messages of grpc/reflection/v1/reflection.proto (v1alpha: same numbers).
// ----------------------------------------------------------------------------

/// `ServerReflectionRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ServerReflectionRequest {
    #[prost(string, tag = "1")]
    pub host: String,
    #[prost(oneof = "MessageRequest", tags = "3, 4, 5, 6, 7")]
    pub message_request: Option<MessageRequest>,
}

/// `ServerReflectionRequest.message_request`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum MessageRequest {
    #[prost(string, tag = "3")]
    FileByFilename(String),
    #[prost(string, tag = "4")]
    FileContainingSymbol(String),
    #[prost(message, tag = "5")]
    FileContainingExtension(ExtensionRequest),
    #[prost(string, tag = "6")]
    AllExtensionNumbersOfType(String),
    #[prost(string, tag = "7")]
    ListServices(String),
}

/// `ExtensionRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExtensionRequest {
    #[prost(string, tag = "1")]
    pub containing_type: String,
    #[prost(int32, tag = "2")]
    pub extension_number: i32,
}

/// `ServerReflectionResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ServerReflectionResponse {
    #[prost(string, tag = "1")]
    pub valid_host: String,
    #[prost(message, optional, tag = "2")]
    pub original_request: Option<ServerReflectionRequest>,
    #[prost(oneof = "MessageResponse", tags = "4, 5, 6, 7")]
    pub message_response: Option<MessageResponse>,
}

/// `ServerReflectionResponse.message_response`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum MessageResponse {
    #[prost(message, tag = "4")]
    FileDescriptorResponse(FileDescriptorResponse),
    #[prost(message, tag = "5")]
    AllExtensionNumbersResponse(ExtensionNumberResponse),
    #[prost(message, tag = "6")]
    ListServicesResponse(ListServiceResponse),
    #[prost(message, tag = "7")]
    ErrorResponse(ErrorResponse),
}

/// `FileDescriptorResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FileDescriptorResponse {
    #[prost(bytes = "bytes", repeated, tag = "1")]
    pub file_descriptor_proto: Vec<Bytes>,
}

/// `ExtensionNumberResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExtensionNumberResponse {
    #[prost(string, tag = "1")]
    pub base_type_name: String,
    #[prost(int32, repeated, tag = "2")]
    pub extension_number: Vec<i32>,
}

/// `ListServiceResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListServiceResponse {
    #[prost(message, repeated, tag = "1")]
    pub service: Vec<ServiceResponse>,
}

/// `ServiceResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ServiceResponse {
    #[prost(string, tag = "1")]
    pub name: String,
}

/// `ErrorResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ErrorResponse {
    #[prost(int32, tag = "1")]
    pub error_code: i32,
    #[prost(string, tag = "2")]
    pub error_message: String,
}

/// A `FileDescriptorSet` with its files left encoded.
#[derive(Clone, PartialEq, prost::Message)]
struct RawFileSet {
    #[prost(bytes = "bytes", repeated, tag = "1")]
    file: Vec<Bytes>,
}

/// The name of a `FileDescriptorProto`, every other field skipped.
#[derive(Clone, PartialEq, prost::Message)]
struct RawFileName {
    #[prost(string, tag = "1")]
    name: String,
}

// ----------------------------------------------------------------------------
// The index.
// ----------------------------------------------------------------------------

/// An index of a plan's descriptors (plus the engine's built-in services)
/// by file name and by symbol.
pub struct Reflection {
    pool: DescriptorPool,
    /// Per file (by pool index): `file_descriptor_response` (field 4 of
    /// the response, tag and length included) carrying the file and its
    /// transitive dependencies.
    answers: Vec<Bytes>,
    /// Fully-qualified symbol (services, methods, messages,
    /// fields, oneofs, enums, enum values, extensions) to file index.
    symbols: HashMap<Box<str>, usize>,
    /// `list_services_response` (field 6, tag and length included).
    services: Bytes,
}

impl Reflection {
    /// `descriptors` is an encoded `google.protobuf.FileDescriptorSet` (the
    /// plan's). Never fails: descriptors that do not decode give an index
    /// with the built-in services only.
    pub fn new(descriptors: &[u8]) -> Reflection {
        let mut pool = match DescriptorPool::decode(descriptors) {
            Ok(pool) => pool,
            Err(e) => {
                tracing::warn!(
                    "reflection: the plan's descriptors do not load ({e}); only built-in services are described"
                );
                DescriptorPool::new()
            }
        };
        add_builtins(&mut pool);
        let answers = pool.files().map(|f| file_answer(&f)).collect();
        let mut symbols = HashMap::new();
        for file in pool.files() {
            index_file(&file, &mut symbols);
        }
        let mut names: Vec<String> = pool.services().map(|s| s.full_name().to_string()).collect();
        names.sort();
        names.dedup();
        let list = ListServiceResponse { service: names.into_iter().map(|name| ServiceResponse { name }).collect() };
        let services = field(LIST_SERVICES_RESPONSE, &list.encode_to_vec());
        Reflection { pool, answers, symbols, services }
    }

    /// The services `list_services` names, sorted.
    pub fn service_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.pool.services().map(|s| s.full_name().to_string()).collect();
        names.sort();
        names.dedup();
        names
    }

    /// Answers one `ServerReflectionRequest` (encoded, unframed) with an
    /// encoded `ServerReflectionResponse` (unframed).
    pub fn answer(&self, request: &[u8]) -> Bytes {
        let request = match ServerReflectionRequest::decode(request) {
            Ok(r) => r,
            Err(e) => {
                return error(
                    ServerReflectionResponse::default(),
                    INVALID_ARGUMENT,
                    format!("ServerReflectionRequest does not decode: {e}"),
                )
            }
        };
        let head = ServerReflectionResponse {
            valid_host: request.host.clone(),
            original_request: Some(request.clone()),
            message_response: None,
        };
        let Some(message) = request.message_request else {
            return error(head, INVALID_ARGUMENT, "the reflection request asks for nothing".into());
        };
        match message {
            MessageRequest::ListServices(_) => prepared(head, &self.services),
            MessageRequest::FileByFilename(name) => match self.pool.get_file_by_name(&name) {
                Some(file) => self.file(head, file.index()),
                None => error(head, NOT_FOUND, format!("file not found: {name}")),
            },
            MessageRequest::FileContainingSymbol(symbol) => match self.symbols.get(symbol.as_str()) {
                Some(&file) => self.file(head, file),
                None => error(head, NOT_FOUND, format!("symbol not found: {symbol}")),
            },
            MessageRequest::FileContainingExtension(ext) => {
                let Some(message) = self.pool.get_message_by_name(&ext.containing_type) else {
                    return error(head, NOT_FOUND, format!("type not found: {}", ext.containing_type));
                };
                let found = u32::try_from(ext.extension_number).ok().and_then(|n| message.get_extension(n));
                match found {
                    Some(extension) => self.file(head, extension.parent_file().index()),
                    None => error(
                        head,
                        NOT_FOUND,
                        format!("extension not found: {} of {}", ext.extension_number, ext.containing_type),
                    ),
                }
            }
            MessageRequest::AllExtensionNumbersOfType(name) => match self.pool.get_message_by_name(&name) {
                Some(message) => {
                    let mut numbers: Vec<i32> = message.extensions().map(|e| e.number() as i32).collect();
                    numbers.sort_unstable();
                    let mut response = head;
                    response.message_response =
                        Some(MessageResponse::AllExtensionNumbersResponse(ExtensionNumberResponse {
                            base_type_name: name,
                            extension_number: numbers,
                        }));
                    Bytes::from(response.encode_to_vec())
                }
                None => error(head, NOT_FOUND, format!("type not found: {name}")),
            },
        }
    }

    fn file(&self, head: ServerReflectionResponse, index: usize) -> Bytes {
        match self.answers.get(index) {
            Some(answer) => prepared(head, answer),
            None => error(head, NOT_FOUND, "file not found".into()),
        }
    }
}

/// Adds each built-in file the pool has no file of that name for; a file
/// whose symbols clash with the plan's is left out.
fn add_builtins(pool: &mut DescriptorPool) {
    let set = match RawFileSet::decode(BUILTIN_DESCRIPTORS) {
        Ok(set) => set,
        Err(e) => {
            tracing::warn!("reflection: built-in descriptors do not decode: {e}");
            return;
        }
    };
    for raw in set.file {
        let name = RawFileName::decode(raw.clone()).map(|f| f.name).unwrap_or_default();
        if pool.get_file_by_name(&name).is_some() {
            continue;
        }
        if let Err(e) = pool.decode_file_descriptor_proto(raw) {
            tracing::warn!("reflection: built-in {name} is not described: {e}");
        }
    }
}

/// `file_descriptor_response` for `file`: the file first, then its
/// dependencies, depth first, each once.
fn file_answer(file: &FileDescriptor) -> Bytes {
    let mut seen = vec![file.index()];
    let mut order = vec![file.clone()];
    let mut next = 0;
    while let Some(f) = order.get(next).cloned() {
        next += 1;
        for dep in f.dependencies() {
            if !seen.contains(&dep.index()) {
                seen.push(dep.index());
                order.push(dep);
            }
        }
    }
    let response = FileDescriptorResponse {
        file_descriptor_proto: order.iter().map(|f| Bytes::from(f.encode_to_vec())).collect(),
    };
    field(FILE_DESCRIPTOR_RESPONSE, &response.encode_to_vec())
}

/// Every symbol `file` declares, into `symbols`.
fn index_file(file: &FileDescriptor, symbols: &mut HashMap<Box<str>, usize>) {
    let index = file.index();
    let mut add = |name: &str| {
        symbols.entry(name.into()).or_insert(index);
    };
    for service in file.services() {
        add(service.full_name());
        for method in service.methods() {
            add(method.full_name());
        }
    }
    for message in file.messages() {
        index_message(&message, &mut add);
    }
    for e in file.enums() {
        index_enum(&e, &mut add);
    }
    for ext in file.extensions() {
        index_extension(&ext, &mut add);
    }
}

fn index_message(message: &MessageDescriptor, add: &mut impl FnMut(&str)) {
    add(message.full_name());
    for field in message.fields() {
        add(field.full_name());
    }
    for oneof in message.oneofs() {
        add(oneof.full_name());
    }
    for child in message.child_messages() {
        index_message(&child, add);
    }
    for e in message.child_enums() {
        index_enum(&e, add);
    }
    for ext in message.child_extensions() {
        index_extension(&ext, add);
    }
}

fn index_enum(e: &EnumDescriptor, add: &mut impl FnMut(&str)) {
    add(e.full_name());
    for value in e.values() {
        add(value.full_name());
    }
}

fn index_extension(ext: &ExtensionDescriptor, add: &mut impl FnMut(&str)) {
    add(ext.full_name());
}

/// One length-delimited field: tag, length, bytes.
fn field(number: u32, bytes: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(bytes.len() + 10);
    prost::encoding::encode_key(number, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(bytes.len() as u64, &mut out);
    out.put_slice(bytes);
    out.freeze()
}

/// `head` (fields 1 and 2) followed by a prepared `message_response`: the
/// fields in number order, as a single encoding would write them.
fn prepared(head: ServerReflectionResponse, tail: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(head.encoded_len() + tail.len());
    // Writing into a growable buffer cannot fail.
    let _ = head.encode(&mut out);
    out.put_slice(tail);
    out.freeze()
}

fn error(mut head: ServerReflectionResponse, code: i32, message: String) -> Bytes {
    head.message_response =
        Some(MessageResponse::ErrorResponse(ErrorResponse { error_code: code, error_message: message }));
    Bytes::from(head.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_reflect::prost_types::{
        field_descriptor_proto::{Label, Type},
        DescriptorProto, EnumDescriptorProto, EnumValueDescriptorProto, FieldDescriptorProto, FileDescriptorProto,
        FileDescriptorSet, MethodDescriptorProto, ServiceDescriptorProto,
    };

    // -- building descriptors by hand ----------------------------------------

    fn field_of(name: &str, number: i32, ty: Type, type_name: Option<&str>) -> FieldDescriptorProto {
        FieldDescriptorProto {
            name: Some(name.into()),
            number: Some(number),
            label: Some(Label::Optional as i32),
            r#type: Some(ty as i32),
            type_name: type_name.map(str::to_string),
            json_name: Some(name.into()),
            ..Default::default()
        }
    }

    fn message(name: &str, fields: Vec<FieldDescriptorProto>) -> DescriptorProto {
        DescriptorProto { name: Some(name.into()), field: fields, ..Default::default() }
    }

    /// google/protobuf/timestamp.proto, as the plan's set carries it.
    fn timestamp_file() -> FileDescriptorProto {
        FileDescriptorProto {
            name: Some("google/protobuf/timestamp.proto".into()),
            package: Some("google.protobuf".into()),
            message_type: vec![message(
                "Timestamp",
                vec![field_of("seconds", 1, Type::Int64, None), field_of("nanos", 2, Type::Int32, None)],
            )],
            syntax: Some("proto3".into()),
            ..Default::default()
        }
    }

    /// `common/v1/money.proto`: a message and an extendable proto2 type.
    fn money_file() -> FileDescriptorProto {
        let mut extendable = message("Extendable", vec![field_of("id", 1, Type::Int32, None)]);
        extendable.extension_range = vec![prost_reflect::prost_types::descriptor_proto::ExtensionRange {
            start: Some(100),
            end: Some(200),
            options: None,
        }];
        FileDescriptorProto {
            name: Some("common/v1/money.proto".into()),
            package: Some("common.v1".into()),
            message_type: vec![message("Money", vec![field_of("units", 1, Type::Int64, None)]), extendable],
            syntax: Some("proto2".into()),
            ..Default::default()
        }
    }

    /// `things/v1/things.proto`: a service, nested messages, an enum, an
    /// extension; imports money and timestamp.
    fn things_file() -> FileDescriptorProto {
        let mut thing = message(
            "Thing",
            vec![
                field_of("name", 1, Type::String, None),
                field_of("price", 2, Type::Message, Some(".common.v1.Money")),
                field_of("at", 3, Type::Message, Some(".google.protobuf.Timestamp")),
                field_of("kind", 4, Type::Enum, Some(".things.v1.Kind")),
                field_of("part", 5, Type::Message, Some(".things.v1.Thing.Part")),
            ],
        );
        thing.nested_type = vec![message("Part", vec![field_of("label", 1, Type::String, None)])];
        let kind = EnumDescriptorProto {
            name: Some("Kind".into()),
            value: vec![
                EnumValueDescriptorProto { name: Some("KIND_UNSPECIFIED".into()), number: Some(0), options: None },
                EnumValueDescriptorProto { name: Some("KIND_BIG".into()), number: Some(1), options: None },
            ],
            ..Default::default()
        };
        let method = |name: &str| MethodDescriptorProto {
            name: Some(name.into()),
            input_type: Some(".things.v1.Thing".into()),
            output_type: Some(".things.v1.Thing".into()),
            ..Default::default()
        };
        let mut extension = field_of("colour", 150, Type::String, None);
        extension.extendee = Some(".common.v1.Extendable".into());
        FileDescriptorProto {
            name: Some("things/v1/things.proto".into()),
            package: Some("things.v1".into()),
            dependency: vec!["common/v1/money.proto".into(), "google/protobuf/timestamp.proto".into()],
            message_type: vec![thing],
            enum_type: vec![kind],
            service: vec![ServiceDescriptorProto {
                name: Some("Things".into()),
                method: vec![method("Get"), method("Put")],
                ..Default::default()
            }],
            extension: vec![extension],
            syntax: Some("proto2".into()),
            ..Default::default()
        }
    }

    fn plan_descriptors() -> Vec<u8> {
        FileDescriptorSet { file: vec![timestamp_file(), money_file(), things_file()] }.encode_to_vec()
    }

    // -- asking --------------------------------------------------------------

    fn ask(r: &Reflection, message: MessageRequest) -> ServerReflectionResponse {
        let request = ServerReflectionRequest { host: "localhost:50051".into(), message_request: Some(message) };
        let response = ServerReflectionResponse::decode(r.answer(&request.encode_to_vec())).expect("response decodes");
        assert_eq!(response.valid_host, "localhost:50051");
        assert_eq!(response.original_request, Some(request));
        response
    }

    fn file_names(response: &ServerReflectionResponse) -> Vec<String> {
        match &response.message_response {
            Some(MessageResponse::FileDescriptorResponse(files)) => files
                .file_descriptor_proto
                .iter()
                .map(|f| FileDescriptorProto::decode(f.clone()).expect("file decodes").name().to_string())
                .collect(),
            other => panic!("expected files, got {other:?}"),
        }
    }

    fn files_of(r: &Reflection, message: MessageRequest) -> Vec<String> {
        file_names(&ask(r, message))
    }

    fn error_of(response: &ServerReflectionResponse) -> (i32, String) {
        match &response.message_response {
            Some(MessageResponse::ErrorResponse(e)) => (e.error_code, e.error_message.clone()),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    fn symbol(name: &str) -> MessageRequest {
        MessageRequest::FileContainingSymbol(name.into())
    }

    const THINGS_AND_DEPS: [&str; 3] =
        ["things/v1/things.proto", "common/v1/money.proto", "google/protobuf/timestamp.proto"];

    // -- tests ---------------------------------------------------------------

    #[test]
    fn builtin_descriptors_load() {
        let pool = DescriptorPool::decode(BUILTIN_DESCRIPTORS).expect("built-in descriptors decode");
        let names: Vec<String> = pool.files().map(|f| f.name().to_string()).collect();
        assert_eq!(
            names,
            [
                "grpc/health/v1/health.proto",
                "grpc/reflection/v1/reflection.proto",
                "grpc/reflection/v1alpha/reflection.proto"
            ]
        );
        assert!(pool.get_service_by_name("grpc.health.v1.Health").is_some());
        assert!(pool.get_message_by_name("grpc.reflection.v1alpha.ServerReflectionResponse").is_some());
        // The hand-written messages agree with the built-in file.
        let response = pool.get_message_by_name("grpc.reflection.v1.ServerReflectionResponse").unwrap();
        let numbers: Vec<u32> = response.fields().map(|f| f.number()).collect();
        assert_eq!(numbers, [1, 2, 4, 5, 6, 7]);
    }

    #[test]
    fn lists_plan_and_builtin_services() {
        let r = Reflection::new(&plan_descriptors());
        let response = ask(&r, MessageRequest::ListServices(String::new()));
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("expected a list, got {response:?}");
        };
        let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
                "things.v1.Things"
            ]
        );
        assert_eq!(r.service_names(), names);
        // The prepared answer is byte for byte what one encoding gives.
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices("*".into())),
        };
        let whole = ServerReflectionResponse {
            valid_host: String::new(),
            original_request: Some(request.clone()),
            message_response: Some(MessageResponse::ListServicesResponse(list)),
        };
        assert_eq!(r.answer(&request.encode_to_vec()), whole.encode_to_vec());
    }

    #[test]
    fn file_by_filename_carries_dependencies() {
        let r = Reflection::new(&plan_descriptors());
        assert_eq!(files_of(&r, MessageRequest::FileByFilename("things/v1/things.proto".into())), THINGS_AND_DEPS);
        assert_eq!(
            files_of(&r, MessageRequest::FileByFilename("google/protobuf/timestamp.proto".into())),
            ["google/protobuf/timestamp.proto"]
        );
        assert_eq!(
            files_of(&r, MessageRequest::FileByFilename("grpc/health/v1/health.proto".into())),
            ["grpc/health/v1/health.proto"]
        );
        // What comes back builds a pool, the way a client uses it.
        let response = ask(&r, MessageRequest::FileByFilename("things/v1/things.proto".into()));
        let Some(MessageResponse::FileDescriptorResponse(files)) = response.message_response else { unreachable!() };
        let mut pool = DescriptorPool::new();
        for f in files.file_descriptor_proto.iter().rev() {
            pool.decode_file_descriptor_proto(f.clone()).expect("file adds");
        }
        assert!(pool.get_message_by_name("things.v1.Thing.Part").is_some());
    }

    #[test]
    fn file_containing_symbol() {
        let r = Reflection::new(&plan_descriptors());
        for name in [
            "things.v1.Things",
            "things.v1.Things.Get",
            "things.v1.Things.Put",
            "things.v1.Thing",
            "things.v1.Thing.Part",
            "things.v1.Thing.name",
            "things.v1.Thing.Part.label",
            "things.v1.Kind",
            "things.v1.KIND_BIG",
            "things.v1.colour",
        ] {
            assert_eq!(files_of(&r, symbol(name)), THINGS_AND_DEPS, "{name}");
        }
        assert_eq!(files_of(&r, symbol("common.v1.Money")), ["common/v1/money.proto"]);
        assert_eq!(files_of(&r, symbol("google.protobuf.Timestamp")), ["google/protobuf/timestamp.proto"]);
        assert_eq!(files_of(&r, symbol("grpc.health.v1.Health.Watch")), ["grpc/health/v1/health.proto"]);
        assert_eq!(
            files_of(&r, symbol("grpc.health.v1.HealthCheckResponse.ServingStatus")),
            ["grpc/health/v1/health.proto"]
        );
        assert_eq!(
            files_of(&r, symbol("grpc.reflection.v1alpha.ServerReflection")),
            ["grpc/reflection/v1alpha/reflection.proto"]
        );
        assert_eq!(
            files_of(&r, symbol("grpc.reflection.v1.ServerReflection.ServerReflectionInfo")),
            ["grpc/reflection/v1/reflection.proto"]
        );
    }

    #[test]
    fn extensions() {
        let r = Reflection::new(&plan_descriptors());
        let ext = |ty: &str, n: i32| {
            MessageRequest::FileContainingExtension(ExtensionRequest {
                containing_type: ty.into(),
                extension_number: n,
            })
        };
        assert_eq!(files_of(&r, ext("common.v1.Extendable", 150)), THINGS_AND_DEPS);
        assert_eq!(error_of(&ask(&r, ext("common.v1.Extendable", 151))).0, NOT_FOUND);
        assert_eq!(error_of(&ask(&r, ext("common.v1.Extendable", -1))).0, NOT_FOUND);
        assert_eq!(error_of(&ask(&r, ext("common.v1.Nope", 150))).0, NOT_FOUND);

        let response = ask(&r, MessageRequest::AllExtensionNumbersOfType("common.v1.Extendable".into()));
        let expected =
            ExtensionNumberResponse { base_type_name: "common.v1.Extendable".into(), extension_number: vec![150] };
        assert_eq!(response.message_response, Some(MessageResponse::AllExtensionNumbersResponse(expected)));
        let response = ask(&r, MessageRequest::AllExtensionNumbersOfType("common.v1.Money".into()));
        let expected = ExtensionNumberResponse { base_type_name: "common.v1.Money".into(), extension_number: vec![] };
        assert_eq!(response.message_response, Some(MessageResponse::AllExtensionNumbersResponse(expected)));
        let response = ask(&r, MessageRequest::AllExtensionNumbersOfType("common.v1.Nope".into()));
        assert_eq!(error_of(&response).0, NOT_FOUND);
    }

    #[test]
    fn not_found() {
        let r = Reflection::new(&plan_descriptors());
        let (code, message) = error_of(&ask(&r, MessageRequest::FileByFilename("things.proto".into())));
        assert_eq!((code, message.as_str()), (NOT_FOUND, "file not found: things.proto"));
        let (code, message) = error_of(&ask(&r, symbol("things.v1.Nothing")));
        assert_eq!((code, message.as_str()), (NOT_FOUND, "symbol not found: things.v1.Nothing"));
        assert_eq!(error_of(&ask(&r, symbol(""))).0, NOT_FOUND);
        assert_eq!(error_of(&ask(&r, symbol(".things.v1.Thing"))).0, NOT_FOUND);
    }

    #[test]
    fn malformed_requests_get_error_responses() {
        let r = Reflection::new(&plan_descriptors());
        for bad in [&[0xff][..], &[0x1a, 0x05, b'a'], &[0x1a, 0x02, 0xc3, 0x28], &[0x2a, 0x03, 0x08], &[0x0b]] {
            let response = ServerReflectionResponse::decode(r.answer(bad)).expect("response decodes");
            assert_eq!(error_of(&response).0, INVALID_ARGUMENT, "{bad:?}");
            assert_eq!(response.original_request, None);
        }
        // A request that asks nothing: an error, with the request echoed.
        let empty = ServerReflectionRequest { host: "h".into(), message_request: None };
        let response = ServerReflectionResponse::decode(r.answer(&empty.encode_to_vec())).unwrap();
        assert_eq!(error_of(&response).0, INVALID_ARGUMENT);
        assert_eq!(response.valid_host, "h");
        assert_eq!(response.original_request, Some(empty));
    }

    #[test]
    fn undecodable_plan_descriptors_leave_builtins() {
        for bad in [&b"\xff\xff"[..], &FileDescriptorSet { file: vec![things_file()] }.encode_to_vec()] {
            let r = Reflection::new(bad);
            assert_eq!(
                r.service_names(),
                [
                    "grpc.health.v1.Health",
                    "grpc.reflection.v1.ServerReflection",
                    "grpc.reflection.v1alpha.ServerReflection"
                ]
            );
            assert_eq!(files_of(&r, symbol("grpc.health.v1.Health")), ["grpc/health/v1/health.proto"]);
        }
        let r = Reflection::new(&[]);
        assert_eq!(r.service_names().len(), 3);
    }

    #[test]
    fn the_plans_own_files_win() {
        // A plan with its own grpc/health/v1/health.proto (with one more
        // method) keeps it; the other built-ins are still added.
        let own = FileDescriptorProto {
            name: Some("grpc/health/v1/health.proto".into()),
            package: Some("grpc.health.v1".into()),
            message_type: vec![message("HealthCheckRequest", vec![field_of("service", 1, Type::String, None)])],
            service: vec![ServiceDescriptorProto {
                name: Some("Health".into()),
                method: vec![MethodDescriptorProto {
                    name: Some("Probe".into()),
                    input_type: Some(".grpc.health.v1.HealthCheckRequest".into()),
                    output_type: Some(".grpc.health.v1.HealthCheckRequest".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            syntax: Some("proto3".into()),
            ..Default::default()
        };
        let r = Reflection::new(&FileDescriptorSet { file: vec![own.clone()] }.encode_to_vec());
        assert_eq!(files_of(&r, symbol("grpc.health.v1.Health.Probe")), ["grpc/health/v1/health.proto"]);
        assert_eq!(error_of(&ask(&r, symbol("grpc.health.v1.Health.Check"))).0, NOT_FOUND);
        assert_eq!(r.service_names().len(), 3);

        // The same messages under another file name: the built-in file
        // clashes and is left out rather than failing.
        let mut elsewhere = own;
        elsewhere.name = Some("mine/health.proto".into());
        let r = Reflection::new(&FileDescriptorSet { file: vec![elsewhere] }.encode_to_vec());
        assert_eq!(files_of(&r, symbol("grpc.health.v1.Health")), ["mine/health.proto"]);
        assert_eq!(
            error_of(&ask(&r, MessageRequest::FileByFilename("grpc/health/v1/health.proto".into()))).0,
            NOT_FOUND
        );
    }
}
