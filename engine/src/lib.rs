//! The wirestub engine: loads a plan and answers gRPC calls from it.
//!
//! Layers, outermost first, each a folder (see ARCHITECTURE.md):
//! [`server`] (listeners and workers) hands each connection to a
//! [`transport`] (HTTP/2 on the engine's own stack or on `h2`, TLS), which
//! speaks a [`protocol`] (gRPC), which drives a [`call`] (rule selection,
//! templates, streaming, timing, faults) answered from the [`served`] plan.
//! A call no rule answers may go to a real server through [`upstream`]
//! (the engine as an HTTP/2 client, and the recording of what it answered).
//! [`observe`] holds what watches calls (metrics, journal) and the
//! engine's own services (health, reflection); [`state`] ties the current
//! plan generation to them; [`admin`] is the admin HTTP API, and `runtime`
//! (feature `compile`) its routes that change protos and rules while
//! serving, the one module that uses the compiler. [`codec`]
//! (protobuf wire format, HPACK) and [`config`] sit below everything. The
//! request path never decodes a whole message; nothing but `runtime`
//! depends on the compiler or protox.

pub mod admin;
pub mod budget;
pub mod call;
pub mod codec;
pub mod config;
pub mod observe;
pub mod protocol;
pub mod rng;
#[cfg(feature = "compile")]
pub mod runtime;
pub mod served;
pub mod server;
pub mod shared;
pub mod state;
pub mod transport;
pub mod upstream;

pub use config::{Config, JournalLimits, Stack};
pub use served::generation::Generation;
pub use served::{NoMatch, PrepareError, Served};
pub use server::Server;
pub use state::State;
pub use wirestub_plan::Plan;

/// Loads a plan file's bytes and prepares it for serving: the plan's own
/// validation, then the engine's (regular expressions).
pub fn load(bytes: &[u8], no_match: NoMatch) -> Result<Served, Box<dyn std::error::Error + Send + Sync>> {
    Ok(Served::new(Plan::from_bytes(bytes)?, no_match)?)
}
