//! The engine's built-in services: gRPC health checking and server
//! reflection.
//!
//! - The descriptor set the engine embeds (`engine/src/observe/builtin/descriptors.bin`)
//!   is the compilation of the protos next to it; `UPDATE_EXPECT=1` rewrites
//!   it after a change to them.
//! - Reflection over the bundled example's descriptors, straight through
//!   `Reflection::answer`.
//! - Health and reflection over loopback, against the real engine serving
//!   the bundled example, with a real gRPC client.

use bytes::Bytes;
use prost::Message;
use prost_reflect::DescriptorPool;
use std::path::PathBuf;
use std::time::Duration;
use wirestub_engine::observe::health::ServingStatus;
use wirestub_engine::observe::reflection::{
    ExtensionRequest, MessageRequest, MessageResponse, Reflection, ServerReflectionRequest, ServerReflectionResponse,
};
use wirestub_engine::NoMatch;
use wirestub_tests::*;

const BUILTIN_FILES: [&str; 3] =
    ["grpc/health/v1/health.proto", "grpc/reflection/v1/reflection.proto", "grpc/reflection/v1alpha/reflection.proto"];

const BUILTIN_SERVICES: [&str; 3] =
    ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"];

fn builtin_dir() -> PathBuf {
    root().join("engine/src/observe/builtin")
}

#[test]
fn builtin_descriptors_are_up_to_date() {
    let dir = builtin_dir();
    let mut compiler = protox::Compiler::new([&dir]).expect("include path");
    compiler.include_imports(true).include_source_info(false);
    compiler.open_files(BUILTIN_FILES).unwrap_or_else(|e| panic!("built-in protos do not compile: {e:?}"));
    let compiled = compiler.encode_file_descriptor_set();
    let path = dir.join("descriptors.bin");
    if std::env::var_os("UPDATE_EXPECT").is_some() {
        std::fs::write(&path, &compiled).unwrap();
        return;
    }
    let checked_in = std::fs::read(&path).unwrap_or_default();
    assert!(
        checked_in == compiled,
        "{} is not the compilation of the protos next to it (run with UPDATE_EXPECT=1 to rewrite it)",
        path.display()
    );
    assert_eq!(wirestub_engine::observe::reflection::BUILTIN_DESCRIPTORS, &compiled[..]);
}

// ----------------------------------------------------------------------------
// Reflection over the bundled example, in process.
// ----------------------------------------------------------------------------

fn example_descriptors() -> Vec<u8> {
    let options = wirestub_compiler::Options {
        protos: vec![root().join("protos")],
        rules: vec![root().join("rules")],
        protos_only: Vec::new(),
        lenient: false,
    };
    match wirestub_compiler::compile(&options) {
        Ok(o) => o.plan.descriptors,
        Err(d) => panic!("the bundled example does not compile:\n{}", d.render()),
    }
}

fn ask(r: &Reflection, message: MessageRequest) -> ServerReflectionResponse {
    let request = ServerReflectionRequest { host: String::new(), message_request: Some(message) };
    ServerReflectionResponse::decode(r.answer(&request.encode_to_vec())).expect("response decodes")
}

/// The files of a `file_descriptor_response`, in order.
fn files(response: &ServerReflectionResponse) -> Vec<prost_reflect::prost_types::FileDescriptorProto> {
    match &response.message_response {
        Some(MessageResponse::FileDescriptorResponse(f)) => f
            .file_descriptor_proto
            .iter()
            .map(|b| prost_reflect::prost_types::FileDescriptorProto::decode(b.clone()).expect("file decodes"))
            .collect(),
        other => panic!("expected files, got {other:?}"),
    }
}

/// A pool built from the files, dependencies resolved by name only, as a
/// reflection client does it.
fn pool_of(response: &ServerReflectionResponse) -> DescriptorPool {
    let set = prost_reflect::prost_types::FileDescriptorSet { file: files(response) };
    DescriptorPool::from_file_descriptor_set(set).expect("the files form a complete pool")
}

#[test]
fn reflection_describes_the_example() {
    let r = Reflection::new(&example_descriptors());

    let response = ask(&r, MessageRequest::ListServices(String::new()));
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("expected a list: {response:?}")
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    let mut expected = vec!["chat.v1.Chat", "helloworld.Greeter", "shop.v1.Catalog"];
    expected.extend(BUILTIN_SERVICES);
    expected.sort();
    assert_eq!(names, expected);

    // A method's file, with every dependency, well-known types included,
    // under the names the imports use.
    let response = ask(&r, MessageRequest::FileContainingSymbol("shop.v1.Catalog.GetProduct".into()));
    let got = files(&response);
    assert_eq!(got[0].name(), "shop/v1/catalog.proto");
    let mut names: Vec<&str> = got.iter().map(|f| f.name()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "common/money.proto",
            "google/protobuf/duration.proto",
            "google/protobuf/struct.proto",
            "google/protobuf/timestamp.proto",
            "google/protobuf/wrappers.proto",
            "shop/v1/catalog.proto",
        ]
    );
    for f in &got {
        for dep in &f.dependency {
            assert!(got.iter().any(|g| g.name() == dep), "{} imports {dep}, which is missing", f.name());
        }
    }
    let pool = pool_of(&response);
    let method = pool.get_service_by_name("shop.v1.Catalog").unwrap().methods().find(|m| m.name() == "GetProduct");
    assert_eq!(method.unwrap().output().full_name(), "shop.v1.Product");

    // By file name, and by message, enum and field.
    let by_name = ask(&r, MessageRequest::FileByFilename("shop/v1/catalog.proto".into()));
    assert_eq!(files(&by_name), got);
    for symbol in ["shop.v1.Catalog", "shop.v1.Product", "shop.v1.Category", "shop.v1.Product.attributes"] {
        assert_eq!(files(&ask(&r, MessageRequest::FileContainingSymbol(symbol.into()))), got, "{symbol}");
    }
    let money = ask(&r, MessageRequest::FileContainingSymbol("common.Money".into()));
    assert_eq!(files(&money).iter().map(|f| f.name()).collect::<Vec<_>>(), ["common/money.proto"]);
    let greeter = ask(&r, MessageRequest::FileContainingSymbol("helloworld.Greeter.SayHello".into()));
    assert_eq!(files(&greeter).iter().map(|f| f.name()).collect::<Vec<_>>(), ["helloworld.proto"]);

    // The built-in services are described too.
    let health = ask(&r, MessageRequest::FileContainingSymbol("grpc.health.v1.Health".into()));
    assert!(pool_of(&health).get_message_by_name("grpc.health.v1.HealthCheckResponse").is_some());

    // Unknown names: NOT_FOUND, in-band.
    for message in [
        MessageRequest::FileByFilename("catalog.proto".into()),
        MessageRequest::FileContainingSymbol("shop.v1.Catalog.Nope".into()),
        MessageRequest::FileContainingExtension(ExtensionRequest {
            containing_type: "shop.v1.Product".into(),
            extension_number: 100,
        }),
        MessageRequest::AllExtensionNumbersOfType("shop.v1.Nope".into()),
    ] {
        match ask(&r, message.clone()).message_response {
            Some(MessageResponse::ErrorResponse(e)) => assert_eq!(e.error_code, 5, "{message:?}"),
            other => panic!("{message:?}: expected NOT_FOUND, got {other:?}"),
        }
    }
}

// ----------------------------------------------------------------------------
// Over loopback, against the real engine.
// ----------------------------------------------------------------------------

const CHECK: &str = "/grpc.health.v1.Health/Check";
const WATCH: &str = "/grpc.health.v1.Health/Watch";
const TIMEOUT: Duration = Duration::from_secs(10);

/// An encoded `grpc.health.v1.HealthCheckRequest`.
fn health_request(service: &str) -> Bytes {
    let mut out = Vec::new();
    prost::encoding::string::encode(1, &service.to_string(), &mut out);
    Bytes::from(out)
}

async fn grpc(server: &TestServer) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(server.url()).unwrap().connect().await.unwrap();
    tonic::client::Grpc::new(channel)
}

async fn check(
    client: &mut tonic::client::Grpc<tonic::transport::Channel>,
    service: &str,
) -> Result<ServingStatus, tonic::Status> {
    client.ready().await.unwrap();
    let response = client.unary(tonic::Request::new(health_request(service)), CHECK.parse().unwrap(), RawCodec).await?;
    Ok(ServingStatus::decode(response.get_ref()).expect("a HealthCheckResponse"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_over_the_wire() {
    let server = TestServer::start(&root(), NoMatch::NotFound);
    let mut client = grpc(&server).await;
    assert_eq!(check(&mut client, "").await.unwrap(), ServingStatus::Serving);
    assert_eq!(check(&mut client, "helloworld.Greeter").await.unwrap(), ServingStatus::Serving);
    assert_eq!(check(&mut client, "shop.v1.Catalog").await.unwrap(), ServingStatus::Serving);
    let err = check(&mut client, "nope.Svc").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");

    // Watch: the current status at once; NOT_SERVING once the server drains.
    client.ready().await.unwrap();
    let request = tonic::Request::new(health_request("helloworld.Greeter"));
    let mut stream = client.server_streaming(request, WATCH.parse().unwrap(), RawCodec).await.unwrap().into_inner();
    let first = tokio::time::timeout(TIMEOUT, stream.message()).await.expect("first status in time");
    assert_eq!(ServingStatus::decode(&first.unwrap().unwrap()), Some(ServingStatus::Serving));

    client.ready().await.unwrap();
    let request = tonic::Request::new(health_request("nope.Svc"));
    let mut unknown = client.server_streaming(request, WATCH.parse().unwrap(), RawCodec).await.unwrap().into_inner();
    let first = tokio::time::timeout(TIMEOUT, unknown.message()).await.expect("first status in time");
    assert_eq!(ServingStatus::decode(&first.unwrap().unwrap()), Some(ServingStatus::ServiceUnknown));

    let stopping = tokio::task::spawn_blocking(move || server.stop());
    let next = tokio::time::timeout(TIMEOUT, stream.message()).await.expect("a status once draining");
    assert_eq!(ServingStatus::decode(&next.unwrap().unwrap()), Some(ServingStatus::NotServing));
    drop((stream, unknown));
    stopping.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_over_the_wire() {
    let server = TestServer::start(&root(), NoMatch::NotFound);
    let mut client = grpc(&server).await;
    for path in [wirestub_engine::observe::reflection::V1, wirestub_engine::observe::reflection::V1ALPHA] {
        let requests: Vec<Bytes> = [
            MessageRequest::ListServices(String::new()),
            MessageRequest::FileContainingSymbol("helloworld.Greeter".into()),
            MessageRequest::FileByFilename("nope.proto".into()),
        ]
        .into_iter()
        .map(|m| {
            let r = ServerReflectionRequest { host: "localhost".into(), message_request: Some(m) };
            Bytes::from(r.encode_to_vec())
        })
        .collect();
        client.ready().await.unwrap();
        let request = tonic::Request::new(futures_util::stream::iter(requests.clone()));
        let mut stream = client.streaming(request, path.parse().unwrap(), RawCodec).await.unwrap().into_inner();
        let mut answers = Vec::new();
        while let Some(m) = tokio::time::timeout(TIMEOUT, stream.message()).await.expect("answers in time").unwrap() {
            answers.push(ServerReflectionResponse::decode(m).expect("response decodes"));
        }
        assert_eq!(answers.len(), 3, "{path}");
        for (a, r) in answers.iter().zip(&requests) {
            assert_eq!(a.valid_host, "localhost");
            assert_eq!(a.original_request.as_ref().map(|o| o.encode_to_vec()), Some(r.to_vec()));
        }
        let Some(MessageResponse::ListServicesResponse(list)) = &answers[0].message_response else {
            panic!("{path}: expected a list: {:?}", answers[0])
        };
        assert!(list.service.iter().any(|s| s.name == "helloworld.Greeter"), "{list:?}");
        assert_eq!(files(&answers[1])[0].name(), "helloworld.proto");
        assert!(
            matches!(&answers[2].message_response, Some(MessageResponse::ErrorResponse(e)) if e.error_code == 5),
            "{:?}",
            answers[2]
        );
    }
}
