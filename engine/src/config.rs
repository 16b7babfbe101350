//! Every limit and switch of the engine, set by the binary's flags and
//! read by the layers below. It imports nothing of the engine, so every
//! module may import it.

use std::sync::Arc;
use std::time::Duration;

/// Limits and behaviour of the server. The defaults suit load tests.
#[derive(Debug, Clone)]
pub struct Config {
    /// Worker threads; 0 means one per available core.
    pub workers: usize,
    /// Largest request message accepted, from its length prefix.
    pub max_recv_message: usize,
    /// The most bytes one `utils.bytes(n)` template writes.
    pub max_fill: usize,
    /// Request bytes held for calls whose request is still arriving (the
    /// partial message of each stream, whole messages waiting for a call's
    /// task, the messages a client stream's rules read), over all
    /// connections. A message that would take the total past it fails its
    /// call with RESOURCE_EXHAUSTED.
    pub max_buffered: usize,
    /// SETTINGS_MAX_CONCURRENT_STREAMS advertised to clients.
    pub max_concurrent_streams: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE advertised to clients.
    pub max_header_list_size: u32,
    /// Initial stream window; the connection window is four times this.
    pub window: u32,
    /// How long in-flight calls may take to finish after shutdown starts.
    pub drain_timeout: Duration,
    /// Connections open at once, over all workers; the acceptor closes a
    /// connection over the limit as soon as it has accepted it.
    pub max_connections: usize,
    /// A connection without a call in progress for this long is sent
    /// GOAWAY (NO_ERROR) and closed; None keeps idle connections open.
    pub idle_timeout: Option<Duration>,
    /// Time a new connection has to complete the HTTP/2 handshake (our
    /// SETTINGS written, the client's connection preface read) before it
    /// is closed; None waits forever.
    pub handshake_timeout: Option<Duration>,
    /// Seed of the random source (worker i uses seed + i), for runs whose
    /// latencies, faults and shuffles repeat; None seeds from the clock.
    pub seed: Option<u64>,
    /// The lowest similarity at which a recording (raw rule) answers a
    /// call that is not identical to it, from 0 to 1 (`--raw-threshold`).
    pub raw_threshold: f32,
    /// Requests are checked against their `buf.validate` rules
    /// (`--validation on`).
    pub validation: bool,
    /// Validation on or off per service (`package.Service`), over
    /// `validation` (`--validation-for`).
    pub validation_services: Vec<(Box<str>, bool)>,
    /// Client streams end at their first invalid message
    /// (`--validation-mode per-message`).
    pub validation_per_message: bool,
    /// Which annotations validation reads (`--validation-source`).
    pub validation_source: crate::call::validate::RuleSource,
    /// A connection whose output the client has not taken for this long
    /// (its socket buffers full) is dropped; None waits forever. On the
    /// `h2` stack, while its calls wait for the socket (see `outflow`).
    pub write_timeout: Option<Duration>,
    /// Which HTTP/2 implementation serves connections.
    pub stack: Stack,
    /// Count calls for `/metrics` (per-worker counters).
    pub metrics: bool,
    /// Compress response messages with gzip for clients that accept it
    /// (`--compress-responses`); off by default, as it costs CPU per call.
    pub compress_responses: bool,
    /// Origins browsers may call from (CORS); empty: any origin, without
    /// credentials.
    pub cors_origins: Vec<String>,
    /// The journal's memory budget (`--journal-bytes`, `--journal-messages`,
    /// `--journal-message-bytes`), applied to the state's journal when
    /// serving starts.
    pub journal: JournalLimits,
    /// The real servers calls are forwarded to (`--upstream`,
    /// `--upstream-for`), when set.
    pub upstream: Option<Arc<Upstreams>>,
}

/// Which calls go to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamMode {
    /// Calls the plan has no answer for: an unknown method, or no rule
    /// matching.
    #[default]
    Fallback,
    /// Every call except the engine's own services (health, reflection).
    Always,
}

/// Where forwarded calls go: a service's own upstream, else the default.
#[derive(Debug, Default)]
pub struct Upstreams {
    /// `--upstream`: every service without one of its own.
    pub default: Option<Arc<Upstream>>,
    /// `--upstream-for SERVICE=URL`, by fully-qualified service name.
    pub services: Vec<(Box<str>, Arc<Upstream>)>,
}

impl Upstreams {
    /// The upstream of the method at `path` (`/package.Service/Method`).
    pub fn route(&self, path: &str) -> Option<&Upstream> {
        let service = path.strip_prefix('/').and_then(|p| p.split_once('/')).map(|(s, _)| s);
        let own = service.and_then(|s| self.services.iter().find(|(name, _)| &**name == s));
        own.map(|(_, u)| &**u).or(self.default.as_deref())
    }

    /// Every upstream, the default first.
    pub fn all(&self) -> impl Iterator<Item = &Upstream> {
        self.default.iter().chain(self.services.iter().map(|(_, u)| u)).map(|u| &**u)
    }
}

/// A real gRPC server (`--upstream URL` and its TLS options).
#[derive(Debug)]
pub struct Upstream {
    /// As given, for messages (`http://host:port`).
    pub url: String,
    /// `host:port` to connect to.
    pub address: String,
    /// `:authority` of forwarded requests.
    pub authority: String,
    /// TLS (`https://`): the client configuration, ALPN `h2`, and the
    /// name the server's certificate must carry.
    pub tls: Option<(Arc<rustls::ClientConfig>, rustls::pki_types::ServerName<'static>)>,
    pub mode: UpstreamMode,
    /// Time to open a connection (TCP and TLS handshakes) before the call
    /// fails with UNAVAILABLE.
    pub connect_timeout: Duration,
    /// Largest response message taken from the upstream.
    pub max_message: usize,
    /// How its connections are doing, for the admin status.
    pub health: Arc<UpstreamHealth>,
}

/// The state of an upstream's connections, over all workers.
#[derive(Debug, Default)]
pub struct UpstreamHealth {
    /// Connections open now.
    pub open: std::sync::atomic::AtomicUsize,
    /// The last failure to connect (when, and why), cleared by the next
    /// connection made.
    pub last_error: std::sync::Mutex<Option<(std::time::SystemTime, String)>>,
}

/// The HTTP/2 implementation connections are served with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stack {
    /// The engine's own gRPC-specialised layer ([`crate::transport::http2`]).
    #[default]
    Native,
    /// The `h2` crate, kept as the reference ([`crate::transport::h2_ref`]).
    H2,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            workers: 0,
            max_recv_message: 4 << 20,
            max_fill: 4 << 20,
            max_buffered: 512 << 20,
            max_concurrent_streams: 1024,
            max_header_list_size: 16 << 10,
            window: 1 << 20,
            drain_timeout: Duration::from_secs(5),
            max_connections: 10_000,
            idle_timeout: Some(Duration::from_secs(300)),
            handshake_timeout: Some(Duration::from_secs(10)),
            seed: None,
            raw_threshold: crate::call::raw::DEFAULT_THRESHOLD,
            validation: false,
            validation_services: Vec::new(),
            validation_per_message: false,
            validation_source: crate::call::validate::RuleSource::Auto,
            stack: Stack::Native,
            write_timeout: Some(Duration::from_secs(30)),
            metrics: true,
            compress_responses: false,
            cors_origins: Vec::new(),
            journal: JournalLimits::DEFAULT,
            upstream: None,
        }
    }
}

/// The journal's memory budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalLimits {
    /// Bytes the entries may hold together (`Entry::bytes`); the oldest
    /// are dropped beyond. The newest entry is always kept.
    pub bytes: usize,
    /// Request messages kept per call: the first `messages`, and the latest
    /// one when more came (0: none, only their number).
    pub messages: usize,
    /// Bytes kept of each request message; the rest is cut off.
    pub message_bytes: usize,
}

impl JournalLimits {
    /// 64 MiB in all; per call, 16 messages (and the last) of up to 64 KiB.
    pub const DEFAULT: JournalLimits = JournalLimits { bytes: 64 << 20, messages: 16, message_bytes: 64 << 10 };
}

impl Default for JournalLimits {
    fn default() -> JournalLimits {
        JournalLimits::DEFAULT
    }
}
