//! The web UI's files, compiled into the binary: a single page of plain ES
//! modules (`admin/ui/`), served at `/ui/` on the admin listener.
//!
//! The files hold no data, so they are served without the admin token;
//! the page asks for the token once, keeps it for the tab
//! (`sessionStorage`) and sends it with every request for data, which the
//! admin routes check as for any client. Nothing runs on the engine for
//! the UI beyond answering those requests: with nobody looking, it costs
//! nothing.

use super::routes::{only, Response};

/// Every file of the UI: its name under `/ui/`, its media type, its bytes.
const FILES: &[(&str, &str, &str)] = &[
    ("index.html", "text/html; charset=utf-8", include_str!("ui/index.html")),
    ("app.css", "text/css; charset=utf-8", include_str!("ui/app.css")),
    ("app.js", JS, include_str!("ui/app.js")),
    ("api.js", JS, include_str!("ui/api.js")),
    ("dom.js", JS, include_str!("ui/dom.js")),
    ("status.js", JS, include_str!("ui/status.js")),
    ("services.js", JS, include_str!("ui/services.js")),
    ("calls.js", JS, include_str!("ui/calls.js")),
    ("try.js", JS, include_str!("ui/try.js")),
    ("edit.js", JS, include_str!("ui/edit.js")),
    ("load.js", JS, include_str!("ui/load.js")),
    ("chart.js", JS, include_str!("ui/chart.js")),
];

const JS: &str = "text/javascript; charset=utf-8";

/// The page may load only its own files, and call the admin API and the
/// serving port (another origin) with `fetch`.
const CSP: &str = "default-src 'self'; connect-src 'self' http: https:; img-src 'self' data:; \
                   style-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// The answer for a request under `/ui`, None for any other path.
pub fn route(method: &str, path: &str) -> Option<Response> {
    let rest = path.strip_prefix("/ui")?;
    if rest.is_empty() {
        return Some(only(method, &["GET"]).unwrap_or_else(|| redirect("/ui/")));
    }
    let name = rest.strip_prefix('/')?;
    let name = if name.is_empty() { "index.html" } else { name };
    Some(only(method, &["GET"]).unwrap_or_else(|| match FILES.iter().find(|(n, _, _)| *n == name) {
        Some((_, media_type, text)) => Response {
            status: 200,
            content_type: media_type,
            headers: vec![
                ("X-Content-Type-Options", "nosniff".into()),
                ("Content-Security-Policy", CSP.into()),
                ("Referrer-Policy", "no-referrer".into()),
            ],
            body: text.as_bytes().to_vec(),
        },
        None => Response::error(404, &format!("the UI has no file {name}")),
    }))
}

/// A 302 to `location`.
pub fn redirect(location: &str) -> Response {
    let mut r = Response::error(302, &format!("see {location}"));
    r.headers.push(("Location", location.to_string()));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_each_file_with_its_type_and_nothing_else() {
        let index = route("GET", "/ui/").unwrap();
        assert_eq!((index.status, index.content_type), (200, "text/html; charset=utf-8"));
        assert!(String::from_utf8(index.body).unwrap().contains("app.js"));
        assert_eq!(route("GET", "/ui/index.html").unwrap().status, 200);
        let js = route("GET", "/ui/app.js").unwrap();
        assert_eq!((js.status, js.content_type), (200, JS));
        assert!(js.headers.iter().any(|(k, v)| *k == "Content-Security-Policy" && v.contains("script-src 'self'")));
        assert_eq!(route("GET", "/ui/../Cargo.toml").unwrap().status, 404);
        assert_eq!(route("GET", "/ui/nothing.js").unwrap().status, 404);
        assert_eq!(route("POST", "/ui/app.js").unwrap().status, 405);
        let bare = route("GET", "/ui").unwrap();
        assert_eq!(bare.status, 302);
        assert!(bare.headers.contains(&("Location", "/ui/".to_string())));
        assert!(route("GET", "/uix").is_none());
        assert!(route("GET", "/admin/status").is_none());
    }

    #[test]
    fn every_module_the_page_imports_is_served() {
        // Each `from "./x.js"` of every file names a file of FILES.
        for (name, _, text) in FILES {
            for part in text.split("from \"./").skip(1) {
                let file = part.split('"').next().unwrap();
                assert!(FILES.iter().any(|(n, _, _)| *n == file), "{name} imports ./{file}, which is not served");
            }
        }
    }
}
