//! The `engine` command. Thin: parses arguments, loads (or compiles) the
//! plan, starts the server and waits for Ctrl-C or SIGTERM.

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use wirestub_engine::{Config, NoMatch, Plan, Server};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "\
usage:
  engine run [PLAN] [options]

Serves PLAN (a file written by `compiler build`). Without PLAN, compiles
the .proto files and rules in --protos and --rules first.

options:
  --listen HOST:PORT           address to serve gRPC on (default 127.0.0.1:50051;
                               port 0 picks a free one)
  --workers N                  worker threads (default: one per core)
  --protos DIR                 proto directory when compiling (default protos/), repeatable
  --rules DIR                  rules directory when compiling (default rules/), repeatable
  --no-match not-found|empty-ok
                               answer to calls no rule matches (default not-found:
                               NOT_FOUND naming the method; empty-ok: OK, empty message)
  --max-recv-bytes N           largest request message (default 4194304)
  --max-concurrent-streams N   per connection (default 1024)
  --max-header-list-size N     bytes (default 16384)
  --drain-timeout-ms N         time in-flight calls get on shutdown (default 5000)
  --max-connections N          connections open at once; more are closed as soon as
                               accepted (default 10000)
  --idle-timeout-ms N          GOAWAY and close a connection with no call in progress
                               for this long (default 300000; 0: never)
  --handshake-timeout-ms N     close a connection that has not sent the HTTP/2
                               preface within this time (default 10000; 0: never)
  --http2 native|h2           HTTP/2 implementation: the engine's own gRPC-specialised
                               stack (default) or the h2 crate, kept as the reference
  --write-timeout-ms N         drop a connection whose client takes none of the
                               engine's output for this long (default 30000; 0: never)
  --seed N                     seed the random source (latencies, faults, shuffles,
                               template utilities) so runs repeat

The address it serves on is printed as `wirestub engine listening on ADDR`.
Logs go to stderr; RUST_LOG sets the level (default info).";

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("error: {msg}\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn number<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.parse().map_err(|_| format!("`{flag}` takes a number, got `{v}`"))
}

/// A timeout flag's value: 0 turns the timeout off.
fn millis_or_never(ms: u64) -> Option<Duration> {
    (ms != 0).then(|| Duration::from_millis(ms))
}

fn run(args: &[String]) -> Result<ExitCode, String> {
    match args.first().map(String::as_str) {
        Some("run") => {}
        Some("-h" | "--help") => {
            println!("{USAGE}");
            return Ok(ExitCode::SUCCESS);
        }
        Some(other) => return Err(format!("unknown command `{other}`")),
        None => return Err("no command given".into()),
    }
    let mut config = Config::default();
    let mut listen = "127.0.0.1:50051".to_string();
    let mut plan_path = None;
    let mut options = wirestub_compiler::Options::default();
    let (mut protos, mut rules) = (Vec::new(), Vec::new());
    let mut no_match = NoMatch::NotFound;
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| format!("`{a}` needs a value"));
        match a.as_str() {
            "--listen" => listen = value()?,
            "--workers" => config.workers = number(a, &value()?)?,
            "--protos" => protos.push(PathBuf::from(value()?)),
            "--rules" => rules.push(PathBuf::from(value()?)),
            "--no-match" => {
                no_match = match value()?.as_str() {
                    "not-found" => NoMatch::NotFound,
                    "empty-ok" => NoMatch::EmptyOk,
                    v => return Err(format!("`--no-match` takes not-found or empty-ok, got `{v}`")),
                }
            }
            "--max-recv-bytes" => config.max_recv_message = number(a, &value()?)?,
            "--max-concurrent-streams" => config.max_concurrent_streams = number(a, &value()?)?,
            "--max-header-list-size" => config.max_header_list_size = number(a, &value()?)?,
            "--drain-timeout-ms" => config.drain_timeout = Duration::from_millis(number(a, &value()?)?),
            "--max-connections" => {
                config.max_connections = number(a, &value()?)?;
                if config.max_connections == 0 {
                    return Err("`--max-connections` must be at least 1".into());
                }
            }
            "--idle-timeout-ms" => config.idle_timeout = millis_or_never(number(a, &value()?)?),
            "--handshake-timeout-ms" => config.handshake_timeout = millis_or_never(number(a, &value()?)?),
            "--write-timeout-ms" => config.write_timeout = millis_or_never(number(a, &value()?)?),
            "--seed" => config.seed = Some(number(a, &value()?)?),
            "--http2" => {
                config.stack = match value()?.as_str() {
                    "native" => wirestub_engine::Stack::Native,
                    "h2" => wirestub_engine::Stack::H2,
                    v => return Err(format!("`--http2` takes native or h2, got `{v}`")),
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(ExitCode::SUCCESS);
            }
            s if s.starts_with('-') => return Err(format!("unknown flag `{s}`")),
            s if plan_path.is_none() => plan_path = Some(PathBuf::from(s)),
            s => return Err(format!("unexpected argument `{s}`")),
        }
    }
    if !protos.is_empty() {
        options.protos = protos;
    }
    if !rules.is_empty() {
        options.rules = rules;
    }

    let plan = match &plan_path {
        Some(path) => {
            let bytes = match std::fs::read(path) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("error: cannot read plan `{}`: {e}", path.display());
                    return Ok(ExitCode::from(1));
                }
            };
            match Plan::from_bytes(&bytes) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("error: `{}`: {e}", path.display());
                    return Ok(ExitCode::from(1));
                }
            }
        }
        None => match wirestub_compiler::compile(&options) {
            Ok(out) => {
                eprint!("{}", out.warnings.render());
                tracing::info!("compiled {}", out.summary());
                out.plan
            }
            Err(diags) => {
                eprint!("{}", diags.render());
                return Ok(ExitCode::from(1));
            }
        },
    };
    let methods = plan.methods.len();
    let source = plan_path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "compiled plan".into());
    let state = match wirestub_engine::State::new(plan, None, source.clone(), no_match, config.workers, 0) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("error: `{source}`: {e}");
            return Ok(ExitCode::from(1));
        }
    };

    let listener = match TcpListener::bind(&listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on {listen}: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let listeners = wirestub_engine::server::Listeners { plain: Some(listener), tls: None };
    let server = match Server::start(listeners, state, config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    // Signal handlers go in before the address is announced, so that a
    // Ctrl-C sent as soon as the line appears is a clean shutdown.
    let signals = Signals::install();
    tracing::info!(methods, "serving");
    println!("wirestub engine listening on {}", server.local_addr());
    let _ = std::io::stdout().flush();

    signals.wait();
    tracing::info!("shutting down: draining in-flight calls");
    server.shutdown();
    Ok(ExitCode::SUCCESS)
}

/// SIGINT and SIGTERM, registered up front and waited on later.
struct Signals {
    rt: tokio::runtime::Runtime,
    int: Option<tokio::signal::unix::Signal>,
    term: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
        let (int, term) =
            rt.block_on(async { (signal(SignalKind::interrupt()).ok(), signal(SignalKind::terminate()).ok()) });
        Signals { rt, int, term }
    }

    /// Blocks until Ctrl-C (SIGINT) or SIGTERM.
    fn wait(mut self) {
        self.rt.block_on(async {
            tokio::select! {
                _ = next(self.int.as_mut()) => {}
                _ = next(self.term.as_mut()) => {}
            }
        });
    }
}

async fn next(signal: Option<&mut tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}
