//! The wirestub engine: loads a plan and answers gRPC calls from it.
//!
//! Layers, outermost first: [`server`] (listeners, workers, the choice of
//! HTTP/2 stack: [`http2`] or [`h2_stack`]), [`state`] (the current plan
//! generation, swapped on reload, with [`health`], [`journal`] and
//! [`metrics`]), [`call`] and [`matcher`] (rule selection), [`wire`]
//! (zero-copy field extraction from protobuf bytes), [`served`] (the plan
//! prepared for serving), [`grpc`] (protocol details independent of
//! HTTP/2). Beside the calls: [`admin`] (the admin HTTP API),
//! [`reflection`], [`tls`]. The request path never decodes a whole
//! message; the library never depends on the compiler or protox.

pub mod admin;
pub mod budget;
pub mod call;
pub mod grpc;
pub mod h2_stack;
pub mod health;
pub mod http2;
pub mod journal;
pub mod matcher;
pub mod metrics;
pub mod outflow;
pub mod reflection;
pub mod rng;
pub mod served;
pub mod server;
pub mod state;
pub mod template;
pub mod tls;
pub mod wire;

pub use served::{NoMatch, PrepareError, Served};
pub use server::{Config, Server, Stack};
pub use state::{Generation, State};
pub use wirestub_plan::Plan;

/// Loads a plan file's bytes and prepares it for serving: the plan's own
/// validation, then the engine's (regular expressions).
pub fn load(bytes: &[u8], no_match: NoMatch) -> Result<Served, Box<dyn std::error::Error + Send + Sync>> {
    Ok(Served::new(Plan::from_bytes(bytes)?, no_match)?)
}
