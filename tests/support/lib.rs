//! Test support: start the real engine on loopback from a case folder, call
//! it with a real gRPC client (tonic, with a pass-through codec so no code
//! generation is needed), or with a raw HTTP/2 client for protocol edge
//! cases that no well-behaved client sends.

use bytes::{Buf, BufMut, Bytes};
use prost_reflect::{DescriptorPool, DynamicMessage};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use wirestub_compiler::{compile, Options};
use wirestub_engine::server::Listeners;
use wirestub_engine::{Config, NoMatch, Server, State};

/// Compiles the bundled example's protos with `rules` (a directory).
pub fn compile_with_rules(rules: &Path) -> wirestub_engine::Plan {
    let options = Options {
        protos: vec![root().join("protos")],
        rules: vec![rules.to_path_buf()],
        protos_only: Vec::new(),
        lenient: false,
    };
    match compile(&options) {
        Ok(o) => o.plan,
        Err(d) => panic!("rules {} do not compile:\n{}", rules.display(), d.render()),
    }
}

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The HTTP/2 stack tests serve with: the native one, unless
/// `WIRESTUB_TEST_HTTP2=h2` asks for the reference.
pub fn stack() -> wirestub_engine::Stack {
    match std::env::var("WIRESTUB_TEST_HTTP2").as_deref() {
        Ok("h2") => wirestub_engine::Stack::H2,
        _ => wirestub_engine::Stack::Native,
    }
}

/// A running engine and the schema to encode requests with.
pub struct TestServer {
    pub addr: std::net::SocketAddr,
    pub pool: DescriptorPool,
    server: Option<Server>,
}

impl TestServer {
    /// Compiles `dir/protos` and `dir/rules` and serves the plan on a free
    /// loopback port. The plan goes through its byte form, as in production.
    pub fn start(dir: &Path, no_match: NoMatch) -> TestServer {
        Self::start_validating(dir, no_match, false)
    }

    /// [`TestServer::start`], checking requests against their protos'
    /// validation rules when `validation` (`--validation on`).
    pub fn start_validating(dir: &Path, no_match: NoMatch, validation: bool) -> TestServer {
        let options = Options {
            protos: vec![dir.join("protos")],
            rules: vec![dir.join("rules")],
            protos_only: Vec::new(),
            lenient: false,
        };
        let output = match compile(&options) {
            Ok(o) => o,
            Err(d) => panic!("case {} does not compile:\n{}", dir.display(), d.render()),
        };
        let bytes = output.plan.to_bytes();
        let plan = wirestub_engine::Plan::from_bytes(&bytes).expect("plan loads");
        Self::serve_configured(plan, no_match, 0, validation)
    }

    /// Serves `plan` on a free loopback port with two workers.
    pub fn serve(plan: wirestub_engine::Plan, no_match: NoMatch) -> TestServer {
        Self::serve_with(plan, no_match, 0)
    }

    /// [`TestServer::serve`] with a journal of `journal` calls (0: none).
    pub fn serve_with(plan: wirestub_engine::Plan, no_match: NoMatch, journal: usize) -> TestServer {
        Self::serve_configured(plan, no_match, journal, false)
    }

    fn serve_configured(
        plan: wirestub_engine::Plan,
        no_match: NoMatch,
        journal: usize,
        validation: bool,
    ) -> TestServer {
        let pool = DescriptorPool::decode(&plan.descriptors[..]).expect("descriptors decode");
        let state = State::new(plan, None, "test".into(), no_match, 2, journal).expect("plan prepares");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let config = Config {
            workers: 2,
            drain_timeout: Duration::from_secs(2),
            stack: stack(),
            validation,
            ..Config::default()
        };
        let listeners = Listeners { plain: Some(listener), tls: None };
        let server = Server::start(listeners, Arc::new(state), config).unwrap();
        TestServer { addr: server.local_addr(), pool, server: Some(server) }
    }

    /// The server's shared state (plan swaps, health, metrics, journal).
    pub fn state(&self) -> Arc<State> {
        self.server.as_ref().expect("running").state().clone()
    }

    /// Stops the server: NOT_SERVING, GOAWAY, drain, join.
    pub fn shutdown(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

/// A pass-through codec: the client sends and receives encoded messages.
#[derive(Clone, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// What a call returned, in a form tests compare easily.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The gRPC status code name, e.g. `OK`, `NOT_FOUND`.
    pub status: String,
    pub message: String,
    /// The response message as protobuf JSON (absent on errors and for
    /// server streams).
    pub body: Option<serde_json::Value>,
    /// The messages of a server stream, as protobuf JSON, in order
    /// (including those received before an error).
    pub bodies: Vec<serde_json::Value>,
    /// Response metadata (headers and trailers, as tonic merges them),
    /// without the protocol's own keys.
    pub metadata: Vec<(String, String)>,
    /// The error's `grpc-status-details-bin`, base64-decoded: an encoded
    /// `google.rpc.Status`, empty for none.
    pub details: Vec<u8>,
}

impl Reply {
    /// A successful unary reply without metadata.
    pub fn ok(body: serde_json::Value) -> Reply {
        Reply {
            status: "OK".into(),
            message: String::new(),
            body: Some(body),
            bodies: Vec::new(),
            metadata: Vec::new(),
            details: Vec::new(),
        }
    }

    pub fn error(s: &tonic::Status) -> Reply {
        Reply {
            status: code_name(s.code()),
            message: s.message().to_string(),
            body: None,
            bodies: Vec::new(),
            metadata: metadata_pairs(s.metadata()),
            details: s.details().to_vec(),
        }
    }
}

/// Response metadata as sorted pairs, without the protocol's own keys.
fn metadata_pairs(m: &tonic::metadata::MetadataMap) -> Vec<(String, String)> {
    let keep =
        |k: &str| !matches!(k, "content-type" | "grpc-status" | "grpc-message" | "date" | "grpc-accept-encoding");
    let mut v: Vec<(String, String)> = m
        .clone()
        .into_headers()
        .iter()
        .filter(|(k, _)| keep(k.as_str()))
        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    v.sort();
    v
}

/// The canonical name of a tonic status code.
pub fn code_name(code: tonic::Code) -> String {
    wirestub_plan::STATUS_NAMES[code as usize].to_string()
}

/// Makes unary calls with tonic. Clones share one HTTP/2 connection.
#[derive(Clone)]
pub struct Client {
    grpc: tonic::client::Grpc<tonic::transport::Channel>,
    pool: DescriptorPool,
}

impl Client {
    pub async fn connect(server: &TestServer) -> Client {
        let channel = tonic::transport::Endpoint::from_shared(server.url()).unwrap().connect().await.unwrap();
        Client { grpc: tonic::client::Grpc::new(channel), pool: server.pool.clone() }
    }

    /// Encodes `request` (protobuf JSON) as the method's input type.
    pub fn encode(&self, method: &str, request: &serde_json::Value) -> Bytes {
        let (service, name) = method.split_once('/').expect("method is Service/Method");
        let svc = self.pool.get_service_by_name(service).unwrap_or_else(|| panic!("no service {service}"));
        let m = svc.methods().find(|m| m.name() == name).unwrap_or_else(|| panic!("no method {method}"));
        let msg = DynamicMessage::deserialize(m.input(), request.clone()).expect("request JSON fits the input type");
        Bytes::from(prost::Message::encode_to_vec(&msg))
    }

    /// Calls `method` (`pkg.Service/Method`) with an encoded request.
    pub async fn call_raw(
        &mut self,
        method: &str,
        request: Bytes,
        metadata: &[(String, String)],
        timeout: Option<Duration>,
    ) -> Result<tonic::Response<Bytes>, tonic::Status> {
        let mut req = tonic::Request::new(request);
        for (k, v) in metadata {
            req.metadata_mut()
                .insert(tonic::metadata::MetadataKey::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        if let Some(t) = timeout {
            req.set_timeout(t);
        }
        self.grpc.ready().await.unwrap();
        let path = format!("/{method}").parse().unwrap();
        self.grpc.unary(req, path, RawCodec).await
    }

    /// Calls `method` with a JSON request and decodes the reply to JSON.
    pub async fn call(
        &mut self,
        method: &str,
        request: &serde_json::Value,
        metadata: &[(String, String)],
        timeout: Option<Duration>,
    ) -> Reply {
        let bytes = self.encode(method, request);
        let output = self.output_type(method);
        let result = self.call_raw(method, bytes, metadata, timeout).await;
        match result {
            Ok(resp) => {
                let msg = DynamicMessage::decode(output, resp.get_ref().clone()).expect("response decodes");
                Reply {
                    status: "OK".into(),
                    message: String::new(),
                    body: Some(serde_json::to_value(&msg).unwrap()),
                    bodies: Vec::new(),
                    metadata: metadata_pairs(resp.metadata()),
                    details: Vec::new(),
                }
            }
            Err(s) => Reply::error(&s),
        }
    }

    /// Calls any kind of method: `requests` are sent as the request stream
    /// (exactly one for unary and server-streaming methods); a server
    /// stream's messages are collected in `bodies`.
    pub async fn call_any(
        &mut self,
        method: &str,
        requests: &[serde_json::Value],
        metadata: &[(String, String)],
        timeout: Option<Duration>,
    ) -> Reply {
        let desc = self.method(method);
        if !desc.is_client_streaming() && !desc.is_server_streaming() {
            return self.call(method, requests.first().unwrap_or(&serde_json::Value::Null), metadata, timeout).await;
        }
        let encoded: Vec<Bytes> = requests.iter().map(|r| self.encode(method, r)).collect();
        let output = desc.output();
        let path: http::uri::PathAndQuery = format!("/{method}").parse().unwrap();
        fn build<T>(body: T, metadata: &[(String, String)], timeout: Option<Duration>) -> tonic::Request<T> {
            let mut req = tonic::Request::new(body);
            for (k, v) in metadata {
                req.metadata_mut()
                    .insert(tonic::metadata::MetadataKey::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
            }
            if let Some(t) = timeout {
                req.set_timeout(t);
            }
            req
        }
        self.grpc.ready().await.unwrap();
        let decode = |b: Bytes| {
            serde_json::to_value(DynamicMessage::decode(output.clone(), b).expect("response decodes")).unwrap()
        };
        let ok = |body, bodies, metadata| Reply {
            status: "OK".into(),
            message: String::new(),
            body,
            bodies,
            metadata,
            details: Vec::new(),
        };
        if !desc.is_server_streaming() {
            let stream = futures_util::stream::iter(encoded);
            return match self.grpc.client_streaming(build(stream, metadata, timeout), path, RawCodec).await {
                Ok(resp) => ok(Some(decode(resp.get_ref().clone())), Vec::new(), metadata_pairs(resp.metadata())),
                Err(s) => Reply::error(&s),
            };
        }
        let response = if desc.is_client_streaming() {
            self.grpc.streaming(build(futures_util::stream::iter(encoded), metadata, timeout), path, RawCodec).await
        } else {
            let one = encoded.into_iter().next().unwrap_or_default();
            self.grpc.server_streaming(build(one, metadata, timeout), path, RawCodec).await
        };
        let mut stream = match response {
            Ok(r) => r.into_inner(),
            Err(s) => return Reply::error(&s),
        };
        let mut bodies = Vec::new();
        loop {
            match stream.message().await {
                Ok(Some(m)) => bodies.push(decode(m)),
                Ok(None) => {
                    let trailers = stream.trailers().await.ok().flatten().unwrap_or_default();
                    return ok(None, bodies, metadata_pairs(&trailers));
                }
                Err(s) => {
                    let mut reply = Reply::error(&s);
                    reply.bodies = bodies;
                    return reply;
                }
            }
        }
    }

    pub fn method(&self, method: &str) -> prost_reflect::MethodDescriptor {
        let (service, name) = method.split_once('/').unwrap();
        self.pool
            .get_service_by_name(service)
            .and_then(|s| s.methods().find(|m| m.name() == name))
            .unwrap_or_else(|| panic!("no method {method}"))
    }

    pub fn output_type(&self, method: &str) -> prost_reflect::MessageDescriptor {
        self.method(method).output()
    }

    /// Normalises expected JSON through the message type, so that it
    /// compares equal with what the decoder prints (int64 as strings,
    /// enums by name, defaults omitted).
    pub fn canonical(&self, method: &str, json: &serde_json::Value) -> serde_json::Value {
        let msg = DynamicMessage::deserialize(self.output_type(method), json.clone()).expect("expected body fits");
        serde_json::to_value(&msg).unwrap()
    }

    /// Decodes an encoded `google.rpc.Status` (as found in
    /// `grpc-status-details-bin`) to JSON with the plan's descriptors, which
    /// always hold google.rpc.
    pub fn status_json(&self, bytes: &[u8]) -> serde_json::Value {
        let desc = self.pool.get_message_by_name("google.rpc.Status").expect("google.rpc.Status in the plan");
        match DynamicMessage::decode(desc, bytes) {
            Ok(m) => serde_json::to_value(&m).unwrap(),
            Err(e) => serde_json::Value::String(format!("<not a google.rpc.Status: {e}>")),
        }
    }

    /// Normalises an expected `google.rpc.Status` (details as JSON `Any`s)
    /// as [`Client::canonical`] does bodies.
    pub fn canonical_status(&self, json: &serde_json::Value) -> serde_json::Value {
        let desc = self.pool.get_message_by_name("google.rpc.Status").expect("google.rpc.Status in the plan");
        let msg = DynamicMessage::deserialize(desc, json.clone()).expect("expected details fit google.rpc.Status");
        serde_json::to_value(&msg).unwrap()
    }
}

/// What a raw HTTP/2 exchange returned.
#[derive(Debug)]
pub struct RawReply {
    pub http_status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub trailers: Option<http::HeaderMap>,
}

impl RawReply {
    /// grpc-status from the trailers, or from the headers of a trailers-only
    /// response.
    pub fn grpc_status(&self) -> Option<u8> {
        let v =
            self.trailers.as_ref().and_then(|t| t.get("grpc-status")).or_else(|| self.headers.get("grpc-status"))?;
        v.to_str().ok()?.parse().ok()
    }

    pub fn grpc_message(&self) -> String {
        self.trailers
            .as_ref()
            .and_then(|t| t.get("grpc-message"))
            .or_else(|| self.headers.get("grpc-message"))
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default()
    }
}

/// Sends one request on a fresh HTTP/2 connection with full control over
/// headers and body chunks, and collects the reply.
pub async fn raw_call(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    chunks: Vec<Bytes>,
) -> RawReply {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.unwrap();
    let mut req = http::Request::builder().method("POST").uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let end = chunks.is_empty();
    let (response, mut send) = client.send_request(req.body(()).unwrap(), end).unwrap();
    let n = chunks.len();
    for (i, c) in chunks.into_iter().enumerate() {
        // The server may answer (and reset the stream) before reading it
        // all; later sends then fail, which is fine.
        if send.send_data(c, i + 1 == n).is_err() {
            break;
        }
    }
    let response = response.await.unwrap();
    let (parts, mut body) = response.into_parts();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.unwrap();
    RawReply { http_status: parts.status.as_u16(), headers: parts.headers, body: Bytes::from(data), trailers }
}

/// Opens one gRPC call on a fresh HTTP/2 connection without sending
/// anything yet: the caller drives the request stream frame by frame.
pub async fn open_call(addr: std::net::SocketAddr, path: &str) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    client.send_request(req, false).unwrap()
}

/// Frames a message as one gRPC message.
pub fn frame(message: &[u8]) -> Bytes {
    Bytes::from(wirestub_plan::grpc_frame(message))
}

/// Compares `actual` with the file `expected`, or rewrites the file when
/// UPDATE_EXPECT is set.
pub fn assert_golden(expected: &Path, actual: &str) {
    if std::env::var_os("UPDATE_EXPECT").is_some() {
        std::fs::write(expected, actual).unwrap();
        return;
    }
    let want = std::fs::read_to_string(expected)
        .unwrap_or_else(|_| panic!("missing {}; run with UPDATE_EXPECT=1 to create it", expected.display()));
    if want != actual {
        panic!(
            "{} differs (run with UPDATE_EXPECT=1 to accept):\n--- expected\n{want}\n--- actual\n{actual}",
            expected.display()
        );
    }
}
