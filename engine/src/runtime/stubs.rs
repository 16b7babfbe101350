//! GripMock's stubs API (written next).

use super::Runtime;
use crate::admin::{Request, Response};
use crate::state::State;

pub fn handle(_rt: &Runtime, _state: &State, _req: &Request<'_>) -> Option<Response> {
    None
}
