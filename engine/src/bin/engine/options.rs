//! The options of `engine run`, declared once in [`FLAGS`]. The
//! command-line parser, `engine --help`, the environment variables and the
//! keys of the configuration file all come from that table: `--some-flag`
//! is also `WIRESTUB_SOME_FLAG` and `some-flag:` in the YAML file named by
//! `--config` (or `WIRESTUB_CONFIG`).
//!
//! Each flag takes its value from the first source that has one: the
//! command line, then the environment, then the configuration file, then
//! its default. A repeatable flag (`--protos`, `--rules`) takes its whole
//! list from that one source. Every error names the flag and where the
//! value came from: the command line, the environment variable, or the
//! file and line.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use wirestub_compiler::yaml::{self, Node, NodeKind};
use wirestub_engine::{Config, NoMatch, Stack};

/// How a flag takes its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One value.
    Value,
    /// One path. Relative paths in the configuration file are taken from
    /// the file's directory.
    Path,
    /// A list of paths: the flag repeated on the command line, a
    /// `:`-separated list in the environment, a YAML list (or one path) in
    /// the configuration file.
    Paths,
    /// A list of values: the flag repeated on the command line, a
    /// `,`-separated list in the environment, a YAML list (or one value)
    /// in the configuration file.
    Values,
    /// On when given (`--watch`, or `--watch=false`); `true` or `false` in
    /// the environment and the configuration file.
    Switch,
}

/// One flag of `engine run`.
#[derive(Debug)]
pub struct Flag {
    /// The long name without dashes: `--listen` is `listen`.
    pub name: &'static str,
    /// The value's name in `--help` (empty for switches).
    pub value: &'static str,
    pub kind: Kind,
    /// The default as shown by `--help` and used when no source sets the
    /// flag; empty when the flag has none.
    pub default: &'static str,
    pub help: &'static str,
    /// The `--help` section it is listed under.
    pub section: &'static str,
}

impl Flag {
    /// The environment variable: `WIRESTUB_` and the name in upper case,
    /// dashes as underscores.
    pub fn env(&self) -> String {
        format!("WIRESTUB_{}", self.name.to_ascii_uppercase().replace('-', "_"))
    }
}

const CONFIGURATION: &str = "Configuration";
const PLAN: &str = "Plan";
const LISTENERS: &str = "Listeners";
const ADMIN: &str = "Admin API, metrics and logs";
const LIMITS: &str = "Limits";
const UPSTREAM: &str = "Upstream";

/// Every flag of `engine run`, in `--help` order.
pub const FLAGS: &[Flag] = &[
    Flag {
        name: "config",
        value: "FILE",
        kind: Kind::Path,
        default: "",
        help: "YAML file of options: `flag-name: value` for any flag below (a list for --protos and --rules); \
               the command line and the environment win over it; relative paths in it are taken from its \
               directory",
        section: CONFIGURATION,
    },
    Flag {
        name: "plan",
        value: "FILE|URL|shared:",
        kind: Kind::Path,
        default: "",
        help: "plan to serve, a file written by `compiler build` (the same as the PLAN argument), an http(s):// URL \
               to fetch it from (again on each reload), or shared: for the one stored in --shared-state (loaded \
               again when announced); without one, the .proto files and rules in --protos and --rules are \
               compiled in process",
        section: PLAN,
    },
    Flag {
        name: "plan-identity",
        value: "ID",
        kind: Kind::Value,
        default: "",
        help: "the identity the plan must have (16 hex digits, as `compiler build` prints and /admin/status \
               shows); a plan of another identity is refused, at start and on reload",
        section: PLAN,
    },
    Flag {
        name: "plan-ca",
        value: "FILE",
        kind: Kind::Path,
        default: "",
        help: "PEM certificates that sign the server's of an https:// --plan (default: the system's)",
        section: PLAN,
    },
    Flag {
        name: "protos",
        value: "DIR",
        kind: Kind::Paths,
        default: "protos",
        help: "directory of .proto files to compile when there is no plan; repeatable",
        section: PLAN,
    },
    Flag {
        name: "protos-only",
        value: "FILE",
        kind: Kind::Values,
        default: "",
        help: "compile only this .proto file (a path below a protos directory) and what it imports; repeatable",
        section: PLAN,
    },
    Flag {
        name: "lenient",
        value: "",
        kind: Kind::Switch,
        default: "false",
        help: "what Wishmock ignores is a warning: a .proto that does not compile, a rule document or entry with \
               an error, are left out",
        section: PLAN,
    },
    Flag {
        name: "rules",
        value: "DIR",
        kind: Kind::Paths,
        default: "rules",
        help: "directory of rule files to compile when there is no plan; repeatable",
        section: PLAN,
    },
    Flag {
        name: "state-dir",
        value: "DIR",
        kind: Kind::Path,
        default: "",
        help: "with a plan: where protos, rules and stubs added through the runtime API are kept (DIR/protos, \
               DIR/rules), layered over the plan and restored on restart; without it they live in memory. \
               Without a plan, runtime changes are written into the --protos and --rules directories",
        section: PLAN,
    },
    Flag {
        name: "runtime-max-bytes",
        value: "BYTES",
        kind: Kind::Value,
        default: "268435456",
        help: "most bytes of protos, rules, stubs and descriptor sets the runtime API may hold; a change that \
               would pass it is refused (413)",
        section: PLAN,
    },
    Flag {
        name: "runtime-max-schema-bytes",
        value: "BYTES",
        kind: Kind::Value,
        default: "4194304",
        help: "most bytes of protos and descriptor sets the runtime API may hold (descriptors cost up to some 400 \
               times their size in memory); a change that would pass it is refused (413)",
        section: PLAN,
    },
    Flag {
        name: "shared-state",
        value: "URL",
        kind: Kind::Value,
        default: "",
        help: "share state with every replica using the same Redis (redis://[:PASSWORD@]HOST:PORT[/DB], or \
               rediss:// for TLS): `times` limits and sequences count calls across replicas, a runtime API change \
               made on one is applied by all (a replica that starts later catches up), the journal's routes read \
               every replica's calls (with --journal), and --plan shared: serves the plan stored there; serving \
               never waits for Redis for long",
        section: PLAN,
    },
    Flag {
        name: "shared-state-ca",
        value: "FILE",
        kind: Kind::Value,
        default: "",
        help: "PEM certificates that sign the Redis server's, for a rediss:// --shared-state (default: the \
               system's roots)",
        section: PLAN,
    },
    Flag {
        name: "shared-state-cert",
        value: "FILE",
        kind: Kind::Value,
        default: "",
        help: "PEM certificate (chain) this replica presents to a rediss:// --shared-state that asks for one; \
               with --shared-state-key",
        section: PLAN,
    },
    Flag {
        name: "shared-state-key",
        value: "FILE",
        kind: Kind::Value,
        default: "",
        help: "PEM private key of --shared-state-cert",
        section: PLAN,
    },
    Flag {
        name: "shared-state-prefix",
        value: "TEXT",
        kind: Kind::Value,
        default: "wirestub",
        help: "prefix of the Redis keys and channel of --shared-state: replicas with the same prefix share",
        section: PLAN,
    },
    Flag {
        name: "shared-state-policy",
        value: "local|refuse",
        kind: Kind::Value,
        default: "local",
        help: "while Redis cannot be reached, calls of rules limited by `times` are counted by this replica alone \
               (local; added to Redis once it is back) or answered UNAVAILABLE (refuse)",
        section: PLAN,
    },
    Flag {
        name: "shared-state-timeout-ms",
        value: "MS",
        kind: Kind::Value,
        default: "100",
        help: "longest a call waits for Redis to count it before the policy decides (--shared-state-policy); \
               after a failure a worker leaves Redis alone for a second",
        section: PLAN,
    },
    Flag {
        name: "shared-journal",
        value: "N",
        kind: Kind::Value,
        default: "0",
        help: "with --shared-state and --journal: the calls of every replica kept in a Redis stream (the newest N; \
               0: --journal's N), which the journal's routes read unless given scope=local; off: each replica \
               keeps its own only",
        section: PLAN,
    },
    Flag {
        name: "watch",
        value: "",
        kind: Kind::Switch,
        default: "false",
        help: "reload when the plan file changes or, without a plan, when a file under the --protos and \
               --rules directories changes (checked every 500 ms); a plan that fails to load is logged and \
               the previous one keeps serving",
        section: PLAN,
    },
    Flag {
        name: "no-match",
        value: "not-found|empty-ok",
        kind: Kind::Value,
        default: "not-found",
        help: "answer to calls no rule matches: NOT_FOUND naming the method, or OK with an empty message",
        section: PLAN,
    },
    Flag {
        name: "seed",
        value: "N",
        kind: Kind::Value,
        default: "",
        help: "seed the random source (latencies, faults, shuffles, template utilities) so runs repeat",
        section: PLAN,
    },
    Flag {
        name: "validation",
        value: "on|off",
        kind: Kind::Value,
        default: "off",
        help: "check requests against the buf.validate rules of their protos before matching; an invalid one gets \
               INVALID_ARGUMENT with every violation (BadRequest and buf.validate.Violations details), unless a \
               rule marked `validate: false` answers it",
        section: PLAN,
    },
    Flag {
        name: "validation-for",
        value: "SERVICE=on|off",
        kind: Kind::Values,
        default: "",
        help: "validation of one service (`package.Service`), over --validation; repeatable (a list in the \
               configuration file)",
        section: PLAN,
    },
    Flag {
        name: "validation-source",
        value: "auto|protovalidate|pgv",
        kind: Kind::Value,
        default: "auto",
        help: "which rules validation checks: protovalidate's (buf.validate), protoc-gen-validate's (validate.rules), \
               or protovalidate's where a method's message has any and protoc-gen-validate's otherwise",
        section: PLAN,
    },
    Flag {
        name: "validation-mode",
        value: "aggregate|per-message",
        kind: Kind::Value,
        default: "aggregate",
        help:
            "client streams: answer INVALID_ARGUMENT once the stream ends, naming every invalid message's violations, \
               or as soon as one message is invalid",
        section: PLAN,
    },
    Flag {
        name: "raw-threshold",
        value: "0..1",
        kind: Kind::Value,
        default: "0.8",
        help: "lowest similarity (0 to 1) at which a recording made without protos answers a call that is not \
               identical to it; below it the call is unmatched (NOT_FOUND, or forwarded)",
        section: PLAN,
    },
    Flag {
        name: "listen",
        value: "HOST:PORT",
        kind: Kind::Value,
        default: "127.0.0.1:50051",
        help: "address to serve cleartext gRPC on; port 0 picks a free one; off: no cleartext listener",
        section: LISTENERS,
    },
    Flag {
        name: "tls-listen",
        value: "HOST:PORT",
        kind: Kind::Value,
        default: "",
        help: "address to serve gRPC over TLS on (ALPN h2), beside the cleartext listener; needs --tls-cert \
               and --tls-key",
        section: LISTENERS,
    },
    Flag {
        name: "tls-cert",
        value: "FILE",
        kind: Kind::Path,
        default: "",
        help: "certificate chain of the TLS listener (PEM)",
        section: LISTENERS,
    },
    Flag {
        name: "tls-key",
        value: "FILE",
        kind: Kind::Path,
        default: "",
        help: "private key of the TLS listener (PEM)",
        section: LISTENERS,
    },
    Flag {
        name: "tls-client-ca",
        value: "FILE",
        kind: Kind::Path,
        default: "",
        help: "CA certificates (PEM) client certificates must chain to; when given, the TLS listener requires \
               a client certificate (mutual TLS)",
        section: LISTENERS,
    },
    Flag {
        name: "http2",
        value: "native|h2",
        kind: Kind::Value,
        default: "native",
        help: "HTTP/2 implementation: the engine's own gRPC-specialised stack, or the h2 crate, kept as the \
               reference",
        section: LISTENERS,
    },
    Flag {
        name: "compress-responses",
        value: "on|off",
        kind: Kind::Value,
        default: "off",
        help: "gzip response messages for clients that accept it (grpc-accept-encoding, accept-encoding, \
               connect-accept-encoding); requests are decompressed either way",
        section: LISTENERS,
    },
    Flag {
        name: "cors-origins",
        value: "ORIGINS",
        kind: Kind::Value,
        default: "*",
        help: "comma-separated origins browsers may call the gRPC port from (gRPC-Web, Connect); * allows any \
               origin, without credentials; listed origins may send credentials",
        section: LISTENERS,
    },
    Flag {
        name: "workers",
        value: "N",
        kind: Kind::Value,
        default: "0",
        help: "worker threads; 0: one per core",
        section: LISTENERS,
    },
    Flag {
        name: "upstream",
        value: "URL",
        kind: Kind::Value,
        default: "",
        help: "real gRPC server to forward calls to (http://HOST:PORT, or https://HOST[:PORT] for TLS): calls \
               to methods the plan lacks, and calls no rule matches; works without a plan or protos",
        section: UPSTREAM,
    },
    Flag {
        name: "upstream-for",
        value: "SERVICE=URL",
        kind: Kind::Values,
        default: "",
        help: "the upstream of one service (`package.Service`), instead of --upstream, so that one engine fronts \
               several real services; repeatable; TLS and mode options apply to each",
        section: UPSTREAM,
    },
    Flag {
        name: "upstream-mode",
        value: "fallback|always",
        kind: Kind::Value,
        default: "fallback",
        help: "fallback: forward only what the plan has no answer for; always: forward every call but the \
               engine's health and reflection services (a pass-through that still journals and counts)",
        section: UPSTREAM,
    },
    Flag {
        name: "upstream-ca",
        value: "FILE",
        kind: Kind::Path,
        default: "",
        help: "CA certificates (PEM) the https:// upstream's certificate must chain to (default: the system's)",
        section: UPSTREAM,
    },
    Flag {
        name: "upstream-cert",
        value: "FILE",
        kind: Kind::Path,
        default: "",
        help: "client certificate (PEM) presented to the upstream (mutual TLS); needs --upstream-key",
        section: UPSTREAM,
    },
    Flag {
        name: "upstream-key",
        value: "FILE",
        kind: Kind::Path,
        default: "",
        help: "private key (PEM) of --upstream-cert",
        section: UPSTREAM,
    },
    Flag {
        name: "upstream-server-name",
        value: "NAME",
        kind: Kind::Value,
        default: "",
        help: "name the upstream's certificate must carry (default: the URL's host)",
        section: UPSTREAM,
    },
    Flag {
        name: "upstream-connect-timeout-ms",
        value: "MS",
        kind: Kind::Value,
        default: "5000",
        help: "time to connect to the upstream (TCP, TLS, HTTP/2) before the call fails with UNAVAILABLE",
        section: UPSTREAM,
    },
    Flag {
        name: "record",
        value: "DIR",
        kind: Kind::Path,
        default: "",
        help: "write every call the upstream answered as rule files in DIR (one file per method, created or \
               replaced atomically), which `compiler build` compiles unchanged; needs --upstream and the \
               methods' .proto files (--protos or the plan)",
        section: UPSTREAM,
    },
    Flag {
        name: "record-ignore-fields",
        value: "PATHS",
        kind: Kind::Value,
        default: "",
        help: "comma-separated request fields (as in `when`, e.g. `meta.request_id,sent_at`) left out of the \
               recorded conditions",
        section: UPSTREAM,
    },
    Flag {
        name: "record-redact",
        value: "NAMES",
        kind: Kind::Value,
        default: "",
        help: "comma-separated response metadata names never written, besides authorization, cookies, API keys \
               and tokens (request metadata is never written)",
        section: UPSTREAM,
    },
    Flag {
        name: "record-ignore-metadata",
        value: "NAMES",
        kind: Kind::Value,
        default: "",
        help: "comma-separated request metadata names a recording made without protos does not expect on \
               replay (besides transport, tracing and session headers)",
        section: UPSTREAM,
    },
    Flag {
        name: "record-pacing",
        value: "",
        kind: Kind::Switch,
        default: "false",
        help: "write the observed gap between streamed messages as `stream_delay_ms`",
        section: UPSTREAM,
    },
    Flag {
        name: "record-max-call-bytes",
        value: "BYTES",
        kind: Kind::Value,
        default: "16777216",
        help: "largest call (request and response messages) recorded; larger calls are forwarded, not recorded",
        section: UPSTREAM,
    },
    Flag {
        name: "record-max-bytes",
        value: "BYTES",
        kind: Kind::Value,
        default: "268435456",
        help: "most bytes of calls waiting to be written and of recordings held; past it, calls are not recorded",
        section: UPSTREAM,
    },
    Flag {
        name: "admin-listen",
        value: "HOST:PORT",
        kind: Kind::Value,
        default: "127.0.0.1:9901",
        help: "address of the admin HTTP API (status, rules, health probes, metrics, journal, reload); port 0 \
               picks a free one; off: no admin API",
        section: ADMIN,
    },
    Flag {
        name: "admin-token",
        value: "TOKEN",
        kind: Kind::Value,
        default: "",
        help: "admin requests other than the health probes must carry `Authorization: Bearer TOKEN`; \
               without one the admin API (which can change what the engine answers) only listens on loopback \
               addresses, unless --admin-insecure",
        section: ADMIN,
    },
    Flag {
        name: "admin-insecure",
        value: "",
        kind: Kind::Switch,
        default: "false",
        help: "let the admin API listen on a non-loopback address without --admin-token (anyone who reaches \
               it can change the mocks and read the journal)",
        section: ADMIN,
    },
    Flag {
        name: "metrics",
        value: "on|off",
        kind: Kind::Value,
        default: "on",
        help: "count calls for the admin API's /metrics",
        section: ADMIN,
    },
    Flag {
        name: "journal",
        value: "N",
        kind: Kind::Value,
        default: "0",
        help: "keep the last N calls for the admin API's journal queries; 0: keep none (for load runs)",
        section: ADMIN,
    },
    Flag {
        name: "journal-bytes",
        value: "N",
        kind: Kind::Value,
        default: "67108864",
        help: "bytes the journal may hold in all (messages, metadata and a fixed cost per call); the oldest \
               calls are dropped beyond",
        section: ADMIN,
    },
    Flag {
        name: "journal-messages",
        value: "N",
        kind: Kind::Value,
        default: "16",
        help: "request messages the journal keeps of a call: the first N, and the last; the others are \
               counted, and marked as left out",
        section: ADMIN,
    },
    Flag {
        name: "journal-message-bytes",
        value: "N",
        kind: Kind::Value,
        default: "65536",
        help: "bytes the journal keeps of each request message; longer ones are cut, and marked as cut",
        section: ADMIN,
    },
    Flag {
        name: "admin-head-timeout-ms",
        value: "MS",
        kind: Kind::Value,
        default: "5000",
        help: "time an admin connection has to send a whole request head (from its start, or from the \
               first byte of a later request); slower ones are closed",
        section: ADMIN,
    },
    Flag {
        name: "log-format",
        value: "text|json",
        kind: Kind::Value,
        default: "text",
        help: "format of the log lines on stderr; RUST_LOG sets the level (default info)",
        section: ADMIN,
    },
    Flag {
        name: "max-recv-bytes",
        value: "N",
        kind: Kind::Value,
        default: "4194304",
        help: "largest request message; larger ones get RESOURCE_EXHAUSTED",
        section: LIMITS,
    },
    Flag {
        name: "max-fill-bytes",
        value: "N",
        kind: Kind::Value,
        default: "4194304",
        help: "most bytes one `utils.bytes(n)` template writes (a payload sized from the request)",
        section: LIMITS,
    },
    Flag {
        name: "max-buffered-bytes",
        value: "N",
        kind: Kind::Value,
        default: "536870912",
        help: "request bytes held for calls still arriving, all connections together; \
               past it a call gets RESOURCE_EXHAUSTED",
        section: LIMITS,
    },
    Flag {
        name: "max-concurrent-streams",
        value: "N",
        kind: Kind::Value,
        default: "1024",
        help: "streams open at once per connection",
        section: LIMITS,
    },
    Flag {
        name: "max-header-list-size",
        value: "N",
        kind: Kind::Value,
        default: "16384",
        help: "bytes of request headers per stream",
        section: LIMITS,
    },
    Flag {
        name: "max-connections",
        value: "N",
        kind: Kind::Value,
        default: "10000",
        help: "connections open at once; more are closed as soon as accepted",
        section: LIMITS,
    },
    Flag {
        name: "idle-timeout-ms",
        value: "N",
        kind: Kind::Value,
        default: "300000",
        help: "GOAWAY and close a connection with no call in progress for this long; 0: never",
        section: LIMITS,
    },
    Flag {
        name: "handshake-timeout-ms",
        value: "N",
        kind: Kind::Value,
        default: "10000",
        help: "close a connection that has not completed the TLS and HTTP/2 handshakes within this time; \
               0: never",
        section: LIMITS,
    },
    Flag {
        name: "write-timeout-ms",
        value: "N",
        kind: Kind::Value,
        default: "30000",
        help: "drop a connection whose client takes none of the engine's output for this long; 0: never",
        section: LIMITS,
    },
    Flag {
        name: "drain-timeout-ms",
        value: "N",
        kind: Kind::Value,
        default: "5000",
        help: "on SIGINT or SIGTERM, time in-flight calls get to finish before the engine exits",
        section: LIMITS,
    },
    Flag {
        name: "shutdown-grace-ms",
        value: "N",
        kind: Kind::Value,
        default: "0",
        help: "on SIGINT or SIGTERM, keep serving this long with health NOT_SERVING (so load balancers \
               and probes move away) before GOAWAY and the drain",
        section: LIMITS,
    },
];

const HEADER: &str = "\
usage:
  engine run [PLAN] [options]
  engine completions bash|zsh|fish
  engine --help | --version

Serves PLAN (a file written by `compiler build`). Without PLAN, compiles
the .proto files and rules in --protos and --rules first.

Every option is also an environment variable (`--max-connections 500` is
WIRESTUB_MAX_CONNECTIONS=500) and a key of the YAML file named by --config
(`max-connections: 500`). The command line wins over the environment, which
wins over the file. `--flag=value` works as well as `--flag value`; switches
take true or false in the environment and the file.
";

const FOOTER: &str = "
Once serving, the engine prints one line per listener on stdout:
  wirestub engine listening on ADDR
  wirestub engine listening on ADDR (tls)
  wirestub admin listening on ADDR
SIGHUP reloads the plan (the plan file read again, or the protos and rules
compiled again); a plan that fails to load is logged and the previous one
keeps serving. SIGINT or SIGTERM stops accepting, reports NOT_SERVING,
sends GOAWAY and lets in-flight calls finish for up to --drain-timeout-ms;
a second one exits at once. Logs go to stderr; RUST_LOG sets the level
(default info).";

/// Width `--help` wraps its text to.
const WIDTH: usize = 80;
/// Indentation of a flag's description.
const INDENT: usize = 8;

/// The text of `engine --help`.
pub fn help() -> String {
    let mut out = String::from(HEADER);
    let mut section = "";
    for flag in FLAGS {
        if flag.section != section {
            section = flag.section;
            out.push_str(&format!("\n{section}:\n"));
        }
        let value = match flag.kind {
            Kind::Switch => String::new(),
            Kind::Paths | Kind::Values => format!(" {}...", flag.value),
            _ => format!(" {}", flag.value),
        };
        out.push_str(&format!("  --{}{value}\n", flag.name));
        let mut text = flag.help.to_string();
        match flag.kind {
            Kind::Paths => text.push_str(" (a `:`-separated list in the environment, a list in the file)"),
            Kind::Values => text.push_str(" (a `,`-separated list in the environment, a list in the file)"),
            _ => {}
        }
        wrap(&mut out, &text);
        let mut tail = String::new();
        if !flag.default.is_empty() {
            tail.push_str(&format!("[default: {}] ", flag.default));
        }
        tail.push_str(&format!("[env: {}]", flag.env()));
        wrap(&mut out, &tail);
    }
    out.push_str(FOOTER);
    out
}

/// Appends `text`, word-wrapped and indented by [`INDENT`].
fn wrap(out: &mut String, text: &str) {
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && INDENT + line.len() + 1 + word.len() > WIDTH {
            out.push_str(&format!("{:INDENT$}{line}\n", ""));
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        out.push_str(&format!("{:INDENT$}{line}\n", ""));
    }
}

/// Where a flag's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    CommandLine,
    /// The environment variable's name.
    Env(String),
    /// The configuration file and the line of the value.
    File(PathBuf, u32),
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::CommandLine => f.write_str("command line"),
            Origin::Env(name) => write!(f, "environment variable {name}"),
            Origin::File(path, line) => write!(f, "{}:{line}", path.display()),
            Origin::Default => f.write_str("default"),
        }
    }
}

/// A flag's value as given, before it is read as its type.
#[derive(Debug, Clone)]
struct Raw {
    flag: &'static Flag,
    /// One value, except for [`Kind::Paths`].
    values: Vec<String>,
    origin: Origin,
    /// Where each value came from, when they came from lines of their own
    /// (a list in the configuration file); empty otherwise.
    items: Vec<Origin>,
}

impl Raw {
    /// Where value `i` came from.
    fn origin_of(&self, i: usize) -> &Origin {
        self.items.get(i).unwrap_or(&self.origin)
    }

    fn text(&self) -> &str {
        self.values.first().map(String::as_str).unwrap_or("")
    }

    /// An error about this value: where it came from, the flag, the cause.
    fn error(&self, expected: &str) -> String {
        format!("{}: `--{}` takes {expected}, got `{}`", self.origin, self.flag.name, self.text())
    }

    fn number<T: std::str::FromStr>(&self) -> Result<T, String> {
        self.text().parse().map_err(|_| self.error("a number"))
    }

    /// A timeout in milliseconds; 0 turns it off.
    fn millis_or_never(&self) -> Result<Option<Duration>, String> {
        let ms: u64 = self.number()?;
        Ok((ms != 0).then(|| Duration::from_millis(ms)))
    }

    /// `HOST:PORT`, or None for `off`.
    fn address(&self) -> Result<Option<String>, String> {
        let text = self.text();
        if text == "off" {
            return Ok(None);
        }
        match text.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(Some(text.to_string())),
            _ => Err(self.error("HOST:PORT (or off)")),
        }
    }

    fn switch(&self) -> Result<bool, String> {
        match self.text() {
            "true" | "on" | "yes" | "1" => Ok(true),
            "false" | "off" | "no" | "0" => Ok(false),
            _ => Err(self.error("true or false")),
        }
    }

    fn choice<T: Copy>(&self, choices: &[(&str, T)]) -> Result<T, String> {
        match choices.iter().find(|(name, _)| *name == self.text()) {
            Some((_, v)) => Ok(*v),
            None => {
                let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
                Err(self.error(&names.join(" or ")))
            }
        }
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(self.text())
    }

    /// `*` (any origin: an empty list) or comma-separated origins.
    fn origins(&self) -> Result<Vec<String>, String> {
        let list: Vec<String> = self
            .text()
            .split(',')
            .map(|o| o.trim().trim_end_matches('/').to_string())
            .filter(|o| !o.is_empty())
            .collect();
        if list.iter().any(|o| o == "*") {
            return Ok(Vec::new());
        }
        let origin = |o: &String| {
            (o.starts_with("http://") || o.starts_with("https://")) && !o.contains(|c: char| c.is_whitespace())
        };
        if list.is_empty() || !list.iter().all(origin) {
            return Err(self.error("* or comma-separated origins such as https://app.example.com"));
        }
        Ok(list)
    }
}

/// The format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    pub listen: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// The files for TLS to the shared state's Redis.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SharedTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Everything `engine run` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// The plan file (or URL, or `shared:`); None compiles `compile` in
    /// process.
    pub plan: Option<PathBuf>,
    /// `--plan-identity`.
    pub plan_identity: Option<String>,
    /// `--plan-ca`.
    pub plan_ca: Option<PathBuf>,
    pub compile: wirestub_compiler::Options,
    pub watch: bool,
    pub no_match: NoMatch,
    /// The server's limits and behaviour.
    pub server: Config,
    /// Recording of forwarded calls (`--record`).
    pub record: Option<wirestub_engine::upstream::record::Options>,
    /// The cleartext listener's address; None for `off`.
    pub listen: Option<String>,
    pub tls: Option<Tls>,
    /// The admin API's address; None for `off`.
    pub admin_listen: Option<String>,
    /// Whether `admin_listen` was asked for (false: it is the default).
    pub admin_listen_given: bool,
    pub admin_token: Option<String>,
    /// A non-loopback admin address without a token is intended.
    pub admin_insecure: bool,
    /// Where runtime changes over a plan are kept.
    pub state_dir: Option<PathBuf>,
    /// Bound on the runtime API's sources.
    pub runtime_max_bytes: usize,
    /// Redis shared with other replicas (`--shared-state`), and the prefix
    /// of its keys.
    pub shared_state: Option<(String, String)>,
    /// `--shared-state-ca`, `--shared-state-cert` and `--shared-state-key`.
    pub shared_tls: SharedTls,
    /// `--shared-state-policy refuse`.
    pub shared_refuse: bool,
    /// `--shared-state-timeout-ms`.
    pub shared_timeout: Duration,
    /// `--shared-journal`: the calls the shared journal keeps (0: as many
    /// as `--journal`), or None when it is off.
    pub shared_journal: Option<usize>,
    /// Bound on the runtime API's protos and descriptor sets.
    pub runtime_max_schema_bytes: usize,
    /// Time an admin connection has to send a whole request head.
    pub admin_head_timeout: Duration,
    pub journal: usize,
    /// Serving on with health NOT_SERVING after a stop signal, before the
    /// drain.
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    /// The configuration file read, if any.
    pub config_file: Option<PathBuf>,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    Help,
    Version,
    /// `engine completions SHELL`: the shell's completion script.
    Completions(String),
    Run(Box<Options>),
}

/// Reads the command line (without the program name), the environment
/// (through `env`, which returns None for unset variables) and the
/// configuration file they name.
pub fn parse(args: &[String], env: &dyn Fn(&str) -> Option<String>) -> Result<Command, String> {
    match args.first().map(String::as_str) {
        Some("run") => {}
        Some("-h" | "--help" | "help") => return Ok(Command::Help),
        Some("-V" | "--version") => return Ok(Command::Version),
        Some("completions") => {
            let [_, shell] = args else { return Err("`engine completions` takes a shell: bash, zsh or fish".into()) };
            return Ok(Command::Completions(shell.clone()));
        }
        Some(other) => return Err(format!("unknown command `{other}`; the command is `engine run`")),
        None => return Err("no command given; the command is `engine run`".into()),
    }
    let args = &args[1..];
    if args.iter().any(|a| a == "-h" || a == "--help") {
        return Ok(Command::Help);
    }
    let (mut given, positional) = command_line(args)?;
    if let Some(plan) = positional {
        if given.contains_key("plan") {
            return Err("command line: the plan is given twice, as an argument and with `--plan`".into());
        }
        given.insert("plan", raw(flag("plan"), vec![plan], Origin::CommandLine));
    }

    let config_file = match given.get("config") {
        Some(r) => Some(r.path()),
        None => env("WIRESTUB_CONFIG").map(PathBuf::from),
    };
    let file = match &config_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read config file `{}`: {e}", path.display()))?;
            config_text(path, &text)?
        }
        None => HashMap::new(),
    };

    let lookup = |name: &'static str| -> Option<Raw> {
        let flag = flag(name);
        if let Some(r) = given.get(name) {
            return Some(r.clone());
        }
        let var = flag.env();
        if let Some(v) = env(&var) {
            let values = match flag.kind {
                Kind::Paths => v.split(':').filter(|s| !s.is_empty()).map(str::to_string).collect(),
                Kind::Values => v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect(),
                _ => vec![v],
            };
            return Some(raw(flag, values, Origin::Env(var)));
        }
        file.get(name).cloned()
    };
    // The default, when no source sets the flag and it has one.
    let get = |name: &'static str| -> Option<Raw> {
        lookup(name).or_else(|| {
            let flag = flag(name);
            (!flag.default.is_empty()).then(|| raw(flag, vec![flag.default.to_string()], Origin::Default))
        })
    };
    let must = |name: &'static str| get(name).expect("a flag with a default");

    let mut server = Config {
        workers: must("workers").number()?,
        max_recv_message: must("max-recv-bytes").number()?,
        max_fill: must("max-fill-bytes").number()?,
        max_buffered: must("max-buffered-bytes").number()?,
        max_concurrent_streams: must("max-concurrent-streams").number()?,
        max_header_list_size: must("max-header-list-size").number()?,
        drain_timeout: Duration::from_millis(must("drain-timeout-ms").number()?),
        max_connections: must("max-connections").number()?,
        idle_timeout: must("idle-timeout-ms").millis_or_never()?,
        handshake_timeout: must("handshake-timeout-ms").millis_or_never()?,
        write_timeout: must("write-timeout-ms").millis_or_never()?,
        stack: must("http2").choice(&[("native", Stack::Native), ("h2", Stack::H2)])?,
        metrics: must("metrics").choice(&[("on", true), ("off", false)])?,
        compress_responses: must("compress-responses").choice(&[("on", true), ("off", false)])?,
        validation: must("validation").choice(&[("on", true), ("off", false)])?,
        validation_services: validation_services(get("validation-for").as_ref())?,
        validation_per_message: must("validation-mode").choice(&[("aggregate", false), ("per-message", true)])?,
        validation_source: must("validation-source").choice(&[
            ("auto", wirestub_engine::call::validate::RuleSource::Auto),
            ("protovalidate", wirestub_engine::call::validate::RuleSource::Protovalidate),
            ("pgv", wirestub_engine::call::validate::RuleSource::Pgv),
        ])?,
        cors_origins: must("cors-origins").origins()?,
        journal: wirestub_engine::JournalLimits {
            bytes: must("journal-bytes").number()?,
            messages: must("journal-messages").number()?,
            message_bytes: must("journal-message-bytes").number()?,
        },
        ..Config::default()
    };
    let admin_head_timeout = match must("admin-head-timeout-ms").millis_or_never()? {
        Some(t) => t,
        None => return Err(must("admin-head-timeout-ms").error("a number of at least 1")),
    };
    if server.max_connections == 0 {
        return Err(must("max-connections").error("a number of at least 1"));
    }
    if let Some(seed) = get("seed") {
        server.seed = Some(seed.number()?);
    }
    let threshold = must("raw-threshold");
    server.raw_threshold = match threshold.number::<f32>() {
        Ok(t) if (0.0..=1.0).contains(&t) => t,
        _ => return Err(threshold.error("a number from 0 to 1")),
    };

    let tls_listen = match get("tls-listen") {
        Some(r) => r.address()?,
        None => None,
    };
    let (cert, key, client_ca) = (get("tls-cert"), get("tls-key"), get("tls-client-ca"));
    let tls = match tls_listen {
        Some(listen) => {
            let missing = |name: &str| format!("`--tls-listen` needs `--{name}`");
            Some(Tls {
                listen,
                cert: cert.ok_or_else(|| missing("tls-cert"))?.path(),
                key: key.ok_or_else(|| missing("tls-key"))?.path(),
                client_ca: client_ca.map(|r| r.path()),
            })
        }
        None => {
            if let Some(r) = cert.or(key).or(client_ca) {
                return Err(format!("{}: `--{}` is only used with `--tls-listen`", r.origin, r.flag.name));
            }
            None
        }
    };
    server.upstream = upstream(&get, server.max_recv_message)?;
    let record = match get("record") {
        None => None,
        Some(_) if server.upstream.is_none() => return Err("`--record` needs `--upstream`".into()),
        Some(dir) => {
            let list = |name: &'static str| -> Vec<String> {
                get(name).map_or_else(Vec::new, |r| {
                    r.text().split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
                })
            };
            Some(wirestub_engine::upstream::record::Options {
                dir: dir.path(),
                ignore_fields: list("record-ignore-fields"),
                redact: list("record-redact"),
                ignore_metadata: list("record-ignore-metadata"),
                pacing: must("record-pacing").switch()?,
                max_call_bytes: must("record-max-call-bytes").number()?,
                max_bytes: must("record-max-bytes").number()?,
            })
        }
    };
    let listen = must("listen").address()?;
    if listen.is_none() && tls.is_none() {
        return Err("nothing to serve on: `--listen off` and no `--tls-listen`".into());
    }

    let mut compile = wirestub_compiler::Options::default();
    if let Some(r) = lookup("protos") {
        compile.protos = r.values.iter().map(PathBuf::from).collect();
    }
    if let Some(r) = lookup("rules") {
        compile.rules = r.values.iter().map(PathBuf::from).collect();
    }
    compile.lenient = must("lenient").switch()?;
    if let Some(r) = lookup("protos-only") {
        compile.protos_only = r.values.iter().map(|v| v.replace('\\', "/")).collect();
    }
    // With an upstream, a plan is not needed: default directories that
    // do not exist are left out rather than refused.
    if server.upstream.is_some() {
        for (flag, dirs) in [("protos", &mut compile.protos), ("rules", &mut compile.rules)] {
            if lookup(flag).is_none() {
                dirs.retain(|d| d.is_dir());
            }
        }
    }

    Ok(Command::Run(Box::new(Options {
        plan: get("plan").map(|r| r.path()),
        plan_identity: get("plan-identity").map(|r| r.text().to_string()).filter(|t| !t.is_empty()),
        plan_ca: get("plan-ca").map(|r| r.path()).filter(|p| !p.as_os_str().is_empty()),
        compile,
        watch: must("watch").switch()?,
        no_match: must("no-match").choice(&[("not-found", NoMatch::NotFound), ("empty-ok", NoMatch::EmptyOk)])?,
        server,
        listen,
        tls,
        admin_listen: must("admin-listen").address()?,
        admin_listen_given: lookup("admin-listen").is_some(),
        admin_token: get("admin-token").map(|r| r.text().to_string()),
        admin_insecure: must("admin-insecure").switch()?,
        state_dir: get("state-dir").map(|r| r.path()),
        runtime_max_bytes: must("runtime-max-bytes").number()?,
        shared_state: get("shared-state")
            .map(|r| r.text().to_string())
            .filter(|u| !u.is_empty())
            .map(|u| (u, must("shared-state-prefix").text().to_string())),
        shared_tls: SharedTls {
            ca: get("shared-state-ca").map(|r| r.path()).filter(|p| !p.as_os_str().is_empty()),
            cert: get("shared-state-cert").map(|r| r.path()).filter(|p| !p.as_os_str().is_empty()),
            key: get("shared-state-key").map(|r| r.path()).filter(|p| !p.as_os_str().is_empty()),
        },
        shared_refuse: must("shared-state-policy").choice(&[("local", false), ("refuse", true)])?,
        shared_timeout: Duration::from_millis(must("shared-state-timeout-ms").number::<u64>()?.max(1)),
        shared_journal: match must("shared-journal").text() {
            "off" => None,
            _ => Some(must("shared-journal").number()?),
        },
        runtime_max_schema_bytes: must("runtime-max-schema-bytes").number()?,
        record,
        admin_head_timeout,
        journal: must("journal").number()?,
        shutdown_grace: Duration::from_millis(must("shutdown-grace-ms").number()?),
        log_format: must("log-format").choice(&[("text", LogFormat::Text), ("json", LogFormat::Json)])?,
        config_file,
    })))
}

fn flag(name: &str) -> &'static Flag {
    FLAGS.iter().find(|f| f.name == name).unwrap_or_else(|| panic!("no flag `{name}` in FLAGS"))
}

fn raw(flag: &'static Flag, values: Vec<String>, origin: Origin) -> Raw {
    Raw { flag, values, origin, items: Vec::new() }
}

/// "; did you mean `--x`?" for a near miss of a flag name, or nothing.
fn did_you_mean(name: &str, prefix: &str) -> String {
    match wirestub_compiler::diag::near_miss(name, FLAGS.iter().map(|f| f.name)) {
        Some(m) => format!("; did you mean `{prefix}{m}`?"),
        None => String::new(),
    }
}

/// The flags given on the command line, and the positional argument.
/// A flag given twice takes its last value, except repeatable ones, which
/// collect every value.
fn command_line(args: &[String]) -> Result<(HashMap<&'static str, Raw>, Option<String>), String> {
    let mut given: HashMap<&'static str, Raw> = HashMap::new();
    let mut positional = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let Some(long) = arg.strip_prefix("--") else {
            if arg.starts_with('-') && arg.len() > 1 {
                return Err(format!("command line: unknown flag `{arg}`"));
            }
            if positional.is_some() {
                return Err(format!("command line: unexpected argument `{arg}` (the plan is already given)"));
            }
            positional = Some(arg.clone());
            continue;
        };
        let (name, inline) = match long.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (long, None),
        };
        let Some(flag) = FLAGS.iter().find(|f| f.name == name) else {
            return Err(format!("command line: unknown flag `--{name}`{}", did_you_mean(name, "--")));
        };
        let value = match (flag.kind, inline) {
            (_, Some(v)) => v,
            (Kind::Switch, None) => "true".to_string(),
            (_, None) => it.next().cloned().ok_or_else(|| format!("command line: `--{name}` needs a value"))?,
        };
        match given.get_mut(flag.name) {
            Some(r) if matches!(flag.kind, Kind::Paths | Kind::Values) => r.values.push(value),
            _ => {
                given.insert(flag.name, raw(flag, vec![value], Origin::CommandLine));
            }
        }
    }
    Ok((given, positional))
}

/// The upstream calls are forwarded to, from `--upstream` and its options.
fn upstream(
    get: &dyn Fn(&'static str) -> Option<Raw>,
    max_message: usize,
) -> Result<Option<std::sync::Arc<wirestub_engine::config::Upstreams>>, String> {
    let options = ["upstream-ca", "upstream-cert", "upstream-key", "upstream-server-name"];
    let (default, services) = (get("upstream"), get("upstream-for"));
    let Some(url) = default.as_ref().or(services.as_ref()) else {
        if let Some(r) = options.iter().find_map(|&name| get(name)) {
            return Err(format!("{}: `--{}` is only used with `--upstream`", r.origin, r.flag.name));
        }
        return Ok(None);
    };
    let mode = get("upstream-mode").expect("a default").choice(&[
        ("fallback", wirestub_engine::config::UpstreamMode::Fallback),
        ("always", wirestub_engine::config::UpstreamMode::Always),
    ])?;
    let (cert, key) = (get("upstream-cert").map(|r| r.path()), get("upstream-key").map(|r| r.path()));
    let identity = match (&cert, &key) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        (None, None) => None,
        (Some(_), None) => return Err(format!("{}: `--upstream-cert` needs `--upstream-key`", url.origin)),
        (None, Some(_)) => return Err(format!("{}: `--upstream-key` needs `--upstream-cert`", url.origin)),
    };
    let ca = get("upstream-ca").map(|r| r.path());
    let server_name = get("upstream-server-name").map(|r| r.text().to_string());
    let timeout = get("upstream-connect-timeout-ms").expect("a default");
    let connect_timeout = match timeout.millis_or_never()? {
        Some(t) => t,
        None => return Err(timeout.error("a number of at least 1")),
    };
    let configure = |raw: &Raw, url: &str| {
        let options = wirestub_engine::upstream::Options {
            url,
            mode,
            ca: ca.as_deref(),
            identity,
            server_name: server_name.as_deref(),
            connect_timeout,
            max_message: max_message.max(4 << 20),
        };
        wirestub_engine::upstream::configure(&options)
            .map(std::sync::Arc::new)
            .map_err(|e| format!("{}: {e}", raw.origin))
    };
    let mut upstreams = wirestub_engine::config::Upstreams::default();
    if let Some(raw) = &default {
        upstreams.default = Some(configure(raw, raw.text())?);
    }
    if let Some(raw) = &services {
        for (i, value) in raw.values.iter().enumerate() {
            let Some((service, url)) = value.split_once('=').filter(|(s, u)| !s.is_empty() && !u.is_empty()) else {
                return Err(format!("{}: `--upstream-for` takes SERVICE=URL, got `{value}`", raw.origin_of(i)));
            };
            let service = service.trim().trim_start_matches('.');
            if upstreams.services.iter().any(|(s, _)| &**s == service) {
                return Err(format!("{}: `--upstream-for` names `{service}` twice", raw.origin));
            }
            upstreams.services.push((service.into(), configure(raw, url.trim())?));
        }
    }
    Ok(Some(std::sync::Arc::new(upstreams)))
}

/// Validation per service, from `--validation-for SERVICE=on|off`.
fn validation_services(raw: Option<&Raw>) -> Result<Vec<(Box<str>, bool)>, String> {
    let mut services: Vec<(Box<str>, bool)> = Vec::new();
    for (i, value) in raw.map(|r| &r.values[..]).unwrap_or_default().iter().enumerate() {
        let origin = raw.map(|r| r.origin_of(i).to_string()).unwrap_or_default();
        let parsed = value.split_once('=').and_then(|(s, v)| {
            let s = s.trim().trim_start_matches('.');
            let valid = !s.is_empty() && !s.contains(|c: char| c == '/' || c.is_whitespace());
            let on = match v.trim() {
                "on" => Some(true),
                "off" => Some(false),
                _ => None,
            };
            on.filter(|_| valid).map(|on| (s, on))
        });
        let Some((service, on)) = parsed else {
            return Err(format!(
                "{origin}: `--validation-for` takes SERVICE=on|off (such as demo.Greeter=on), got `{value}`"
            ));
        };
        if services.iter().any(|(s, _)| &**s == service) {
            return Err(format!("{origin}: `--validation-for` names `{service}` twice"));
        }
        services.push((service.into(), on));
    }
    Ok(services)
}

/// Reads a configuration file's text: one YAML mapping whose keys are flag
/// names. Relative paths are taken from the file's directory.
fn config_text(path: &Path, text: &str) -> Result<HashMap<&'static str, Raw>, String> {
    let source = wirestub_compiler::diag::SourceFile::new(path, text.to_string());
    let at = |line: u32, col: u32| format!("{}:{line}:{col}", path.display());
    let docs = yaml::parse(&source).map_err(|d| match &d.span {
        Some(s) => format!("{}: {}", at(s.line, s.col), d.message),
        None => format!("{}: {}", path.display(), d.message),
    })?;
    let mut out = HashMap::new();
    let top = match docs.as_slice() {
        [] => return Ok(out),
        [doc] if doc.is_null() => return Ok(out),
        [doc] => doc,
        [_, second, ..] => {
            return Err(format!("{}: one document expected, found another", at(second.span.line, second.span.col)))
        }
    };
    let Some(entries) = top.map() else {
        return Err(format!(
            "{}: expected a mapping of option names to values, found {}",
            at(top.span.line, top.span.col),
            top.describe()
        ));
    };
    let base = path.parent().unwrap_or(Path::new(""));
    for (key, value) in entries {
        let name = key.scalar().unwrap_or_default();
        let where_ = at(key.span.line, key.span.col);
        let Some(flag) = FLAGS.iter().find(|f| f.name == name) else {
            return Err(format!("{where_}: unknown key `{name}`{}", did_you_mean(name, "")));
        };
        if flag.name == "config" {
            return Err(format!("{where_}: `config` cannot be set in a config file"));
        }
        let scalar = |node: &Node| -> Result<String, String> {
            match &node.kind {
                NodeKind::Scalar { text, .. } => Ok(text.clone()),
                _ => Err(format!(
                    "{}: `{name}` takes {}, found {}",
                    at(node.span.line, node.span.col),
                    match flag.kind {
                        Kind::Switch => "true or false",
                        Kind::Paths | Kind::Values => "a list of values (or one value)",
                        _ => "one value",
                    },
                    node.describe()
                )),
            }
        };
        let mut items = Vec::new();
        let mut values = match (&value.kind, flag.kind) {
            (NodeKind::Null, _) => return Err(format!("{where_}: `{name}` has no value")),
            (NodeKind::Seq(list), Kind::Paths | Kind::Values) => {
                items = list.iter().map(|n| Origin::File(path.to_path_buf(), n.span.line)).collect();
                list.iter().map(scalar).collect::<Result<Vec<_>, _>>()?
            }
            _ => vec![scalar(value)?],
        };
        if matches!(flag.kind, Kind::Path | Kind::Paths) {
            for v in &mut values {
                *v = base.join(&*v).to_string_lossy().into_owned();
            }
        }
        let mut r = raw(flag, values, Origin::File(path.to_path_buf(), value.span.line));
        r.items = items;
        out.insert(flag.name, r);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    fn run_with(s: &str, env: &[(&str, &str)]) -> Result<Options, String> {
        let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        match parse(&args(s), &|k| env.get(k).cloned())? {
            Command::Run(o) => Ok(*o),
            c => panic!("expected run, got {c:?}"),
        }
    }

    fn run(s: &str) -> Options {
        run_with(s, &[]).unwrap()
    }

    /// A config file in a fresh temporary directory.
    fn config(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("wirestub-options-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("engine.yaml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn defaults_match_the_server_defaults() {
        let o = run("run");
        let d = Config::default();
        assert_eq!(o.server.workers, d.workers);
        assert_eq!(o.server.max_recv_message, d.max_recv_message);
        assert_eq!(o.server.max_buffered, d.max_buffered);
        assert_eq!(o.server.max_concurrent_streams, d.max_concurrent_streams);
        assert_eq!(o.server.max_header_list_size, d.max_header_list_size);
        assert_eq!(o.server.drain_timeout, d.drain_timeout);
        assert_eq!(o.server.max_connections, d.max_connections);
        assert_eq!(o.server.idle_timeout, d.idle_timeout);
        assert_eq!(o.server.handshake_timeout, d.handshake_timeout);
        assert_eq!(o.server.write_timeout, d.write_timeout);
        assert_eq!(o.server.stack, d.stack);
        assert_eq!(o.server.metrics, d.metrics);
        assert_eq!(o.server.journal, wirestub_engine::JournalLimits::DEFAULT);
        assert_eq!(o.admin_head_timeout, wirestub_engine::admin::DEFAULT_HEAD_TIMEOUT);
        assert_eq!(o.server.seed, None);
        let c = wirestub_compiler::Options::default();
        assert_eq!((o.compile.protos, o.compile.rules), (c.protos, c.rules));
        assert_eq!(o.listen.as_deref(), Some("127.0.0.1:50051"));
        assert_eq!(o.admin_listen.as_deref(), Some("127.0.0.1:9901"));
        assert!(!o.admin_listen_given);
        assert_eq!((o.plan, o.tls, o.admin_token, o.journal, o.watch), (None, None, None, 0, false));
        assert_eq!(o.log_format, LogFormat::Text);
        assert_eq!(o.no_match, NoMatch::NotFound);
    }

    #[test]
    fn every_flag_is_read_and_listed() {
        let mut seen = Vec::new();
        for f in FLAGS {
            assert!(!seen.contains(&f.name), "--{} twice", f.name);
            seen.push(f.name);
            assert!(!f.help.is_empty(), "--{} has no help", f.name);
            assert_eq!(f.value.is_empty(), f.kind == Kind::Switch, "--{}", f.name);
        }
        let help = help();
        for f in FLAGS {
            assert!(help.contains(&format!("\n  --{}", f.name)), "--{} not in help", f.name);
            assert!(help.contains(&format!("[env: {}]", f.env())), "{} not in help", f.env());
        }
        for line in help.lines() {
            assert!(line.chars().count() <= WIDTH, "too long: {line}");
        }
        assert_eq!(flag("max-recv-bytes").env(), "WIRESTUB_MAX_RECV_BYTES");
    }

    #[test]
    fn command_line_values() {
        let o = run("run plan.bin --listen 0.0.0.0:1 --workers=3 --protos a --protos b --rules r --watch \
                     --no-match empty-ok --max-recv-bytes 10 --max-concurrent-streams 11 --max-header-list-size 12 \
                     --drain-timeout-ms 13 --max-connections 14 --idle-timeout-ms 0 --handshake-timeout-ms 16 \
                     --write-timeout-ms 17 --seed 18 --http2 h2 --admin-listen off --admin-token t --journal 19 \
                     --metrics off --log-format json --tls-listen [::1]:0 --tls-cert c.pem --tls-key k.pem \
                     --tls-client-ca ca.pem");
        assert_eq!(o.plan, Some(PathBuf::from("plan.bin")));
        assert_eq!(o.listen.as_deref(), Some("0.0.0.0:1"));
        assert_eq!(o.server.workers, 3);
        assert_eq!(o.compile.protos, [PathBuf::from("a"), PathBuf::from("b")]);
        assert_eq!(o.compile.rules, [PathBuf::from("r")]);
        assert!(o.watch);
        assert_eq!(o.no_match, NoMatch::EmptyOk);
        assert_eq!(o.server.max_recv_message, 10);
        assert_eq!(o.server.max_concurrent_streams, 11);
        assert_eq!(o.server.max_header_list_size, 12);
        assert_eq!(o.server.drain_timeout, Duration::from_millis(13));
        assert_eq!(o.server.max_connections, 14);
        assert_eq!(o.server.idle_timeout, None);
        assert_eq!(o.server.handshake_timeout, Some(Duration::from_millis(16)));
        assert_eq!(o.server.write_timeout, Some(Duration::from_millis(17)));
        assert_eq!(o.server.seed, Some(18));
        assert_eq!(o.server.stack, Stack::H2);
        assert_eq!(o.admin_listen, None);
        assert!(o.admin_listen_given);
        assert_eq!(o.admin_token.as_deref(), Some("t"));
        assert_eq!(o.journal, 19);
        assert!(!o.server.metrics);
        assert_eq!(o.log_format, LogFormat::Json);
        let tls = o.tls.unwrap();
        assert_eq!(tls.listen, "[::1]:0");
        assert_eq!((tls.cert, tls.key), (PathBuf::from("c.pem"), PathBuf::from("k.pem")));
        assert_eq!(tls.client_ca, Some(PathBuf::from("ca.pem")));
        let o = run("run --journal-bytes 1000 --journal-messages 2 --journal-message-bytes 30 \
                     --admin-head-timeout-ms 1500");
        assert_eq!(o.server.journal, wirestub_engine::JournalLimits { bytes: 1000, messages: 2, message_bytes: 30 });
        assert_eq!(o.admin_head_timeout, Duration::from_millis(1500));
        assert!(run_with("run --admin-head-timeout-ms 0", &[]).unwrap_err().contains("at least 1"));
        assert_eq!(run("run --plan p.bin").plan, Some(PathBuf::from("p.bin")));
        assert!(!run("run --watch=false").watch);
    }

    #[test]
    fn help_and_version() {
        for a in ["--help", "-h", "help", "run --help", "run --listen x -h"] {
            assert!(matches!(parse(&args(a), &|_| None), Ok(Command::Help)), "{a}");
        }
        assert!(matches!(parse(&args("--version"), &|_| None), Ok(Command::Version)));
    }

    #[test]
    fn command_line_mistakes() {
        let err = |s: &str| run_with(s, &[]).unwrap_err();
        assert_eq!(err("run --lisen x:1"), "command line: unknown flag `--lisen`; did you mean `--listen`?");
        assert_eq!(err("run --workers"), "command line: `--workers` needs a value");
        assert_eq!(err("run --workers many"), "command line: `--workers` takes a number, got `many`");
        assert_eq!(
            err("run --max-connections 0"),
            "command line: `--max-connections` takes a number of at least 1, got `0`"
        );
        assert_eq!(err("run --http2 h3"), "command line: `--http2` takes native or h2, got `h3`");
        assert_eq!(err("run --listen 50051"), "command line: `--listen` takes HOST:PORT (or off), got `50051`");
        assert_eq!(err("run a.bin b.bin"), "command line: unexpected argument `b.bin` (the plan is already given)");
        assert!(err("run a.bin --plan b.bin").contains("given twice"));
        assert!(err("frobnicate").contains("unknown command"));
        assert_eq!(err("run --tls-listen 127.0.0.1:0 --tls-key k"), "`--tls-listen` needs `--tls-cert`");
        assert_eq!(err("run --tls-cert c"), "command line: `--tls-cert` is only used with `--tls-listen`");
        assert!(err("run --listen off").starts_with("nothing to serve on"));
        assert!(run("run --listen off --tls-listen 127.0.0.1:0 --tls-cert c --tls-key k").listen.is_none());
    }

    #[test]
    fn environment_values() {
        let o = run_with(
            "run",
            &[
                ("WIRESTUB_WORKERS", "5"),
                ("WIRESTUB_PROTOS", "a:b"),
                ("WIRESTUB_WATCH", "true"),
                ("WIRESTUB_PLAN", "p.bin"),
                ("WIRESTUB_ADMIN_TOKEN", "secret"),
            ],
        )
        .unwrap();
        assert_eq!(o.server.workers, 5);
        assert_eq!(o.compile.protos, [PathBuf::from("a"), PathBuf::from("b")]);
        assert!(o.watch);
        assert_eq!(o.plan, Some(PathBuf::from("p.bin")));
        assert_eq!(o.admin_token.as_deref(), Some("secret"));
        assert_eq!(
            run_with("run", &[("WIRESTUB_JOURNAL", "-1")]).unwrap_err(),
            "environment variable WIRESTUB_JOURNAL: `--journal` takes a number, got `-1`"
        );
        assert_eq!(
            run_with("run", &[("WIRESTUB_WATCH", "maybe")]).unwrap_err(),
            "environment variable WIRESTUB_WATCH: `--watch` takes true or false, got `maybe`"
        );
    }

    #[test]
    fn config_file_values_and_precedence() {
        let path = config(
            "precedence",
            "# engine options\nworkers: 2\nmax-connections: 7\nseed: 9\nprotos: [p1, p2]\nrules: r\n\
             admin-listen: off\nwatch: true\nplan: plans/a.bin\n",
        );
        let dir = path.parent().unwrap();
        let file = format!("run --config {}", path.display());
        let o = run(&file);
        assert_eq!((o.server.workers, o.server.max_connections, o.server.seed), (2, 7, Some(9)));
        assert_eq!(o.compile.protos, [dir.join("p1"), dir.join("p2")]);
        assert_eq!(o.compile.rules, [dir.join("r")]);
        assert_eq!(o.plan, Some(dir.join("plans/a.bin")));
        assert!(o.watch);
        assert_eq!(o.admin_listen, None);
        assert_eq!(o.config_file.as_deref(), Some(path.as_path()));
        // The environment wins over the file, the command line over both.
        let env = [("WIRESTUB_WORKERS", "3"), ("WIRESTUB_MAX_CONNECTIONS", "8")];
        let o = run_with(&format!("{file} --workers 4"), &env).unwrap();
        assert_eq!((o.server.workers, o.server.max_connections, o.server.seed), (4, 8, Some(9)));
        // WIRESTUB_CONFIG names the file too.
        let o = run_with("run", &[("WIRESTUB_CONFIG", path.to_str().unwrap())]).unwrap();
        assert_eq!(o.server.workers, 2);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn config_file_mistakes_name_file_and_line() {
        let cases = [
            ("unknown", "workers: 2\n\nlisen: 127.0.0.1:0\n", ":3:1: unknown key `lisen`; did you mean `listen`?"),
            ("bad-value", "workers: 2\nmax-connections: lots\n", ":2: `--max-connections` takes a number, got `lots`"),
            ("no-value", "seed:\n", ":1:1: `seed` has no value"),
            ("list", "workers: [1, 2]\n", ":1:10: `workers` takes one value, found a list"),
            ("not-a-map", "- workers\n", ":1:1: expected a mapping of option names to values, found a list"),
            ("duplicate", "seed: 1\nseed: 2\n", ":2:1: duplicate key `seed`"),
            ("syntax", "seed: [1\n", "syntax error"),
            ("config", "config: other.yaml\n", ":1:1: `config` cannot be set in a config file"),
            // A list's bad entry is named at its own line.
            (
                "list-entry",
                "validation-for:\n  - a.B=on\n  - c.D=maybe\n",
                ":3: `--validation-for` takes SERVICE=on|off (such as demo.Greeter=on), got `c.D=maybe`",
            ),
            (
                "list-mapping",
                "validation-for: {a.B: on}\n",
                ":1:17: `validation-for` takes a list of values (or one value), found a mapping",
            ),
        ];
        for (name, text, expected) in cases {
            let path = config(name, text);
            let err = run_with(&format!("run --config {}", path.display()), &[]).unwrap_err();
            let shown = path.display().to_string();
            assert!(err.starts_with(&shown) && err.contains(expected), "{name}: {err}");
            let _ = std::fs::remove_dir_all(path.parent().unwrap());
        }
        let err = run_with("run --config /nonexistent/engine.yaml", &[]).unwrap_err();
        assert!(err.starts_with("cannot read config file `/nonexistent/engine.yaml`"), "{err}");
    }
}
