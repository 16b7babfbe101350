//! Plans read from elsewhere than a local file: an HTTP(S) URL
//! (`engine run --plan https://...`) or the shared state's Redis
//! (`--plan shared:`, with `--shared-state`), so that every replica serves
//! the same plan. Either way the plan's bytes are checked (a plan at all,
//! and of the identity `--plan-identity` pins, if given), then written to a
//! local file (atomically: a replica never reads half a plan), which the
//! runtime reads as it reads any plan file. Reloading fetches again.
//!
//! In Redis, under the prefix: `PREFIX:plan` holds the plan's bytes; a
//! message `plan` on `PREFIX:changes` tells the replicas following it to
//! load it again (`runtime::peers`).
//!
//! The download is bounded: [`MAX_PLAN_BYTES`], [`TIMEOUT`] in all, at
//! most [`REDIRECTS`] redirects.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The largest plan fetched.
pub const MAX_PLAN_BYTES: usize = 512 << 20;
/// Longest a fetch may take, redirects included.
pub const TIMEOUT: Duration = Duration::from_secs(60);
/// Redirects followed.
pub const REDIRECTS: usize = 5;

/// Where a plan comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// An `http://` or `https://` URL.
    Url(String),
    /// The shared state's Redis (`shared:`).
    Shared,
}

impl Origin {
    /// The origin `--plan` names, if it is not a local file.
    pub fn of(plan: &str) -> Option<Origin> {
        if plan.starts_with("http://") || plan.starts_with("https://") {
            Some(Origin::Url(plan.to_string()))
        } else if plan == "shared:" {
            Some(Origin::Shared)
        } else {
            None
        }
    }
}

/// How to fetch a plan and where to keep it.
#[derive(Clone)]
pub struct Fetcher {
    pub origin: Origin,
    /// The identity the plan must have (`--plan-identity`).
    pub identity: Option<String>,
    /// CA certificates for an `https://` URL (`--plan-ca`; default: the
    /// system's).
    pub ca: Option<PathBuf>,
    /// The shared state's client and key prefix, for [`Origin::Shared`].
    pub shared: Option<(redis::Client, String)>,
    /// The local copy.
    pub local: PathBuf,
}

impl Fetcher {
    /// Fetches the plan, checks it and writes it to the local copy; its
    /// identity.
    pub fn fetch(&self) -> Result<String, String> {
        let bytes = match &self.origin {
            Origin::Url(url) => get(url, self.ca.as_deref())?,
            Origin::Shared => self.read_shared()?,
        };
        let identity = check(&bytes, self.identity.as_deref(), &self.shown())?;
        write_atomically(&self.local, &bytes)?;
        Ok(identity)
    }

    /// Where the plan comes from, for messages: a URL without its user,
    /// password and query (which may hold credentials).
    pub fn shown(&self) -> String {
        match &self.origin {
            Origin::Url(url) => shown_url(url),
            Origin::Shared => match &self.shared {
                Some((_, prefix)) => format!("the shared state's `{prefix}:plan`"),
                None => "the shared state".into(),
            },
        }
    }

    fn read_shared(&self) -> Result<Vec<u8>, String> {
        let Some((client, prefix)) = &self.shared else {
            return Err("--plan shared: reads the plan from the shared state: give --shared-state too".into());
        };
        let mut con = client
            .get_connection_with_timeout(Duration::from_secs(5))
            .map_err(|e| format!("cannot read the plan from the shared state: {e}"))?;
        let _ = con.set_read_timeout(Some(TIMEOUT));
        let size: u64 = redis::cmd("STRLEN")
            .arg(format!("{prefix}:plan"))
            .query(&mut con)
            .map_err(|e| format!("cannot read the plan from the shared state: {e}"))?;
        if size > MAX_PLAN_BYTES as u64 {
            return Err(format!("the plan in the shared state is {size} bytes, more than {MAX_PLAN_BYTES}"));
        }
        let bytes: Option<Vec<u8>> = redis::cmd("GET")
            .arg(format!("{prefix}:plan"))
            .query(&mut con)
            .map_err(|e| format!("cannot read the plan from the shared state: {e}"))?;
        bytes.ok_or_else(|| {
            format!(
                "the shared state holds no plan yet (`{prefix}:plan`): store one with `redis-cli -u URL -x SET \
                 {prefix}:plan < plan.bin`, then `redis-cli -u URL PUBLISH {prefix}:changes plan`"
            )
        })
    }
}

/// A URL as logs and messages show it: no user or password, no query.
pub fn shown_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let path = match path.split_once('?') {
        Some((p, _)) => format!("{p}?…"),
        None => path.to_string(),
    };
    format!("{scheme}://{host}{path}")
}

/// Checks that `identity` is one: 16 hex digits.
pub fn check_identity_text(identity: &str) -> Result<(), String> {
    let t = identity.trim();
    match t.len() == 16 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        true => Ok(()),
        false => Err(format!(
            "--plan-identity `{identity}` is not a plan identity: 16 hex digits, as `compiler build` prints and \
             /admin/status shows"
        )),
    }
}

/// Checks that `bytes` are a plan, of identity `expected` if given; the
/// identity.
pub fn check(bytes: &[u8], expected: Option<&str>, from: &str) -> Result<String, String> {
    wirestub_plan::Plan::from_bytes(bytes).map_err(|e| format!("the plan from {from} is not usable: {e}"))?;
    let identity = wirestub_plan::identity(bytes);
    match expected {
        Some(want) if !want.trim().eq_ignore_ascii_case(&identity) => {
            Err(format!("the plan from {from} has identity {identity}, not {} (--plan-identity): refused", want.trim()))
        }
        _ => Ok(identity),
    }
}

/// Writes `bytes` to `path` through a file beside it, renamed over it.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create `{}`: {e}", dir.display()))?;
    }
    use std::io::Write;
    // A name of its own, made new (never a file or link already there).
    let part = path.with_extension(format!("{}.{:x}.part", std::process::id(), next_part()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&part)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&part);
        return Err(format!("cannot write `{}`: {e}", part.display()));
    }
    std::fs::rename(&part, path).map_err(|e| {
        let _ = std::fs::remove_file(&part);
        format!("cannot write `{}`: {e}", path.display())
    })
}

/// A number for the next partial file.
fn next_part() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// GETs `url` (following redirects), on a runtime of its own: the body,
/// or why not.
pub fn get(url: &str, ca: Option<&Path>) -> Result<Vec<u8>, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot fetch `{url}`: {e}"))?;
    let shown = shown_url(url);
    let result = rt.block_on(async {
        match tokio::time::timeout(TIMEOUT, get_following(url, ca)).await {
            Ok(result) => result,
            Err(_) => Err(format!("cannot fetch `{shown}`: no whole answer within {} s", TIMEOUT.as_secs())),
        }
    });
    // A name lookup still running on a blocking thread is left behind,
    // not waited for.
    rt.shutdown_background();
    result
}

async fn get_following(url: &str, ca: Option<&Path>) -> Result<Vec<u8>, String> {
    let shown = shown_url(url);
    let mut current: http::Uri = url.parse().map_err(|e| format!("`{shown}` is not a URL: {e}"))?;
    for _ in 0..=REDIRECTS {
        match get_once(&current, ca).await? {
            Answer::Body(bytes) => return Ok(bytes),
            Answer::Redirect(location) => {
                let next = resolve(&current, &location)?;
                if current.scheme_str() == Some("https") && next.scheme_str() != Some("https") {
                    return Err(format!(
                        "cannot fetch `{shown}`: a redirect from https to `{}`, which is not https, is refused",
                        shown_url(&next.to_string())
                    ));
                }
                current = next;
            }
        }
    }
    Err(format!("cannot fetch `{shown}`: more than {REDIRECTS} redirects"))
}

enum Answer {
    Body(Vec<u8>),
    Redirect(String),
}

/// Where a redirect's `Location` points, from `base`.
fn resolve(base: &http::Uri, location: &str) -> Result<http::Uri, String> {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.parse().map_err(|e| format!("a redirect to `{location}`, not a URL: {e}"));
    }
    if !location.starts_with('/') {
        return Err(format!("a redirect to `{location}`, which is neither absolute nor a path"));
    }
    let scheme = base.scheme_str().unwrap_or("http");
    let authority = base.authority().map(|a| a.as_str()).unwrap_or("");
    format!("{scheme}://{authority}{location}").parse().map_err(|e| format!("a redirect to `{location}`: {e}"))
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

async fn get_once(uri: &http::Uri, ca: Option<&Path>) -> Result<Answer, String> {
    let shown = shown_url(&uri.to_string());
    let fail = |what: &dyn std::fmt::Display| format!("cannot fetch `{shown}`: {what}");
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(fail(&"only http:// and https:// URLs are fetched")),
    };
    let host = uri.host().ok_or_else(|| fail(&"no host"))?;
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = tokio::net::TcpStream::connect((bare, port)).await.map_err(|e| fail(&e))?;
    let io: Box<dyn Io> = if https {
        let config = crate::transport::tls::client_config(ca, None)
            .map_err(|e| e.replace("--upstream-ca", "--plan-ca").replace("upstream CA", "plan CA"))?;
        let mut config = (*config).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = rustls::pki_types::ServerName::try_from(bare.to_string()).map_err(|e| fail(&e))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(|e| {
            let hint = match e.to_string() {
                t if t.contains("InvalidContentType") || t.contains("corrupt message") => {
                    " (the server does not speak TLS: is it http://?)"
                }
                t if t.contains("UnknownIssuer") => " (give the CA that signs its certificate with --plan-ca)",
                _ => "",
            };
            fail(&format_args!("{e}{hint}"))
        })?;
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await.map_err(|e| fail(&e))?;
    let driver = tokio::spawn(connection);
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or(host);
    let request = http::Request::get(path)
        .header(http::header::HOST, authority)
        .header(http::header::USER_AGENT, concat!("wirestub/", env!("CARGO_PKG_VERSION")))
        .body(Empty::<Bytes>::new())
        .map_err(|e| fail(&e))?;
    let response = sender.send_request(request).await.map_err(|e| fail(&e))?;
    let status = response.status();
    if status.is_redirection() {
        driver.abort();
        let location = match response.headers().get(http::header::LOCATION) {
            None => return Err(fail(&format_args!("HTTP {status} without a Location"))),
            Some(l) => l.to_str().map_err(|_| fail(&format_args!("HTTP {status} to a Location that is not ASCII")))?,
        };
        return Ok(Answer::Redirect(location.to_string()));
    }
    if !status.is_success() {
        driver.abort();
        return Err(fail(&format_args!("HTTP {status}")));
    }
    let announced = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_PLAN_BYTES as u64) {
        driver.abort();
        return Err(fail(&format_args!("the plan is larger than {MAX_PLAN_BYTES} bytes")));
    }
    let mut body = response.into_body();
    // Reserved as announced, up to 1 MiB: the rest as it arrives.
    let mut bytes = Vec::with_capacity(announced.unwrap_or(0).min(1 << 20) as usize);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| fail(&e))?;
        if let Some(data) = frame.data_ref() {
            if bytes.len() + data.len() > MAX_PLAN_BYTES {
                driver.abort();
                return Err(fail(&format_args!("the plan is larger than {MAX_PLAN_BYTES} bytes")));
            }
            bytes.extend_from_slice(data);
        }
    }
    driver.abort();
    Ok(Answer::Body(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_credentials() {
        assert_eq!(shown_url("https://u:p@host:8/a/plan.bin?sig=x"), "https://host:8/a/plan.bin?…");
        assert_eq!(shown_url("http://host/plan.bin"), "http://host/plan.bin");
        assert!(check_identity_text("0123456789abcdef").is_ok());
        assert!(check_identity_text("xyz").unwrap_err().contains("16 hex digits"));
    }

    #[test]
    fn origins() {
        assert_eq!(Origin::of("https://x/plan.bin"), Some(Origin::Url("https://x/plan.bin".into())));
        assert_eq!(Origin::of("shared:"), Some(Origin::Shared));
        assert_eq!(Origin::of("plan.bin"), None);
        assert_eq!(Origin::of("./shared:"), None);
    }

    #[test]
    fn redirects_resolve_against_the_url() {
        let base: http::Uri = "http://127.0.0.1:8080/a/plan.bin".parse().unwrap();
        assert_eq!(resolve(&base, "/b/plan.bin").unwrap().to_string(), "http://127.0.0.1:8080/b/plan.bin");
        assert_eq!(resolve(&base, "https://cdn/p").unwrap().to_string(), "https://cdn/p");
        assert!(resolve(&base, "p.bin").is_err());
    }

    #[test]
    fn plans_are_checked_before_they_are_kept() {
        let bytes = wirestub_plan::Plan::default().to_bytes();
        let identity = wirestub_plan::identity(&bytes);
        assert_eq!(check(&bytes, None, "x").unwrap(), identity);
        assert_eq!(check(&bytes, Some(&identity.to_uppercase()), "x").unwrap(), identity);
        let refused = check(&bytes, Some("0123456789abcdef"), "here").unwrap_err();
        assert!(refused.contains(&identity) && refused.contains("--plan-identity"), "{refused}");
        assert!(check(b"not a plan", None, "here").unwrap_err().contains("not usable"));
    }
}
