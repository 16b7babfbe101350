//! What the runtime API's routes answer: the method checks, a request's
//! JSON body, a change applied or refused (with the compiler's
//! diagnostics), shared by the Wishmock-shaped routes (`routes.rs`) and
//! GripMock's stubs API (`stubs.rs`).

use super::{diagnostics_json, Applied, Refused};
pub use crate::admin::routes::{not_allowed, only};
use crate::admin::Response;
use serde_json::{json, Value as Json};

/// The JSON object of a request body, or a 400.
pub fn body_object(body: &[u8]) -> Result<serde_json::Map<String, Json>, Response> {
    match serde_json::from_slice::<Json>(body) {
        Ok(Json::Object(o)) => Ok(o),
        Ok(_) => Err(Response::error(400, "the body must be a JSON object")),
        Err(e) => Err(Response::error(400, &format!("the body is not JSON: {e}"))),
    }
}

/// The answer to a change: 200 with what changed, or the refusal.
pub fn answer(result: Result<Applied, Refused>, extra: impl FnOnce(&mut serde_json::Map<String, Json>)) -> Response {
    match result {
        Ok(applied) => {
            let mut o = serde_json::Map::new();
            o.insert("ok".into(), json!(true));
            extra(&mut o);
            o.insert("changed".into(), json!(applied.files));
            o.insert(
                "plan".into(),
                json!({
                    "identity": applied.reloaded.identity,
                    "generation": applied.reloaded.number,
                    "methods": applied.reloaded.methods,
                    "rules": applied.reloaded.rules,
                }),
            );
            if !applied.warnings.is_empty() {
                o.insert("warnings".into(), json!(applied.warnings));
            }
            Response::json(200, &Json::Object(o))
        }
        Err(refused) => refusal(refused),
    }
}

pub fn refusal(refused: Refused) -> Response {
    match refused {
        Refused::Invalid(e) => Response::error(400, &e),
        Refused::NotFound(e) => Response::error(404, &e),
        Refused::Io(e) => Response::error(500, &e),
        Refused::TooLarge(e) => Response::error(413, &e),
        Refused::Conflict(e) => Response::error(409, &e),
        Refused::Busy(e) => {
            let mut r = Response::error(503, &e);
            r.headers.push(("Retry-After", "1".into()));
            r
        }
        Refused::Plan(e) => Response::json(422, &json!({"error": e, "diagnostics": []})),
        Refused::Diagnostics(d) => {
            let first = d
                .iter()
                .find(|d| d.severity == wirestub_compiler::Severity::Error)
                .map(|d| match &d.span {
                    Some(s) => format!("{}:{}:{}: {}", s.file.name, s.line, s.col, d.message),
                    None => d.message.clone(),
                })
                .unwrap_or_else(|| "the change does not compile".into());
            Response::json(
                422,
                &json!({
                    "error": format!("the change was not applied: {first}"),
                    "diagnostics": diagnostics_json(&d),
                    "rendered": d.render_ending(Some("nothing changed")),
                }),
            )
        }
    }
}
