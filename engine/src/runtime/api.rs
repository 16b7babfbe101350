//! The runtime API as an extension of the admin API's routes: the
//! Wishmock-shaped file routes, descriptor sets, sessions and schema
//! (`routes.rs`), then GripMock's stubs API (`stubs.rs`), over one store.

use super::{routes, stubs, Runtime};
use crate::admin::{Extension, Request, Response};
use crate::state::State;
use serde_json::{json, Value as Json};
use std::sync::Arc;

/// The runtime API as an admin extension.
pub struct Api {
    pub runtime: Arc<Runtime>,
    /// The replicas sharing its changes (`--shared-state`).
    pub peers: Option<Arc<super::peers::Peers>>,
}

impl Extension for Api {
    fn handle(&self, state: &State, req: &Request<'_>) -> Option<Response> {
        routes::handle(&self.runtime, state, req).or_else(|| stubs::handle(&self.runtime, state, req))
    }

    fn status(&self) -> Json {
        let sources = self.runtime.sources();
        json!({
            "storage": self.runtime.storage(),
            "protos": sources.protos.len(),
            "rules": sources.rules.len(),
            "descriptor_sets": sources.descriptor_sets.len(),
            "shared_state": self.peers.as_ref().map(|p| p.status()),
        })
    }
}
