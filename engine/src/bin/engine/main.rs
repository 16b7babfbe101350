//! The `engine` command: reads its options (command line, environment,
//! configuration file; see `options.rs`), loads the plan (or compiles the
//! protos and rules in process), starts the gRPC listeners and the admin
//! API, and serves until SIGINT or SIGTERM.
//!
//! Threads of its own, beside the server's: the main thread waits for
//! signals; a reload thread loads the next plan when SIGHUP arrives or
//! `--watch` sees the sources change (a plan that fails to load is logged
//! and the previous one keeps serving); the watch thread polls the
//! sources. On SIGINT or SIGTERM health goes NOT_SERVING (serving goes on
//! for `--shutdown-grace-ms`), then the server drains (GOAWAY, in-flight
//! calls finish up to `--drain-timeout-ms`) and the
//! engine exits 0; a second signal during the drain exits at once with 1.

mod completions;
mod options;
mod watch;

use options::{Command, LogFormat, Options};
use std::io::{IsTerminal, Write};
use std::net::TcpListener;
use std::process::ExitCode;
use std::sync::{mpsc, Arc};
use std::time::Duration;
use wirestub_engine::runtime::remote::{self, Fetcher};
use wirestub_engine::runtime::Runtime;
use wirestub_engine::server::Listeners;
use wirestub_engine::state::Reloader;
use wirestub_engine::{admin, Plan, Server, State};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // An empty variable counts as unset.
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let options = match options::parse(&args, &env) {
        Ok(Command::Run(o)) => o,
        Ok(Command::Help) => return print(&format!("{}\n", options::help())),
        Ok(Command::Version) => return print(&format!("engine {}\n", env!("CARGO_PKG_VERSION"))),
        Ok(Command::Completions(shell)) => match completions::script(&shell) {
            Ok(script) => return print(&script),
            Err(e) => {
                report(&format!("error: {e}\n"));
                return ExitCode::from(2);
            }
        },
        Err(msg) => {
            report(&format!("error: {msg}\n(`engine --help` lists the options)\n"));
            return ExitCode::from(2);
        }
    };
    init_logging(options.log_format);
    let format = options.log_format;
    match run(*options) {
        Ok(code) => code,
        Err(msg) => {
            fatal(format, &msg);
            ExitCode::from(1)
        }
    }
}

/// Logs to stderr at the level RUST_LOG sets (default info).
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Writes `text` to stdout and exits 0. A reader that went away
/// (`engine --help | head`) is no failure: the rest is not wanted. Any
/// other write error is reported, exit 1. (`println!` would panic on both.)
fn print(text: &str) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            report(&format!("error: cannot write to stdout: {e}\n"));
            ExitCode::from(1)
        }
    }
}

/// Writes `text` to stderr; if that fails there is nowhere left to say so
/// (`eprintln!` would panic).
fn report(text: &str) {
    let mut stderr = std::io::stderr().lock();
    let _ = stderr.write_all(text.as_bytes()).and_then(|()| stderr.flush());
}

/// Reports an error that stops the engine: as plain text for people (it
/// may be the compiler's rendered diagnostics), or as a JSON log line.
fn fatal(format: LogFormat, msg: &str) {
    match format {
        // The compiler's diagnostics come rendered, each with its label.
        LogFormat::Text if msg.starts_with("error:") => report(&format!("{}\n", msg.trim_end())),
        LogFormat::Text => report(&format!("error: {}\n", msg.trim_end())),
        LogFormat::Json => tracing::error!("{}", msg.trim_end()),
    }
}

/// A loaded plan: the plan, the file's bytes when read from one, and
/// where it came from.
type Loaded = (Plan, Option<Vec<u8>>, String);

/// Loads the first plan through the runtime store (which also answers the
/// runtime API and reloads).
fn plan_source(options: &Options, fetcher: Option<&Fetcher>) -> Result<(Arc<Runtime>, Loaded), String> {
    let (runtime, built) = match (&options.plan, fetcher) {
        (Some(_), Some(f)) => {
            let identity = f.fetch()?;
            tracing::info!(from = %f.shown(), identity = %identity, copy = %f.local.display(), "fetched the plan");
            Runtime::over_plan(&f.local, options.state_dir.as_deref())?
        }
        (Some(path), None) => {
            if options.plan_identity.is_some() {
                let bytes = std::fs::read(path).map_err(|e| format!("cannot read plan `{}`: {e}", path.display()))?;
                remote::check(&bytes, options.plan_identity.as_deref(), &format!("`{}`", path.display()))?;
            }
            Runtime::over_plan(path, options.state_dir.as_deref())?
        }
        (None, _) => {
            if options.plan_identity.is_some() {
                return Err("--plan-identity checks a plan: give --plan too".into());
            }
            if options.state_dir.is_some() {
                return Err("--state-dir goes with a plan file; without one, runtime changes are written into \
                            the --protos and --rules directories"
                    .into());
            }
            Runtime::from_dirs(options.compile.clone())?
        }
    };
    runtime.set_max_bytes(options.runtime_max_bytes);
    runtime.set_max_schema_bytes(options.runtime_max_schema_bytes);
    tracing::info!(source = %built.2, "loaded");
    Ok((Arc::new(runtime), built))
}

fn bind(flag: &str, addr: &str) -> Result<TcpListener, String> {
    wirestub_engine::server::listen(addr).map_err(|e| format!("cannot listen on {addr} (--{flag}): {e}"))
}

fn run(options: Options) -> Result<ExitCode, String> {
    if let Some(path) = &options.config_file {
        tracing::info!(file = %path.display(), "read options from config file");
    }
    // The sources are looked at before the plan is read, so that a change
    // made while it loads is not missed.
    let watcher = options.watch.then(|| {
        watch::Watcher::new(match &options.plan {
            Some(path) => watch::Target::Plan(path.clone()),
            None => {
                watch::Target::Sources { protos: options.compile.protos.clone(), rules: options.compile.rules.clone() }
            }
        })
    });
    let fetcher = fetcher(&options)?;
    let (runtime, (plan, bytes, source)) = plan_source(&options, fetcher.as_ref())?;
    let methods = plan.methods.len();
    let state =
        State::new(plan, bytes.as_deref(), source.clone(), options.no_match, options.server.workers, options.journal)
            .map_err(|e| format!("`{source}`: {e}"))?;
    let state = Arc::new(state);
    if let Some(record) = options.record.clone() {
        wirestub_engine::upstream::record::start(record, state.clone())?;
    }
    let reloads_from = runtime.clone();
    let fetches = fetcher.clone();
    let reloader: Reloader = Box::new(move || {
        if let Some(f) = &fetches {
            let identity = f.fetch()?;
            tracing::info!(from = %f.shown(), identity = %identity, "fetched the plan again");
        }
        reloads_from.reread().map_err(|d| d.render())
    });
    state.set_reloader(reloader);
    // Runtime changes shared with other replicas: caught up with before
    // serving (for a few seconds at most: Redis may be down).
    let peers = match &options.shared_state {
        Some((url, prefix)) => {
            let client = redis_client(url, &options.shared_tls)?;
            wirestub_engine::shared::configure(wirestub_engine::shared::Settings {
                client: client.clone(),
                prefix: prefix.clone(),
                policy: match options.shared_refuse {
                    true => wirestub_engine::shared::Policy::Refuse,
                    false => wirestub_engine::shared::Policy::Local,
                },
                timeout: options.shared_timeout,
            });
            let peers = Arc::new(wirestub_engine::runtime::peers::Peers::new(client.clone(), url, prefix)?);
            if let (Some(journal), Some(keep)) = (&state.journal, options.shared_journal) {
                let keep = if keep == 0 { options.journal } else { keep };
                wirestub_engine::observe::shared_journal::start(journal, client, prefix, keep, peers.id())?;
            }
            if let Some(f) = fetcher.as_ref().filter(|f| f.origin == remote::Origin::Shared) {
                peers.follow_plan(f.local.clone());
            }
            peers.start(runtime.clone(), state.clone(), std::time::Duration::from_secs(5))?;
            Some(peers)
        }
        None => None,
    };

    // Everything that can fail is checked before anything starts serving.
    let plain = options.listen.as_deref().map(|a| bind("listen", a)).transpose()?;
    let tls = match &options.tls {
        Some(t) => {
            let config = wirestub_engine::transport::tls::server_config(&t.cert, &t.key, t.client_ca.as_deref())?;
            Some((bind("tls-listen", &t.listen)?, config))
        }
        None => None,
    };
    let admin_listener = match options.admin_listen.as_deref().map(|a| bind("admin-listen", a)) {
        // The default address taken (another engine on this machine):
        // serve without the admin API rather than not at all.
        Some(Err(e)) if !options.admin_listen_given => {
            tracing::warn!("{e}; serving without the admin API (set --admin-listen to choose its address)");
            None
        }
        other => other.transpose()?,
    };

    if let Some(addr) = admin_listener.as_ref().and_then(|l| l.local_addr().ok()) {
        if options.admin_token.as_deref().is_none_or(|t| t.trim().is_empty())
            && !addr.ip().is_loopback()
            && !options.admin_insecure
        {
            return Err(format!(
                "the admin API would listen on {addr}, a non-loopback address, without --admin-token: anyone who \
                 reaches it could change the mocks. Set --admin-token, listen on loopback, or pass \
                 --admin-insecure if this is intended"
            ));
        }
    }
    let has_plain = plain.is_some();
    let server = Server::start(Listeners { plain, tls }, state.clone(), options.server.clone())
        .map_err(|e| format!("cannot start serving: {e}"))?;
    // The admin server lives as long as the process; it has no shutdown.
    let (_admin, admin_addr) = match admin_listener {
        Some(listener) => {
            let addr = listener.local_addr().map_err(|e| format!("admin listener: {e}"))?;
            let token = options.admin_token.clone();
            if token.is_none() && !addr.ip().is_loopback() {
                tracing::warn!(
                    %addr,
                    "the admin API listens on a non-loopback address without --admin-token (--admin-insecure): \
                     anyone who can reach it can change the mocks and read the journal"
                );
            }
            let admin = admin::Admin::start(
                listener,
                state.clone(),
                admin::Options {
                    token,
                    head_timeout: options.admin_head_timeout,
                    extension: Some(Arc::new(wirestub_engine::runtime::api::Api {
                        runtime: runtime.clone(),
                        peers: peers.clone(),
                    })),
                    upstream: options.server.upstream.clone(),
                    loopback: false,
                },
            )
            .map_err(|e| format!("cannot start the admin API on {addr}: {e}"))?;
            (Some(admin), Some(addr))
        }
        None => (None, None),
    };

    let reloads = spawn_reloads(state.clone()).map_err(|e| format!("cannot start the reload thread: {e}"))?;
    if let Some(watcher) = watcher {
        let tx = reloads.clone();
        watcher
            .spawn(move || {
                let _ = tx.send("watch");
            })
            .map_err(|e| format!("cannot start watching: {e}"))?;
    }

    // Signal handlers go in before the addresses are announced, so that a
    // signal sent as soon as a line appears is handled.
    let signals = Signals::install()?;
    let generation = state.current();
    tracing::info!(
        methods,
        identity = %generation.identity,
        source = %generation.source,
        workers = state.workers,
        watch = options.watch,
        "serving"
    );
    let mut stdout = std::io::stdout().lock();
    if has_plain {
        let _ = writeln!(stdout, "wirestub engine listening on {}", server.local_addr());
    }
    if let Some(addr) = server.tls_addr() {
        let _ = writeln!(stdout, "wirestub engine listening on {addr} (tls)");
    }
    if let Some(addr) = admin_addr {
        let _ = writeln!(stdout, "wirestub admin listening on {addr}");
    }
    let _ = stdout.flush();
    drop(stdout);

    let code = signals.serve(server, options.server.drain_timeout, options.shutdown_grace, reloads);
    // A copy of a fetched plan in a directory made for it goes with it.
    if let Some(f) = fetcher.as_ref().filter(|_| options.state_dir.is_none()) {
        if let Some(dir) = f.local.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    Ok(code)
}

/// Starts the thread that reloads the plan on request. Requests that
/// arrive while a reload runs are served by one more reload, not one each.
/// The message names what asked (`SIGHUP`, `watch`).
fn spawn_reloads(state: Arc<State>) -> std::io::Result<mpsc::Sender<&'static str>> {
    let (tx, rx) = mpsc::channel::<&'static str>();
    std::thread::Builder::new().name("wirestub-reload".into()).spawn(move || {
        while let Ok(trigger) = rx.recv() {
            while rx.try_recv().is_ok() {}
            match state.reload() {
                Ok(r) => tracing::info!(
                    trigger,
                    identity = %r.identity,
                    generation = r.number,
                    methods = r.methods,
                    rules = r.rules,
                    changed = r.changed,
                    "plan reloaded"
                ),
                Err(e) => {
                    tracing::error!(trigger, "plan reload failed, the previous plan keeps serving: {}", e.trim_end())
                }
            }
        }
    })?;
    Ok(tx)
}

/// SIGHUP, SIGINT and SIGTERM, registered up front and handled on the
/// main thread.
struct Signals {
    rt: tokio::runtime::Runtime,
    hup: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals, String> {
        use tokio::signal::unix::{signal, SignalKind};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the signal runtime: {e}"))?;
        let (hup, int, term) = rt
            .block_on(async {
                Ok::<_, std::io::Error>((
                    signal(SignalKind::hangup())?,
                    signal(SignalKind::interrupt())?,
                    signal(SignalKind::terminate())?,
                ))
            })
            .map_err(|e| format!("cannot install signal handlers: {e}"))?;
        Ok(Signals { rt, hup, int, term })
    }

    /// Serves until SIGINT or SIGTERM, asking for a reload on each SIGHUP,
    /// then drains. The exit code: 0 after a complete drain, 1 when a
    /// second signal cut it short.
    fn serve(
        self,
        server: Server,
        drain_timeout: Duration,
        grace: Duration,
        reloads: mpsc::Sender<&'static str>,
    ) -> ExitCode {
        let Signals { rt, mut hup, mut int, mut term } = self;
        rt.block_on(async move {
            let name = loop {
                tokio::select! {
                    _ = hup.recv() => {
                        tracing::info!("SIGHUP: reloading the plan");
                        let _ = reloads.send("SIGHUP");
                    }
                    _ = int.recv() => break "SIGINT",
                    _ = term.recv() => break "SIGTERM",
                }
            };
            server.state().start_draining();
            if !grace.is_zero() {
                tracing::info!(
                    grace_ms = grace.as_millis() as u64,
                    "{name}: health NOT_SERVING; serving on before draining (send it again to exit at once)"
                );
                tokio::select! {
                    _ = tokio::time::sleep(grace) => {}
                    _ = int.recv() => return second_signal(),
                    _ = term.recv() => return second_signal(),
                }
            }
            tracing::info!(
                drain_timeout_ms = drain_timeout.as_millis() as u64,
                "{name}: shutting down; draining in-flight calls (send it again to exit at once)"
            );
            let (done_tx, mut done) = tokio::sync::oneshot::channel::<()>();
            let drain = std::thread::Builder::new().name("wirestub-drain".into()).spawn(move || {
                server.shutdown();
                let _ = done_tx.send(());
            });
            if let Err(e) = drain {
                tracing::error!("cannot start draining: {e}");
                return ExitCode::from(1);
            }
            loop {
                tokio::select! {
                    _ = &mut done => {
                        tracing::info!("drained; exiting");
                        return ExitCode::SUCCESS;
                    }
                    _ = int.recv() => break,
                    _ = term.recv() => break,
                    _ = hup.recv() => tracing::info!("SIGHUP while draining: ignored"),
                }
            }
            second_signal()
        })
    }
}

fn second_signal() -> ExitCode {
    tracing::warn!("second signal: exiting without waiting for in-flight calls");
    ExitCode::from(1)
}

/// The client of the shared state's Redis: TLS with the given files for a
/// `rediss://` URL that has them.
fn redis_client(url: &str, tls: &options::SharedTls) -> Result<redis::Client, String> {
    let shown = wirestub_engine::runtime::peers::without_password(url);
    if !url.starts_with("redis://") && !url.starts_with("rediss://") {
        return Err(format!(
            "--shared-state `{shown}` is not a Redis URL: redis://[:PASSWORD@]HOST:PORT[/DB], or rediss://... for TLS"
        ));
    }
    if tls == &options::SharedTls::default() {
        return redis::Client::open(url).map_err(|e| format!("--shared-state `{shown}`: {e}"));
    }
    if !url.starts_with("rediss://") {
        return Err(format!(
            "--shared-state-ca, --shared-state-cert and --shared-state-key are for a TLS Redis (rediss://), not \
             `{shown}`"
        ));
    }
    let read = |flag: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("--{flag} `{}`: {e}", path.display()))
    };
    let root_cert = tls.ca.as_deref().map(|p| read("shared-state-ca", p)).transpose()?;
    let client_tls = match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read("shared-state-cert", cert)?,
            client_key: read("shared-state-key", key)?,
        }),
        (None, None) => None,
        _ => return Err("--shared-state-cert and --shared-state-key go together".into()),
    };
    redis::Client::build_with_tls(url, redis::TlsCertificates { client_tls, root_cert })
        .map_err(|e| format!("--shared-state `{shown}`: {e}"))
}

/// How `--plan` is fetched when it is a URL or `shared:`; None for a file.
fn fetcher(options: &Options) -> Result<Option<Fetcher>, String> {
    if let Some(identity) = &options.plan_identity {
        remote::check_identity_text(identity)?;
    }
    let plan = options.plan.as_deref().and_then(|p| p.to_str());
    let Some(origin) = plan.and_then(remote::Origin::of) else {
        if let Some((scheme, _)) = plan.and_then(|p| p.split_once("://")) {
            return Err(format!(
                "--plan `{}`: {scheme}:// is not a way to fetch a plan (a file, http://, https:// or shared:)",
                remote::shown_url(plan.unwrap_or_default())
            ));
        }
        return Ok(None);
    };
    if options.plan_ca.is_some() && origin == remote::Origin::Shared {
        return Err("--plan-ca is for an https:// plan; --plan shared: reads it from --shared-state".into());
    }
    if options.watch {
        return Err(format!(
            "--watch watches files; a plan from {} is fetched again on each reload (POST /admin/reload{})",
            options.plan.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
            if origin == remote::Origin::Shared { ", or when announced on the shared state" } else { "" }
        ));
    }
    let shared = match (&origin, &options.shared_state) {
        (remote::Origin::Shared, None) => {
            return Err("--plan shared: reads the plan stored in the shared state: give --shared-state too".into())
        }
        (_, Some((url, prefix))) => Some((redis_client(url, &options.shared_tls)?, prefix.clone())),
        (_, None) => None,
    };
    let local = match &options.state_dir {
        Some(dir) => dir.join("plan.bin"),
        None => private_dir()?.join("plan.bin"),
    };
    Ok(Some(Fetcher { origin, identity: options.plan_identity.clone(), ca: options.plan_ca.clone(), shared, local }))
}

/// A directory of the system's temporary one that this process made (only
/// its user may enter it), for the copy of a fetched plan: nobody else can
/// have put a file or a link where the copy is written.
fn private_dir() -> Result<std::path::PathBuf, String> {
    let base = std::env::temp_dir();
    let mut last = None;
    for _ in 0..16 {
        let dir = base.join(format!("wirestub-plan-{}-{}", std::process::id(), wirestub_engine::rng::unique_hex()));
        let mut builder = std::fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        match builder.create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(format!("cannot make a directory for the fetched plan in `{}`: {e}", base.display())),
        }
    }
    Err(format!(
        "cannot make a directory for the fetched plan in `{}`: {}",
        base.display(),
        last.map_or_else(String::new, |e| e.to_string())
    ))
}
