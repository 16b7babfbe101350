//! Open-loop latency client of the end-to-end load bench.
//!
//! h2load is closed-loop: it sends the next request only when one has been
//! answered, so a server that stalls is simply sent less, and its stall
//! hides in a lower rate (coordinated omission). This client sends at a
//! fixed total rate R instead, spread round-robin over C HTTP/2 connections
//! to `127.0.0.1`: request `i` is due at `t0 + i/R` whatever happened to
//! the others, and its latency runs from that *scheduled* time to the
//! response's trailers, so time a request spent waiting to be sent because
//! the server was slow counts against the server.
//!
//! Requests are started by a timer that fires every `1/R` seconds, or every
//! 20 µs at higher rates (a Linux `timerfd`: tokio's own timer has a
//! resolution of 1 ms); each tick starts every request that is due. How late
//! they were started is reported as `send_lag_us`: when that is large, the
//! client itself was the limit. A hard cap on outstanding requests bounds
//! memory when the server falls behind; requests due while the cap is
//! reached are not sent and are counted as `dropped`.
//!
//! Every response must have `:status` 200 and the expected `grpc-status`
//! (default 0, taken from the trailers or from a trailers-only response),
//! and, with `--expect-body`, exactly the expected body bytes; any other
//! answer, a reset stream, a broken connection or a response still missing
//! `--grace` seconds after the last request was due, counts as `failed`.
//! Requests due during the first `--warmup` seconds are sent but not counted.
//!
//! Usage:
//!
//! ```text
//! latency --port PORT --path /pkg.Service/Method --body FILE --rate R
//!         [--connections C] [--duration S] [--warmup S] [--max-outstanding N]
//!         [--expect-status N] [--expect-body FILE] [--grace S]
//! ```
//!
//! `--body` is the gRPC-framed request (5-byte prefix and message), the file
//! h2load takes with `-d`. The result is one JSON object on stdout: `sent`,
//! `ok`, `failed`, `dropped`, `achieved_rate`, `latency_us` (`p50`, `p90`,
//! `p99`, `p999`, `max`, `mean`), `send_lag_us` and the first few distinct
//! `errors`. Exit status: 0 when the run completed (whatever it counted),
//! 1 when it could not run (no connection), 2 on bad usage.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use http::{HeaderMap, Method, Request, Uri};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "\
usage: latency --port PORT --path /pkg.Service/Method --body FILE --rate R
               [--connections C] [--duration S] [--warmup S] [--max-outstanding N]
               [--expect-status N] [--expect-body FILE] [--grace S]

Open-loop gRPC load at R requests per second in total over C connections to
127.0.0.1:PORT; latency from each request's scheduled time to its trailers.
Prints one JSON object. Defaults: 1 connection, 10 s after a 1 s warm-up,
at most 10000 outstanding requests, grpc-status 0 expected, 5 s grace.";

/// Shortest timer period: at higher rates one tick starts several requests.
const MIN_TICK: Duration = Duration::from_micros(20);
/// Upper bounds, so a typo cannot start an endless or enormous run.
const MAX_SECONDS: f64 = 3600.0;
const MAX_REQUESTS: f64 = 100e6;
const MAX_CONNECTIONS: usize = 1000;
/// Distinct error texts kept for the report.
const MAX_ERRORS: usize = 10;

/// Command-line options.
struct Options {
    port: u16,
    path: String,
    body: Bytes,
    rate: f64,
    connections: usize,
    duration: f64,
    warmup: f64,
    max_outstanding: usize,
    expect_status: u32,
    expect_body: Option<Bytes>,
    grace: f64,
}

fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut port = None;
    let mut path = None;
    let mut body = None;
    let mut rate = None;
    let mut options = Options {
        port: 0,
        path: String::new(),
        body: Bytes::new(),
        rate: 0.0,
        connections: 1,
        duration: 10.0,
        warmup: 1.0,
        max_outstanding: 10_000,
        expect_status: 0,
        expect_body: None,
        grace: 5.0,
    };
    fn number<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
        v.parse().map_err(|_| format!("`{flag}` takes a number, got `{v}`"))
    }
    fn read(flag: &str, file: &str) -> Result<Bytes, String> {
        std::fs::read(file).map(Bytes::from).map_err(|e| format!("`{flag}`: cannot read `{file}`: {e}"))
    }
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "-h" || a == "--help" {
            return Err(String::new());
        }
        let v = it.next().ok_or_else(|| format!("`{a}` needs a value"))?;
        match a.as_str() {
            "--port" => port = Some(number::<u16>(a, v)?),
            "--path" => path = Some(v.clone()),
            "--body" => body = Some(read(a, v)?),
            "--rate" => rate = Some(number::<f64>(a, v)?),
            "--connections" => options.connections = number(a, v)?,
            "--duration" => options.duration = number(a, v)?,
            "--warmup" => options.warmup = number(a, v)?,
            "--max-outstanding" => options.max_outstanding = number(a, v)?,
            "--expect-status" => options.expect_status = number(a, v)?,
            "--expect-body" => options.expect_body = Some(read(a, v)?),
            "--grace" => options.grace = number(a, v)?,
            _ => return Err(format!("unknown flag `{a}`")),
        }
    }
    options.port = port.filter(|&p| p != 0).ok_or("`--port` is required (1-65535)")?;
    options.path = path.filter(|p| p.starts_with('/')).ok_or("`--path` is required, as /pkg.Service/Method")?;
    options.body = body.ok_or("`--body` is required")?;
    options.rate = rate.filter(|r| r.is_finite() && *r > 0.0).ok_or("`--rate` is required, above 0")?;
    if options.connections == 0 || options.connections > MAX_CONNECTIONS {
        return Err(format!("`--connections` must be 1 to {MAX_CONNECTIONS}"));
    }
    let seconds_ok = |s: f64| s.is_finite() && (0.0..=MAX_SECONDS).contains(&s);
    if !seconds_ok(options.duration) || options.duration == 0.0 || !seconds_ok(options.warmup) {
        return Err(format!("`--duration` must be above 0 and, like `--warmup`, at most {MAX_SECONDS} s"));
    }
    if !seconds_ok(options.grace) {
        return Err(format!("`--grace` must be 0 to {MAX_SECONDS} s"));
    }
    if options.rate * (options.duration + options.warmup) > MAX_REQUESTS {
        return Err(format!("rate × (warm-up + duration) must stay under {MAX_REQUESTS} requests"));
    }
    if options.max_outstanding == 0 {
        return Err("`--max-outstanding` must be at least 1".into());
    }
    Ok(options)
}

/// What the calls report, shared by the tasks of the (single) thread.
struct Stats {
    /// Calls started and not yet finished, counted or not.
    outstanding: usize,
    /// Counted calls started and not yet finished.
    outstanding_counted: u64,
    sent: u64,
    ok: u64,
    failed: u64,
    dropped: u64,
    /// Scheduled time to trailers of the successful counted calls, in ns.
    latency: Histogram<u64>,
    /// Scheduled time to the start of sending, counted calls, in ns.
    lag: Histogram<u64>,
    /// When the last counted call finished.
    last_done: Option<Instant>,
    errors: BTreeMap<String, u64>,
}

impl Stats {
    fn new() -> Self {
        // 1 ns to one hour, three significant digits.
        let histogram = || Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds");
        Stats {
            outstanding: 0,
            outstanding_counted: 0,
            sent: 0,
            ok: 0,
            failed: 0,
            dropped: 0,
            latency: histogram(),
            lag: histogram(),
            last_done: None,
            errors: BTreeMap::new(),
        }
    }

    fn error(&mut self, text: String) {
        if let Some(n) = self.errors.get_mut(&text) {
            *n += 1;
        } else if self.errors.len() < MAX_ERRORS {
            self.errors.insert(text, 1);
        } else {
            *self.errors.entry("(other errors)".to_owned()).or_default() += 1;
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The parts of the request every call shares.
struct Call {
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
    expect_status: u32,
    expect_body: Option<Bytes>,
}

/// One call on one connection; `Err` says why it does not count as a
/// success.
async fn call(client: h2::client::SendRequest<Bytes>, spec: &Call) -> Result<(), String> {
    let mut client = client.ready().await.map_err(|e| format!("connection: {e}"))?;
    let mut request = Request::new(());
    *request.method_mut() = Method::POST;
    *request.uri_mut() = spec.uri.clone();
    *request.headers_mut() = spec.headers.clone();
    let (response, mut send) = client.send_request(request, false).map_err(|e| format!("send: {e}"))?;
    send.send_data(spec.body.clone(), true).map_err(|e| format!("send: {e}"))?;
    let response = response.await.map_err(|e| format!("response: {e}"))?;
    let (parts, mut body) = response.into_parts();
    if parts.status != http::StatusCode::OK {
        return Err(format!("HTTP status {}", parts.status.as_u16()));
    }
    let mut received = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| format!("response body: {e}"))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if spec.expect_body.is_some() {
            received.extend_from_slice(&chunk);
        }
    }
    let trailers = body.trailers().await.map_err(|e| format!("trailers: {e}"))?;
    let status = grpc_status(trailers.as_ref()).or_else(|| grpc_status(Some(&parts.headers)));
    match status {
        Some(s) if s == spec.expect_status => {}
        Some(s) => return Err(format!("grpc-status {s}, expected {}", spec.expect_status)),
        None => return Err("no grpc-status".into()),
    }
    if let Some(want) = &spec.expect_body {
        if received[..] != want[..] {
            return Err(format!("unexpected body ({} bytes, expected {})", received.len(), want.len()));
        }
    }
    Ok(())
}

fn grpc_status(map: Option<&HeaderMap>) -> Option<u32> {
    map?.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// Runs one call and records its outcome.
async fn run_call(
    client: h2::client::SendRequest<Bytes>,
    spec: Rc<Call>,
    scheduled: Instant,
    counted: bool,
    stats: Rc<RefCell<Stats>>,
) {
    let outcome = call(client, &spec).await;
    let done = Instant::now();
    let mut s = stats.borrow_mut();
    s.outstanding -= 1;
    if !counted {
        return;
    }
    s.outstanding_counted -= 1;
    s.last_done = Some(done);
    match outcome {
        Ok(()) => {
            s.ok += 1;
            s.latency.saturating_record(nanos(done.saturating_duration_since(scheduled)).max(1));
        }
        Err(e) => {
            s.failed += 1;
            s.error(e);
        }
    }
}

/// Opens one HTTP/2 connection to 127.0.0.1:`port` and drives it in a
/// local task.
async fn connect(port: u16, stats: &Rc<RefCell<Stats>>) -> Result<h2::client::SendRequest<Bytes>, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let tcp = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connecting to {addr} timed out"))?
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| format!("TCP_NODELAY: {e}"))?;
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(1 << 24)
        .handshake::<_, Bytes>(tcp)
        .await
        .map_err(|e| format!("HTTP/2 handshake with {addr}: {e}"))?;
    let stats = Rc::clone(stats);
    tokio::task::spawn_local(async move {
        if let Err(e) = connection.await {
            stats.borrow_mut().error(format!("connection ended: {e}"));
        }
    });
    Ok(client)
}

/// Sends the whole schedule and waits for the answers; returns the report.
async fn run(options: Options) -> Result<serde_json::Value, String> {
    let stats = Rc::new(RefCell::new(Stats::new()));
    let mut clients = Vec::with_capacity(options.connections);
    for _ in 0..options.connections {
        clients.push(connect(options.port, &stats).await?);
    }
    let uri: Uri = format!("http://127.0.0.1:{}{}", options.port, options.path)
        .parse()
        .map_err(|e| format!("bad --path {:?}: {e}", options.path))?;
    let mut headers = HeaderMap::new();
    headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    let spec = Rc::new(Call {
        uri,
        headers,
        body: options.body.clone(),
        expect_status: options.expect_status,
        expect_body: options.expect_body.clone(),
    });

    let rate = options.rate;
    let total = ((options.warmup + options.duration) * rate).ceil() as u64;
    let first_counted = (options.warmup * rate).ceil() as u64;
    let period = Duration::from_secs_f64(1.0 / rate).max(MIN_TICK);
    let lead = Duration::from_millis(10);
    let t0 = Instant::now() + lead;
    let mut ticker = ticker::Ticker::start(lead, period).map_err(|e| format!("timer: {e}"))?;

    let mut next = 0u64;
    while next < total {
        ticker.tick().await.map_err(|e| format!("timer: {e}"))?;
        let now = Instant::now();
        let Some(elapsed) = now.checked_duration_since(t0) else { continue };
        let due = ((elapsed.as_secs_f64() * rate) as u64 + 1).min(total);
        let mut s = stats.borrow_mut();
        while next < due {
            let i = next;
            next += 1;
            let counted = i >= first_counted;
            if s.outstanding >= options.max_outstanding {
                if counted {
                    s.dropped += 1;
                }
                continue;
            }
            let scheduled = t0 + Duration::from_secs_f64(i as f64 / rate);
            s.outstanding += 1;
            if counted {
                s.sent += 1;
                s.outstanding_counted += 1;
                s.lag.saturating_record(nanos(now.saturating_duration_since(scheduled)).max(1));
            }
            let client = clients[(i % clients.len() as u64) as usize].clone();
            tokio::task::spawn_local(run_call(client, Rc::clone(&spec), scheduled, counted, Rc::clone(&stats)));
        }
    }
    let sending_done = Instant::now();

    // The answers still on their way get `--grace` seconds.
    let grace_end = sending_done + Duration::from_secs_f64(options.grace);
    while stats.borrow().outstanding_counted > 0 && Instant::now() < grace_end {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut s = stats.borrow_mut();
    let unfinished = s.outstanding_counted;
    if unfinished > 0 {
        s.failed += unfinished;
        *s.errors.entry(format!("no answer within {} s of the last send", options.grace)).or_default() += unfinished;
    }

    // Achieved: the counted calls answered, over the time from the first
    // counted call's scheduled time to the last answer.
    let window_start = t0 + Duration::from_secs_f64(first_counted as f64 / rate);
    let window = s.last_done.map(|d| d.saturating_duration_since(window_start).as_secs_f64()).unwrap_or(0.0);
    let answered = (s.ok + s.failed - unfinished) as f64;
    let achieved = if window > 0.0 { answered / window } else { 0.0 };

    let us = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e3;
    let summary = |h: &Histogram<u64>| {
        if h.is_empty() {
            return serde_json::Value::Null;
        }
        serde_json::json!({
            "p50": us(h, 0.50),
            "p90": us(h, 0.90),
            "p99": us(h, 0.99),
            "p999": us(h, 0.999),
            "max": h.max() as f64 / 1e3,
            "mean": h.mean() / 1e3,
        })
    };
    Ok(serde_json::json!({
        "port": options.port,
        "path": options.path,
        "connections": options.connections,
        "rate": rate,
        "duration_s": options.duration,
        "warmup_s": options.warmup,
        "max_outstanding": options.max_outstanding,
        "expect_status": options.expect_status,
        "sent": s.sent,
        "ok": s.ok,
        "failed": s.failed,
        "dropped": s.dropped,
        "achieved_rate": achieved,
        "latency_us": summary(&s.latency),
        "send_lag_us": summary(&s.lag),
        "errors": s.errors,
    }))
}

#[cfg(target_os = "linux")]
mod ticker {
    //! A periodic timer with microsecond resolution: a non-blocking
    //! `timerfd` (CLOCK_MONOTONIC, like `Instant`) watched by tokio.

    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::Duration;
    use tokio::io::unix::AsyncFd;

    pub struct Ticker {
        fd: AsyncFd<OwnedFd>,
    }

    fn timespec(d: Duration) -> libc::timespec {
        libc::timespec { tv_sec: d.as_secs() as libc::time_t, tv_nsec: d.subsec_nanos() as libc::c_long }
    }

    impl Ticker {
        /// First tick after `first`, then every `period`.
        pub fn start(first: Duration, period: Duration) -> io::Result<Ticker> {
            // SAFETY: plain system call; the result is checked.
            let raw = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `raw` is a file descriptor just opened and owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let spec = libc::itimerspec {
                it_interval: timespec(period),
                it_value: timespec(first.max(Duration::from_nanos(1))),
            };
            // SAFETY: `fd` is a valid timerfd and `spec` a valid itimerspec for
            // the duration of the call; the old value is not asked for.
            if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: the `OwnedFd` moves into the `AsyncFd` and stays open, the
            // same descriptor, until the `AsyncFd` is dropped.
            let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
                .map_err(io::Error::from)?;
            Ok(Ticker { fd })
        }

        /// Waits for the next tick (returns at once if ticks were missed).
        pub async fn tick(&mut self) -> io::Result<()> {
            loop {
                let mut guard = self.fd.readable().await?;
                let read = guard.try_io(|fd| {
                    let mut expirations = 0u64;
                    // SAFETY: reads 8 bytes into a u64 owned by this frame.
                    let n = unsafe { libc::read(fd.as_raw_fd(), (&mut expirations as *mut u64).cast(), 8) };
                    if n < 0 {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(())
                    }
                });
                match read {
                    Ok(result) => {
                        // The timer is not readable again before its next
                        // expiry: wait for that in epoll rather than with a
                        // read that would fail.
                        guard.clear_ready();
                        return result;
                    }
                    Err(_would_block) => continue,
                }
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod ticker {
    //! Elsewhere: tokio's interval, with its 1 ms resolution (send lag shows
    //! the difference).

    use std::io;
    use std::time::Duration;

    pub struct Ticker {
        interval: tokio::time::Interval,
    }

    impl Ticker {
        /// First tick after `first`, then every `period`.
        pub fn start(first: Duration, period: Duration) -> io::Result<Ticker> {
            let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + first, period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            Ok(Ticker { interval })
        }

        /// Waits for the next tick.
        pub async fn tick(&mut self) -> io::Result<()> {
            self.interval.tick().await;
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match parse_args(&args) {
        Ok(options) => options,
        Err(message) if message.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("latency: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("latency: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = tokio::task::LocalSet::new();
    match local.block_on(&runtime, run(options)) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("latency: {e}");
            ExitCode::FAILURE
        }
    }
}
