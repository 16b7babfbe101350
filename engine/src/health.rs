//! `grpc.health.v1.Health`: the serving status of the server as a whole
//! (service "") and of each mocked service, answered by `Check` and
//! streamed by `Watch`. Every known service is SERVING while the engine
//! serves and NOT_SERVING once it drains.

use crate::grpc::Status;
use bytes::Bytes;

/// `/grpc.health.v1.Health/Check`.
pub const CHECK: &str = "/grpc.health.v1.Health/Check";
/// `/grpc.health.v1.Health/Watch`.
pub const WATCH: &str = "/grpc.health.v1.Health/Watch";

/// The health state shared by every worker and the admin API.
pub struct Health {}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    pub fn new() -> Health {
        Health {}
    }

    /// Replaces the set of known services (fully-qualified names) after a
    /// plan load or swap; they are SERVING unless the server drains.
    pub fn set_services(&self, _services: &[String]) {}

    /// Shutdown started: every service, and the server, NOT_SERVING.
    pub fn set_draining(&self) {}

    /// Whether the server as a whole is SERVING.
    pub fn is_serving(&self) -> bool {
        unimplemented!()
    }

    /// Answers `Check`: `request` is an encoded `HealthCheckRequest`
    /// (unframed); the result an encoded `HealthCheckResponse` (unframed),
    /// or NOT_FOUND for an unknown service, INVALID_ARGUMENT for a request
    /// that does not decode.
    pub fn check(&self, _request: &[u8]) -> Result<Bytes, Status> {
        unimplemented!()
    }

    /// The service a `Watch` request names (INVALID_ARGUMENT when it does
    /// not decode).
    pub fn watched(&self, _request: &[u8]) -> Result<String, Status> {
        unimplemented!()
    }

    /// The current status of `service` as an encoded `HealthCheckResponse`
    /// (unframed); SERVICE_UNKNOWN for a service not known.
    pub fn status_of(&self, _service: &str) -> Bytes {
        unimplemented!()
    }

    /// A receiver whose value changes whenever any status changes.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        unimplemented!()
    }
}
