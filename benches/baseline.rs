//! The tonic baseline server of the end-to-end load bench.
//!
//! A deliberately *typical* tonic server: code generated from `protos/` by
//! `build.rs` (protox + tonic-prost-build), a full prost decode of every
//! request and encode of every response, mimalloc as the global allocator,
//! `TCP_NODELAY` on every accepted socket and a multi-thread tokio runtime.
//! It answers `helloworld.Greeter/SayHello` and `shop.v1.Catalog/*` with the
//! same responses as the example rules in `rules/`, and `bench.v1.Bench/*`
//! with the same bytes as the bench rules in `benches/plan/rules/`,
//! hand-written in Rust (the templated reply is built per call with
//! `format!`), so `benches/load.py` can compare the engine against it in the
//! same run.
//!
//! Known differences from the engine: the `age: 42` case of `SayHello`
//! answers "The answer" but without the `x-answer` trailing metadata (tonic
//! has no plain way to add trailers to a successful unary response), and
//! tonic percent-encodes the spaces of a `grpc-message` (`%20`), which the
//! engine sends as they are; both decode to the same text.
//!
//! Usage: `baseline [--listen HOST:PORT] [--workers N]`
//! (defaults `127.0.0.1:0` and 1). On start it prints exactly one line,
//! `baseline listening on HOST:PORT`, to stdout; SIGINT or SIGTERM stops it.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Generated code for `protos/common/money.proto`.
pub mod common {
    tonic::include_proto!("common");
}

/// Generated code for `protos/helloworld.proto`.
pub mod helloworld {
    tonic::include_proto!("helloworld");
}

/// Generated code for `protos/shop/v1/catalog.proto`.
pub mod shop {
    /// Version 1 of the shop API.
    pub mod v1 {
        tonic::include_proto!("shop.v1");
    }
}

/// Generated code for `benches/plan/protos/bench/v1/bench.proto`.
pub mod bench {
    /// Version 1 of the bench API.
    pub mod v1 {
        tonic::include_proto!("bench.v1");
    }
}

use helloworld::greeter_server::{Greeter, GreeterServer};
use helloworld::{HelloReply, HelloRequest};
use shop::v1::catalog_server::{Catalog, CatalogServer};
use shop::v1::{Category, GetProductRequest, Locale, Product, SearchRequest, SearchResponse};

use bench::v1::bench_server::{Bench, BenchServer};
use bench::v1::{BenchReply, BenchRequest};

/// `helloworld.Greeter`, mirroring `rules/helloworld.greeter.sayhello.yaml`.
#[derive(Debug, Default)]
struct GreeterService;

fn metadata_is(metadata: &MetadataMap, key: &str, value: &str) -> bool {
    metadata.get(key).is_some_and(|v| v.as_bytes() == value.as_bytes())
}

fn reply(message: &str) -> Response<HelloReply> {
    Response::new(HelloReply { message: message.to_owned() })
}

#[tonic::async_trait]
impl Greeter for GreeterService {
    async fn say_hello(&self, request: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        let (metadata, _, req) = request.into_parts();
        // Highest priority first, then file order among equal priorities.
        if req.name == "admin" && metadata_is(&metadata, "x-role", "root") {
            let mut response = reply("Welcome back, root");
            response.metadata_mut().insert("x-served-by", MetadataValue::from_static("wirestub"));
            return Ok(response);
        }
        if req.name == "Tom" {
            return Ok(reply("Hi Tom (from mock)"));
        }
        if req.name == "blocked" {
            let mut trailers = MetadataMap::new();
            trailers.insert("error-id", MetadataValue::from_static("E123"));
            return Err(Status::with_metadata(
                tonic::Code::PermissionDenied,
                "blocked users may not say hello",
                trailers,
            ));
        }
        if req.age == Some(42) {
            return Ok(reply("The answer"));
        }
        Ok(reply("Hello, stranger"))
    }
}

/// `shop.v1.Catalog`, mirroring `rules/shop.yaml`.
#[derive(Debug, Default)]
struct CatalogService;

fn fallback_product() -> Product {
    Product {
        sku: "UNKNOWN".to_owned(),
        title: "Mystery box".to_owned(),
        category: Category::Games as i32,
        ..Product::default()
    }
}

fn french_book() -> Product {
    use prost_types::value::Kind;
    use prost_types::{ListValue, Struct, Value};
    let value = |kind| Value { kind: Some(kind) };
    let fields = BTreeMap::from([
        ("shelf".to_owned(), value(Kind::StringValue("B2".to_owned()))),
        ("signed".to_owned(), value(Kind::BoolValue(false))),
        (
            "editions".to_owned(),
            value(Kind::ListValue(ListValue {
                values: vec![value(Kind::NumberValue(1943.0)), value(Kind::NumberValue(1946.0))],
            })),
        ),
    ]);
    Product {
        sku: "BOOK-1".to_owned(),
        title: "Le Petit Prince".to_owned(),
        category: Category::Books as i32,
        price: Some(common::Money { currency_code: "EUR".to_owned(), units: 12, nanos: 500_000_000 }),
        tags: vec!["classic".to_owned(), "fr".to_owned()],
        attributes: HashMap::from([("binding".to_owned(), "paperback".to_owned())]),
        // 1943-04-06T00:00:00Z
        released_at: Some(prost_types::Timestamp { seconds: -843_868_800, nanos: 0 }),
        warranty: Some(prost_types::Duration { seconds: 0, nanos: 0 }),
        stock: Some(3),
        extra: Some(Struct { fields }),
        thumbnail: Vec::new(),
        views: 9_007_199_254_740_993,
        rating: 4.8,
    }
}

fn game(sku: &str, title: &str) -> Product {
    Product { sku: sku.to_owned(), title: title.to_owned(), category: Category::Games as i32, ..Product::default() }
}

#[tonic::async_trait]
impl Catalog for CatalogService {
    async fn get_product(&self, request: Request<GetProductRequest>) -> Result<Response<Product>, Status> {
        let (metadata, _, req) = request.into_parts();
        // The file-level `match` gate: only fallbacks answer when it fails.
        if metadata_is(&metadata, "x-tenant", "acme") {
            let language = req.locale.as_ref().map(|l: &Locale| l.language.as_str());
            if req.sku == "BOOK-1" && language == Some("fr") {
                return Ok(Response::new(french_book()));
            }
            if req.sku == "BOOK-1" {
                return Ok(Response::new(Product {
                    sku: "BOOK-1".to_owned(),
                    title: "The Little Prince".to_owned(),
                    category: Category::Books as i32,
                    price: Some(common::Money { currency_code: "USD".to_owned(), units: 14, nanos: 0 }),
                    ..Product::default()
                }));
            }
            if req.sku == "GONE" {
                return Err(Status::not_found("product GONE was discontinued"));
            }
        }
        Ok(Response::new(fallback_product()))
    }

    async fn search_products(&self, request: Request<SearchRequest>) -> Result<Response<SearchResponse>, Status> {
        let req = request.into_inner();
        if req.category == Category::Games as i32 && req.page_size == 2 {
            return Ok(Response::new(SearchResponse {
                products: vec![game("GAME-1", "Chess"), game("GAME-2", "Go")],
                next_cursor: "page-2".to_owned(),
            }));
        }
        if req.min_price_units == -5 {
            return Ok(Response::new(SearchResponse { products: Vec::new(), next_cursor: "negative".to_owned() }));
        }
        if req.query == "slow" {
            tokio::time::sleep(Duration::from_millis(300)).await;
            return Ok(Response::new(SearchResponse { products: Vec::new(), next_cursor: "slow".to_owned() }));
        }
        Err(Status::not_found("no rule matches this request to shop.v1.Catalog/SearchProducts"))
    }
}

/// `bench.v1.Bench`, mirroring `benches/plan/rules/bench.yaml` byte for
/// byte: a reply's `padding` is the letters a-z repeated, cut to length.
#[derive(Debug)]
struct BenchService {
    /// Paddings of the 200-byte replies (static, matched, templated) and of
    /// the 10,000-byte one, built once; each call copies its own.
    pad_static: String,
    pad_medium: String,
    pad_template: String,
    pad_large: String,
}

/// The letters a-z repeated, cut to `len` bytes.
fn padding(len: usize) -> String {
    (b'a'..=b'z').cycle().take(len).map(char::from).collect()
}

impl BenchService {
    fn new() -> Self {
        BenchService {
            pad_static: padding(189),
            pad_medium: padding(181),
            pad_template: padding(182),
            pad_large: padding(9982),
        }
    }
}

fn bench_reply(message: String, padding: String) -> Response<BenchReply> {
    Response::new(BenchReply { message, padding })
}

#[tonic::async_trait]
impl Bench for BenchService {
    async fn static_rule(&self, _request: Request<BenchRequest>) -> Result<Response<BenchReply>, Status> {
        Ok(bench_reply("static".to_owned(), self.pad_static.clone()))
    }

    async fn field_match(&self, request: Request<BenchRequest>) -> Result<Response<BenchReply>, Status> {
        let req = request.into_inner();
        // In rule order: six rules want an `id` as well, then one per name.
        let sized = matches!(req.name.as_str(), "small" | "medium" | "large");
        if sized && (1..=6).contains(&req.id) {
            return Ok(bench_reply(format!("id {}", req.id), String::new()));
        }
        match req.name.as_str() {
            "small" => Ok(bench_reply("small ok".to_owned(), String::new())),
            "medium" => Ok(bench_reply("matched medium".to_owned(), self.pad_medium.clone())),
            "large" => Ok(bench_reply("matched large".to_owned(), self.pad_large.clone())),
            _ => Err(Status::not_found("no rule matches this request to bench.v1.Bench/FieldMatch")),
        }
    }

    async fn template(&self, request: Request<BenchRequest>) -> Result<Response<BenchReply>, Status> {
        let req = request.into_inner();
        Ok(bench_reply(format!("Hello {}!", req.name), self.pad_template.clone()))
    }

    async fn no_match(&self, request: Request<BenchRequest>) -> Result<Response<BenchReply>, Status> {
        let req = request.into_inner();
        if req.name == "nobody" {
            return Ok(bench_reply("never sent".to_owned(), String::new()));
        }
        if req.id == 7 {
            return Ok(bench_reply("never sent either".to_owned(), String::new()));
        }
        Err(Status::not_found("no rule matches this request to bench.v1.Bench/NoMatch"))
    }
}

/// Command-line options.
struct Options {
    listen: SocketAddr,
    workers: usize,
}

const USAGE: &str = "usage: baseline [--listen HOST:PORT] [--workers N]";

fn parse_args() -> Result<Options, String> {
    let mut options = Options { listen: SocketAddr::from(([127, 0, 0, 1], 0)), workers: 1 };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
            None => (arg.clone(), None),
        };
        let mut value =
            |name: &str| inline.clone().or_else(|| args.next()).ok_or_else(|| format!("{name} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--listen" => {
                let v = value("--listen")?;
                options.listen = v.parse().map_err(|e| format!("bad --listen address {v:?}: {e}"))?;
            }
            "--workers" => {
                let v = value("--workers")?;
                options.workers = match v.parse::<usize>() {
                    Ok(n) if n > 0 => n,
                    _ => return Err(format!("bad --workers {v:?}: expected a positive integer")),
                };
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {arg:?}\n{USAGE}")),
        }
    }
    Ok(options)
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn serve(listen: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let local = listener.local_addr()?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "baseline listening on {local}")?;
        stdout.flush()?;
    }
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    Server::builder()
        .add_service(GreeterServer::new(GreeterService))
        .add_service(CatalogServer::new(CatalogService))
        .add_service(BenchServer::new(BenchService::new()))
        .serve_with_incoming_shutdown(incoming, shutdown_signal())
        .await?;
    Ok(())
}

fn main() -> ExitCode {
    let options = match parse_args() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("baseline: {message}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(options.workers).enable_all().build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("baseline: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(options.listen)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("baseline: {e}");
            ExitCode::FAILURE
        }
    }
}
