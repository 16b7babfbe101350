//! The admin HTTP API on its own listener: status, services and rules,
//! health probes, Prometheus metrics, the request journal and plan reload.

use crate::state::State;
use std::sync::Arc;

/// Admin API options.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Requests other than the probes must carry `Authorization: Bearer
    /// TOKEN`.
    pub token: Option<String>,
}

/// A running admin server.
pub struct Admin {}

impl Admin {
    /// Serves the admin API on `listener` from its own thread.
    pub fn start(_listener: std::net::TcpListener, _state: Arc<State>, _options: Options) -> std::io::Result<Admin> {
        unimplemented!()
    }

    pub fn local_addr(&self) -> std::net::SocketAddr {
        unimplemented!()
    }
}
