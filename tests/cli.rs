//! The `engine` binary as people run it: `--help`; options from the command
//! line, the environment and a config file, and their precedence; errors
//! that name where a bad value came from; plan reloads on SIGHUP and with
//! `--watch`; the drain on SIGTERM; the admin listener; JSON logs.
//!
//! Every engine listens on loopback port 0, is watched through its stdout
//! (`... listening on ADDR` lines) and its stderr (the log), and is called
//! with a real gRPC client. Every wait is bounded.

use bytes::Bytes;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use wirestub_tests::RawCodec;

/// The longest an engine may take to print its listening lines.
const START: Duration = Duration::from_secs(60);
/// The longest a log line the test waits for may take to appear.
const LOG: Duration = Duration::from_secs(20);

// ---- fixtures -------------------------------------------------------------

const PROTO: &str = r#"
syntax = "proto3";
package cli.v1;
service Echo {
  rpc Get (Req) returns (Rep);
  rpc Slow (Req) returns (Rep);
  rpc Picky (Req) returns (Rep);
}
message Req { string name = 1; }
message Rep { string v = 1; }
"#;

/// A fresh directory for one test, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("wirestub-cli-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `protos/cli.proto` and the rule files of a plan whose `Get`
    /// answers `v`; `Slow` answers `slow` after `slow_ms`; `Picky` answers
    /// only the name `x`.
    fn write_sources(&self, v: &str, slow_ms: u64) {
        std::fs::create_dir_all(self.path("protos")).unwrap();
        std::fs::create_dir_all(self.path("rules")).unwrap();
        std::fs::write(self.path("protos/cli.proto"), PROTO).unwrap();
        std::fs::write(self.path("rules/cli.v1.echo.get.yaml"), format!("responses:\n  - body: {{ v: {v} }}\n"))
            .unwrap();
        std::fs::write(
            self.path("rules/cli.v1.echo.slow.yaml"),
            format!("responses:\n  - body: {{ v: slow }}\n    delay_ms: {slow_ms}\n"),
        )
        .unwrap();
        std::fs::write(
            self.path("rules/cli.v1.echo.picky.yaml"),
            "responses:\n  - when: { request.name: x }\n    body: { v: x }\n",
        )
        .unwrap();
    }

    /// Compiles the sources as they are now into `name`, written whole
    /// under another name first and renamed, as a deployment would.
    fn write_plan(&self, name: &str) -> PathBuf {
        let options = wirestub_compiler::Options {
            protos: vec![self.path("protos")],
            rules: vec![self.path("rules")],
            protos_only: Vec::new(),
            lenient: false,
        };
        let out = match wirestub_compiler::compile(&options) {
            Ok(o) => o,
            Err(d) => panic!("test sources do not compile:\n{}", d.render()),
        };
        let path = self.path(name);
        let tmp = self.path(&format!("{name}.tmp"));
        std::fs::write(&tmp, out.plan.to_bytes()).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }

    /// A plan file whose `Get` answers `v`.
    fn plan(&self, name: &str, v: &str, slow_ms: u64) -> PathBuf {
        self.write_sources(v, slow_ms);
        self.write_plan(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---- the engine process ---------------------------------------------------

fn bin(name: &str) -> PathBuf {
    // Integration tests of another package cannot use CARGO_BIN_EXE_*; the
    // binaries sit next to the test executable's parent directory
    // (`cargo build --workspace` builds them; test.sh does so first).
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join(name);
    assert!(path.exists(), "{} not built; run `cargo build --workspace` first", path.display());
    path
}

/// The engine command, with the test runner's own `WIRESTUB_*` variables
/// and `RUST_LOG` removed so that only what a test sets applies.
fn engine(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(bin("engine"));
    cmd.args(args).stdin(Stdio::null());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("WIRESTUB_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs the engine to completion (for commands that exit at once).
fn output(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut child = engine(args, env).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + START;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("engine {args:?} did not exit within {START:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// A running engine.
struct Engine {
    child: Child,
    /// Address of the cleartext gRPC listener.
    grpc: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    /// Everything the engine printed on stdout so far.
    stdout: Vec<String>,
    /// Everything it logged so far.
    log: Arc<Mutex<String>>,
}

impl Engine {
    /// Starts the engine and waits for `lines` listening lines and for the
    /// `serving` log line.
    fn start(args: &[&str], env: &[(&str, &str)], lines: usize) -> Engine {
        let mut child = engine(args, env).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut engine = Engine { child, grpc: None, admin: None, stdout: Vec::new(), log };
        let deadline = Instant::now() + START;
        while engine.stdout.len() < lines {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("wirestub engine listening on ") {
                        if !addr.ends_with("(tls)") {
                            engine.grpc = Some(addr.parse().unwrap());
                        }
                    } else if let Some(addr) = line.strip_prefix("wirestub admin listening on ") {
                        engine.admin = Some(addr.parse().unwrap());
                    }
                    engine.stdout.push(line);
                }
                Err(_) => {
                    let _ = engine.child.kill();
                    std::thread::sleep(Duration::from_millis(100));
                    panic!(
                        "engine {args:?} printed {:?}, not {lines} listening lines, within {START:?}; log:\n{}",
                        engine.stdout,
                        engine.log()
                    );
                }
            }
        }
        // Everything logged before the lines (warnings about the options
        // included) has then been read.
        engine.wait_log("serving", 1);
        engine
    }

    fn addr(&self) -> SocketAddr {
        self.grpc.expect("a cleartext listener")
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log holds `text` `count` times or more.
    fn wait_log(&self, text: &str, count: usize) {
        let deadline = Instant::now() + LOG;
        while self.log().matches(text).count() < count {
            assert!(Instant::now() < deadline, "no `{text}` (×{count}) in the log within {LOG:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill").args(["-s", name, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success(), "kill -s {name} failed");
    }

    /// Waits for the engine to exit.
    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "engine still running after {within:?}; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---- the gRPC client ------------------------------------------------------

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A gRPC client of `cli.v1.Echo`; clones share one connection.
#[derive(Clone)]
struct Echo(tonic::client::Grpc<tonic::transport::Channel>);

impl Echo {
    async fn connect(addr: SocketAddr) -> Echo {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
        let channel = tokio::time::timeout(LOG, endpoint.connect()).await.expect("connect in time").unwrap();
        Echo(tonic::client::Grpc::new(channel))
    }

    /// Calls `method` with `Req { name }`; Ok(Rep.v) or the status code.
    async fn call(&mut self, method: &str, name: &str) -> Result<String, tonic::Code> {
        let mut request = vec![0x0a, name.len() as u8];
        request.extend_from_slice(name.as_bytes());
        let mut req = tonic::Request::new(Bytes::from(request));
        req.set_timeout(LOG);
        let call = async {
            self.0.ready().await.unwrap();
            let path = format!("/cli.v1.Echo/{method}").parse().unwrap();
            self.0.unary(req, path, RawCodec).await
        };
        match tokio::time::timeout(LOG + Duration::from_secs(5), call).await.expect("the call ends in time") {
            Ok(reply) => Ok(decode_rep(reply.get_ref())),
            Err(status) => Err(status.code()),
        }
    }
}

/// `Rep.v` from an encoded `Rep` (field 1, a short string, or nothing).
fn decode_rep(bytes: &[u8]) -> String {
    match bytes {
        [] => String::new(),
        [0x0a, len, rest @ ..] if *len as usize == rest.len() => String::from_utf8(rest.to_vec()).unwrap(),
        _ => panic!("not a Rep: {bytes:?}"),
    }
}

/// One call on a fresh connection.
fn call(addr: SocketAddr, method: &str, name: &str) -> Result<String, tonic::Code> {
    runtime().block_on(async { Echo::connect(addr).await.call(method, name).await })
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

// ---- --help ---------------------------------------------------------------

/// Every flag of `engine run`, with its environment variable.
const FLAGS: &[&str] = &[
    "plan",
    "protos",
    "rules",
    "watch",
    "no-match",
    "seed",
    "listen",
    "tls-listen",
    "tls-cert",
    "tls-key",
    "tls-client-ca",
    "http2",
    "workers",
    "admin-listen",
    "admin-token",
    "metrics",
    "journal",
    "journal-bytes",
    "journal-messages",
    "journal-message-bytes",
    "admin-head-timeout-ms",
    "log-format",
    "config",
    "max-recv-bytes",
    "max-buffered-bytes",
    "max-concurrent-streams",
    "max-header-list-size",
    "max-connections",
    "idle-timeout-ms",
    "handshake-timeout-ms",
    "write-timeout-ms",
    "drain-timeout-ms",
];

#[test]
fn help_lists_every_flag_its_default_and_its_environment_variable() {
    let top = output(&["--help"], &[]);
    let run = output(&["run", "--help"], &[]);
    assert!(top.status.success() && run.status.success());
    assert_eq!(top.stdout, run.stdout);
    let help = String::from_utf8(top.stdout).unwrap();
    for flag in FLAGS {
        let env = format!("WIRESTUB_{}", flag.to_uppercase().replace('-', "_"));
        assert!(help.contains(&format!("\n  --{flag}")), "--{flag} missing:\n{help}");
        assert!(help.contains(&format!("[env: {env}]")), "{env} missing:\n{help}");
    }
    for default in [
        "[default: 127.0.0.1:50051]",
        "[default: 127.0.0.1:9901]",
        "[default: 4194304]",
        "[default: 5000]",
        "[default: 10000]",
        "[default: not-found]",
        "[default: on]",
        "[default: text]",
    ] {
        assert!(help.contains(default), "{default} missing:\n{help}");
    }
    let bad = output(&["run", "--frobnicate"], &[]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown flag `--frobnicate`"));
}

// ---- output to a reader that went away ------------------------------------

/// When the reader of a command's stdout goes away.
#[derive(Debug, Clone, Copy)]
enum Reader {
    /// Before the command starts: every write fails (`cmd | true`).
    Gone,
    /// After reading this many bytes (`cmd | head -c N`): writes past what
    /// the pipe holds fail.
    ReadsOnly(usize),
}

/// Runs `cmd` with stdout a pipe whose reader goes away; returns its exit
/// status and stderr.
fn into_closed_pipe(mut cmd: Command, reader: Reader) -> (ExitStatus, String) {
    cmd.stdin(Stdio::null()).stderr(Stdio::piped());
    let mut child = match reader {
        Reader::Gone => {
            // `true` holds the pipe's only read end and exits without
            // reading: the command gets a pipe nobody reads.
            let mut sink = Command::new("true").stdin(Stdio::piped()).spawn().unwrap();
            let pipe = sink.stdin.take().unwrap();
            sink.wait().unwrap();
            cmd.stdout(pipe).spawn().unwrap()
        }
        Reader::ReadsOnly(n) => {
            let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
            let mut head = vec![0; n];
            child.stdout.take().unwrap().read_exact(&mut head).unwrap();
            child
        }
    };
    let mut stderr = child.stderr.take().unwrap();
    let collect = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + START;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} did not exit within {START:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, collect.join().unwrap())
}

/// A command's output cut short exits as it would have, without panicking.
fn assert_quiet(cmd: Command, reader: Reader, code: i32) {
    let what = format!("{cmd:?} with {reader:?}");
    let (status, stderr) = into_closed_pipe(cmd, reader);
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    assert_ne!(status.code(), Some(101), "{what}: {stderr}");
    assert_eq!(status.code(), Some(code), "{what}: {stderr}");
}

#[test]
fn help_into_a_closed_pipe_exits_quietly() {
    for reader in [Reader::Gone, Reader::ReadsOnly(16)] {
        assert_quiet(engine(&["--help"], &[]), reader, 0);
        assert_quiet(engine(&["run", "--help"], &[]), reader, 0);
        let mut compiler = Command::new(bin("compiler"));
        compiler.arg("--help");
        assert_quiet(compiler, reader, 0);
    }
    assert_quiet(engine(&["--version"], &[]), Reader::Gone, 0);

    // Errors about the usage go to stderr; with nobody reading it the exit
    // status still tells.
    for (mut cmd, code) in [(engine(&["run", "--frobnicate"], &[]), 2), (Command::new(bin("compiler")), 2)] {
        let mut sink = Command::new("true").stdin(Stdio::piped()).spawn().unwrap();
        let pipe = sink.stdin.take().unwrap();
        sink.wait().unwrap();
        let status = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(pipe).status().unwrap();
        assert_eq!(status.code(), Some(code), "{cmd:?}");
    }
}

#[test]
fn a_dump_into_a_closed_pipe_exits_quietly() {
    // A dump far larger than a pipe holds, so that writing it fails.
    let dir = TempDir::new("dump-pipe");
    dir.write_sources("v", 0);
    let many: String =
        (0..2000).map(|i| format!("  - when: {{ request.name: n{i} }}\n    body: {{ v: a{i} }}\n")).collect();
    std::fs::write(dir.path("rules/cli.v1.echo.get.yaml"), format!("responses:\n{many}")).unwrap();
    let plan = dir.write_plan("plan.bin");
    let dump = |reader| {
        let mut cmd = Command::new(bin("compiler"));
        cmd.arg("dump").arg(&plan);
        assert_quiet(cmd, reader, 0);
    };
    dump(Reader::Gone);
    dump(Reader::ReadsOnly(16));
}

// ---- hostile rule files ---------------------------------------------------

/// The alias bomb of `tests/diagnostics/alias-bomb` (nine levels of nine
/// aliases: 9^9 nodes expanded) is refused at once, with the alias named,
/// by `compiler build` and by `engine run` compiling in process.
#[test]
fn an_alias_bomb_is_refused_promptly() {
    let rules = wirestub_tests::root().join("tests/diagnostics/alias-bomb/rules");
    let protos = wirestub_tests::root().join("tests/diagnostics-protos");
    let dir = TempDir::new("alias-bomb");
    let plan = dir.path("plan.bin");
    let expected = "error: expanding this alias goes past the limit of 1000000 YAML nodes and text bytes";
    let mut compiler = Command::new(bin("compiler"));
    compiler.args(["build", "--protos", s(&protos), "--rules", s(&rules), "-o", s(&plan)]);
    let engine = engine(&["run", "--protos", s(&protos), "--rules", s(&rules), "--listen", "127.0.0.1:0"], &[]);
    for mut cmd in [compiler, engine] {
        let started = Instant::now();
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        // Generous: unbounded, it takes minutes and tens of GiB.
        let limit = Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > limit {
                let _ = child.kill();
                panic!("{cmd:?} still running after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cmd:?}: {stderr}");
        assert!(stderr.contains(expected), "{cmd:?}: {stderr}");
        assert!(stderr.contains("d.svc.get.yaml:6:28"), "{cmd:?}: {stderr}");
    }
    assert!(!plan.exists());
}

// ---- where options come from ---------------------------------------------

#[test]
fn an_environment_variable_sets_a_flag() {
    let dir = TempDir::new("env");
    let plan = dir.plan("plan.bin", "v1", 0);
    let env = [
        ("WIRESTUB_PLAN", s(&plan)),
        ("WIRESTUB_LISTEN", "127.0.0.1:0"),
        ("WIRESTUB_ADMIN_LISTEN", "off"),
        ("WIRESTUB_NO_MATCH", "empty-ok"),
    ];
    let engine = Engine::start(&["run"], &env, 1);
    assert_eq!(call(engine.addr(), "Get", ""), Ok("v1".into()));
    assert_eq!(call(engine.addr(), "Picky", "nobody"), Ok(String::new()), "WIRESTUB_NO_MATCH=empty-ok applies");
}

#[test]
fn a_config_file_sets_flags_with_paths_from_its_directory() {
    let dir = TempDir::new("config");
    dir.plan("plan.bin", "v1", 0);
    let config = dir.path("engine.yaml");
    std::fs::write(
        &config,
        "# engine options\nplan: plan.bin\nlisten: 127.0.0.1:0\nadmin-listen: off\nno-match: empty-ok\n",
    )
    .unwrap();
    let engine = Engine::start(&["run", "--config", s(&config)], &[], 1);
    assert_eq!(call(engine.addr(), "Get", ""), Ok("v1".into()));
    assert_eq!(call(engine.addr(), "Picky", "nobody"), Ok(String::new()), "no-match: empty-ok applies");
    drop(engine);
    // WIRESTUB_CONFIG names it as well.
    let engine = Engine::start(&["run"], &[("WIRESTUB_CONFIG", s(&config))], 1);
    assert_eq!(call(engine.addr(), "Picky", "nobody"), Ok(String::new()));
}

#[test]
fn the_command_line_beats_the_environment_which_beats_the_file() {
    let dir = TempDir::new("precedence");
    let plan = dir.plan("plan.bin", "v1", 0);
    let config = dir.path("engine.yaml");
    std::fs::write(&config, "listen: 127.0.0.1:0\nadmin-listen: off\nno-match: empty-ok\n").unwrap();
    let base = ["run", s(&plan), "--config", s(&config)];

    let file_only = Engine::start(&base, &[], 1);
    assert_eq!(call(file_only.addr(), "Picky", "nobody"), Ok(String::new()), "the file applies");
    drop(file_only);

    let env = [("WIRESTUB_NO_MATCH", "not-found")];
    let env_over_file = Engine::start(&base, &env, 1);
    assert_eq!(call(env_over_file.addr(), "Picky", "nobody"), Err(tonic::Code::NotFound), "env beats the file");
    drop(env_over_file);

    let mut args = base.to_vec();
    args.extend(["--no-match", "empty-ok"]);
    let flag_over_env = Engine::start(&args, &env, 1);
    assert_eq!(call(flag_over_env.addr(), "Picky", "nobody"), Ok(String::new()), "the flag beats env");
}

#[test]
fn mistakes_name_the_file_line_or_variable() {
    let dir = TempDir::new("mistakes");
    let config = dir.path("engine.yaml");
    std::fs::write(&config, "listen: 127.0.0.1:0\n\nlisen: 127.0.0.1:0\n").unwrap();
    let out = output(&["run", "--config", s(&config)], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:3:1: unknown key `lisen`; did you mean `listen`?", config.display())),
        "{stderr}"
    );

    std::fs::write(&config, "workers: 2\nmax-connections: lots\n").unwrap();
    let out = output(&["run", "--config", s(&config)], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:2: `--max-connections` takes a number, got `lots`", config.display())),
        "{stderr}"
    );

    let out = output(&["run"], &[("WIRESTUB_WORKERS", "many")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("environment variable WIRESTUB_WORKERS: `--workers` takes a number, got `many`"),
        "{stderr}"
    );

    let out = output(&["run", "--tls-listen", "127.0.0.1:0"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`--tls-listen` needs `--tls-cert`"));
}

// ---- reloads --------------------------------------------------------------

#[test]
fn sighup_reloads_the_plan_file_and_a_bad_plan_keeps_the_old_one() {
    let dir = TempDir::new("sighup");
    let plan = dir.plan("plan.bin", "v1", 0);
    let engine = Engine::start(&["run", s(&plan), "--listen", "127.0.0.1:0", "--admin-listen", "off"], &[], 1);
    let rt = runtime();
    let mut client = rt.block_on(Echo::connect(engine.addr()));
    assert_eq!(rt.block_on(client.call("Get", "")), Ok("v1".into()));

    dir.plan("plan.bin", "v2", 0);
    engine.signal("HUP");
    engine.wait_log("plan reloaded", 1);
    // The same connection sees the new plan.
    assert_eq!(rt.block_on(client.call("Get", "")), Ok("v2".into()));

    std::fs::write(&plan, b"not a plan").unwrap();
    engine.signal("HUP");
    engine.wait_log("plan reload failed", 1);
    let log = engine.log();
    assert!(log.contains(&plan.display().to_string()) && log.contains("not a plan file"), "{log}");
    assert_eq!(rt.block_on(client.call("Get", "")), Ok("v2".into()), "the previous plan keeps serving");
    assert_eq!(call(engine.addr(), "Get", ""), Ok("v2".into()), "on new connections too");
}

#[test]
fn watch_reloads_when_the_plan_file_changes() {
    let dir = TempDir::new("watch-plan");
    let plan = dir.plan("plan.bin", "v1", 0);
    let args = ["run", s(&plan), "--watch", "--listen", "127.0.0.1:0", "--admin-listen", "off"];
    let engine = Engine::start(&args, &[], 1);
    assert_eq!(call(engine.addr(), "Get", ""), Ok("v1".into()));
    dir.plan("plan.bin", "v2", 0);
    engine.wait_log("plan reloaded", 1);
    assert!(engine.log().contains("watch"), "{}", engine.log());
    assert_eq!(call(engine.addr(), "Get", ""), Ok("v2".into()));
}

#[test]
fn watch_recompiles_protos_and_rules_without_a_plan() {
    let dir = TempDir::new("watch-sources");
    dir.write_sources("v1", 0);
    let (protos, rules) = (dir.path("protos"), dir.path("rules"));
    let args = [
        "run",
        "--protos",
        s(&protos),
        "--rules",
        s(&rules),
        "--watch",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "off",
    ];
    let engine = Engine::start(&args, &[], 1);
    assert_eq!(call(engine.addr(), "Get", ""), Ok("v1".into()));

    dir.write_sources("v2", 0);
    engine.wait_log("plan reloaded", 1);
    assert_eq!(call(engine.addr(), "Get", ""), Ok("v2".into()));

    // A rule that does not compile: the diagnostics are logged, v2 stays.
    std::fs::write(rules.join("cli.v1.echo.get.yaml"), "responses:\n  - body: { nme: v3 }\n").unwrap();
    engine.wait_log("plan reload failed", 1);
    assert!(engine.log().contains("cli.v1.echo.get.yaml"), "{}", engine.log());
    assert_eq!(call(engine.addr(), "Get", ""), Ok("v2".into()));
}

// ---- shutdown -------------------------------------------------------------

#[test]
fn sigterm_drains_in_flight_calls_and_exits_0() {
    let dir = TempDir::new("drain");
    let plan = dir.plan("plan.bin", "v1", 1500);
    let args = ["run", s(&plan), "--listen", "127.0.0.1:0", "--admin-listen", "off", "--drain-timeout-ms", "20000"];
    let mut engine = Engine::start(&args, &[], 1);
    let rt = runtime();
    let results = rt.block_on(async {
        let client = Echo::connect(engine.addr()).await;
        assert_eq!(client.clone().call("Get", "").await, Ok("v1".into()));
        let calls: Vec<_> = (0..4)
            .map(|_| {
                let mut c = client.clone();
                tokio::spawn(async move { c.call("Slow", "").await })
            })
            .collect();
        // The calls are on an open connection; give their requests time to
        // reach the engine, well within the 1.5 s delay.
        tokio::time::sleep(Duration::from_millis(400)).await;
        engine.signal("TERM");
        let mut results = Vec::new();
        for c in calls {
            results.push(c.await.unwrap());
        }
        results
    });
    assert_eq!(results, vec![Ok("slow".to_string()); 4], "every in-flight call completes");
    let status = engine.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "log:\n{}", engine.log());
    assert!(engine.log().contains("SIGTERM: shutting down"), "{}", engine.log());
}

#[test]
fn a_second_signal_during_the_drain_exits_at_once() {
    let dir = TempDir::new("second-signal");
    let plan = dir.plan("plan.bin", "v1", 60_000);
    let args = ["run", s(&plan), "--listen", "127.0.0.1:0", "--admin-listen", "off", "--drain-timeout-ms", "60000"];
    let mut engine = Engine::start(&args, &[], 1);
    let rt = runtime();
    let client = rt.block_on(Echo::connect(engine.addr()));
    let mut c = client.clone();
    let slow = rt.spawn(async move { c.call("Slow", "").await });
    std::thread::sleep(Duration::from_millis(400));
    let started = Instant::now();
    engine.signal("INT");
    engine.wait_log("shutting down", 1);
    engine.signal("INT");
    let status = engine.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "log:\n{}", engine.log());
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(rt.block_on(slow).unwrap().is_err(), "the call in flight was cut off");
}

// ---- admin and logs -------------------------------------------------------

#[test]
fn the_admin_listener_is_announced_and_a_public_one_without_token_refused_unless_insecure() {
    let dir = TempDir::new("admin");
    let plan = dir.plan("plan.bin", "v1", 0);
    let engine = Engine::start(&["run", s(&plan), "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"], &[], 2);
    assert!(engine.stdout[0].starts_with("wirestub engine listening on 127.0.0.1:"), "{:?}", engine.stdout);
    let admin = engine.admin.expect("an admin line");
    assert!(admin.ip().is_loopback() && admin.port() != 0);
    std::net::TcpStream::connect_timeout(&admin, LOG).expect("the admin API accepts connections");
    assert!(!engine.log().contains("without --admin-token"));
    drop(engine);

    let out = output(&["run", s(&plan), "--listen", "127.0.0.1:0", "--admin-listen", "0.0.0.0:0"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("non-loopback address, without --admin-token"), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing served: {}", String::from_utf8_lossy(&out.stdout));

    let args = ["run", s(&plan), "--listen", "127.0.0.1:0", "--admin-listen", "0.0.0.0:0", "--admin-insecure"];
    let engine = Engine::start(&args, &[], 2);
    assert!(engine.log().contains("without --admin-token (--admin-insecure)"), "{}", engine.log());
    drop(engine);

    let args = ["run", s(&plan), "--listen", "127.0.0.1:0", "--admin-listen", "0.0.0.0:0", "--admin-token", "t"];
    let engine = Engine::start(&args, &[], 2);
    assert!(!engine.log().contains("without --admin-token"), "{}", engine.log());
}

#[test]
fn a_taken_default_admin_port_is_a_warning_a_taken_chosen_one_an_error() {
    let dir = TempDir::new("admin-taken");
    let plan = dir.plan("plan.bin", "v1", 0);
    // Port 9901 taken, by this test or by anything else.
    let _held = std::net::TcpListener::bind("127.0.0.1:9901");
    let engine = Engine::start(&["run", s(&plan), "--listen", "127.0.0.1:0"], &[], 1);
    assert!(engine.log().contains("serving without the admin API"), "{}", engine.log());
    assert_eq!(call(engine.addr(), "Get", ""), Ok("v1".into()));
    drop(engine);

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = output(&["run", s(&plan), "--listen", "127.0.0.1:0", "--admin-listen", &addr], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("cannot listen on {addr} (--admin-listen)")), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing announced: {}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = TempDir::new("json");
    let plan = dir.plan("plan.bin", "v1", 0);
    let args = ["run", s(&plan), "--listen", "127.0.0.1:0", "--admin-listen", "off", "--log-format", "json"];
    let mut engine = Engine::start(&args, &[], 1);
    engine.signal("TERM");
    assert_eq!(engine.wait_exit(Duration::from_secs(30)).code(), Some(0));
    engine.wait_log("drained", 1);
    let log = engine.log();
    let mut messages = Vec::new();
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string(), "{line}");
        messages.push(v["fields"]["message"].as_str().unwrap_or_default().to_string());
    }
    assert!(messages.iter().any(|m| m == "serving"), "{log}");
}
