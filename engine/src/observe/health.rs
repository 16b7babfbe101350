//! `grpc.health.v1.Health`: the serving status of the server as a whole
//! (service "") and of each mocked service, answered by `Check` and
//! streamed by `Watch`. Every known service is SERVING while the engine
//! serves and NOT_SERVING once it drains.
//!
//! The state is a set of service names and a draining flag behind one lock,
//! read by `Check` and `Watch` calls from every worker (never on the path of
//! mocked calls). Every change bumps a counter published on a
//! `tokio::sync::watch` channel, which open `Watch` calls wait on.
//!
//! Semantics follow gRPC's health-checking protocol: `Check` on an unknown
//! service fails with NOT_FOUND, while `Watch` reports SERVICE_UNKNOWN and
//! keeps the call open; draining is permanent.

use crate::protocol::grpc::{Code, Status};
use bytes::Bytes;
use prost::Message;
use std::collections::HashSet;
use std::sync::{RwLock, RwLockReadGuard};
use tokio::sync::watch;

/// `/grpc.health.v1.Health/Check`.
pub const CHECK: &str = "/grpc.health.v1.Health/Check";
/// `/grpc.health.v1.Health/Watch`.
pub const WATCH: &str = "/grpc.health.v1.Health/Watch";

/// `grpc.health.v1.HealthCheckResponse.ServingStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum ServingStatus {
    Unknown = 0,
    Serving = 1,
    NotServing = 2,
    /// Used only by `Watch`, for a service the server does not know.
    ServiceUnknown = 3,
}

impl ServingStatus {
    /// The status read from an encoded `HealthCheckResponse` (None when it
    /// does not decode or holds a value outside the enum).
    pub fn decode(response: &[u8]) -> Option<ServingStatus> {
        match HealthCheckResponse::decode(response).ok()?.status {
            0 => Some(ServingStatus::Unknown),
            1 => Some(ServingStatus::Serving),
            2 => Some(ServingStatus::NotServing),
            3 => Some(ServingStatus::ServiceUnknown),
            _ => None,
        }
    }

    /// The encoded `HealthCheckResponse` carrying this status.
    pub fn encode(self) -> Bytes {
        Bytes::from(HealthCheckResponse { status: self as i32 }.encode_to_vec())
    }
}

/// `grpc.health.v1.HealthCheckRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

/// `grpc.health.v1.HealthCheckResponse`.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

#[derive(Default)]
struct Inner {
    services: HashSet<String>,
    draining: bool,
}

/// The health state shared by every worker and the admin API.
pub struct Health {
    inner: RwLock<Inner>,
    /// Counts changes; receivers wake on each.
    changes: watch::Sender<u64>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// Serving, with no services known yet (only the server itself, "").
    pub fn new() -> Health {
        Health { inner: RwLock::new(Inner::default()), changes: watch::Sender::new(0) }
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        // A writer cannot panic half-way through an update, so the state a
        // poisoned lock holds is whole.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Replaces the set of known services (fully-qualified names) after a
    /// plan load or swap; they are SERVING unless the server drains.
    pub fn set_services(&self, services: &[String]) {
        let next: HashSet<String> = services.iter().cloned().collect();
        let changed = {
            let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
            if inner.services == next {
                false
            } else {
                inner.services = next;
                true
            }
        };
        if changed {
            self.bump();
        }
    }

    /// Shutdown started: every service, and the server, NOT_SERVING. There
    /// is no way back.
    pub fn set_draining(&self) {
        let changed = {
            let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
            !std::mem::replace(&mut inner.draining, true)
        };
        if changed {
            self.bump();
        }
    }

    /// Whether the server as a whole is SERVING.
    pub fn is_serving(&self) -> bool {
        !self.read().draining
    }

    /// The status `Check` reports for `service`; None for an unknown one.
    pub fn status(&self, service: &str) -> Option<ServingStatus> {
        let inner = self.read();
        if !service.is_empty() && !inner.services.contains(service) {
            return None;
        }
        Some(if inner.draining { ServingStatus::NotServing } else { ServingStatus::Serving })
    }

    /// Answers `Check`: `request` is an encoded `HealthCheckRequest`
    /// (unframed); the result an encoded `HealthCheckResponse` (unframed),
    /// or NOT_FOUND for an unknown service, INVALID_ARGUMENT for a request
    /// that does not decode.
    pub fn check(&self, request: &[u8]) -> Result<Bytes, Status> {
        let service = decode_request(request)?;
        match self.status(&service) {
            Some(status) => Ok(status.encode()),
            None => Err(Status::new(Code::NotFound, format!("unknown service {service}"))),
        }
    }

    /// The service a `Watch` request names (INVALID_ARGUMENT when it does
    /// not decode).
    pub fn watched(&self, request: &[u8]) -> Result<String, Status> {
        decode_request(request)
    }

    /// The current status of `service` as an encoded `HealthCheckResponse`
    /// (unframed); SERVICE_UNKNOWN for a service not known.
    pub fn status_of(&self, service: &str) -> Bytes {
        self.status(service).unwrap_or(ServingStatus::ServiceUnknown).encode()
    }

    /// A receiver whose value changes whenever any status changes. A
    /// `Watch` sends [`Health::status_of`] at once, then again after each
    /// change (a change may leave the watched service's status as it was;
    /// comparing with the last message sent avoids repeating it).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

fn decode_request(request: &[u8]) -> Result<String, Status> {
    match HealthCheckRequest::decode(request) {
        Ok(r) => Ok(r.service),
        Err(e) => Err(Status::new(Code::InvalidArgument, format!("HealthCheckRequest does not decode: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(service: &str) -> Vec<u8> {
        HealthCheckRequest { service: service.into() }.encode_to_vec()
    }

    fn checked(h: &Health, service: &str) -> Result<Option<ServingStatus>, Code> {
        h.check(&request(service)).map(|b| ServingStatus::decode(&b)).map_err(|s| s.code)
    }

    fn services(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn encodings() {
        assert_eq!(&ServingStatus::Serving.encode()[..], &[0x08, 0x01]);
        assert_eq!(&ServingStatus::NotServing.encode()[..], &[0x08, 0x02]);
        assert_eq!(&ServingStatus::ServiceUnknown.encode()[..], &[0x08, 0x03]);
        assert_eq!(ServingStatus::decode(&[]), Some(ServingStatus::Unknown));
        assert_eq!(ServingStatus::decode(&[0x08, 0x09]), None);
    }

    #[test]
    fn server_and_services_serve() {
        let h = Health::new();
        assert!(h.is_serving());
        assert_eq!(checked(&h, ""), Ok(Some(ServingStatus::Serving)));
        // The empty request (all defaults) is the server itself.
        assert_eq!(h.check(&[]).map(|b| ServingStatus::decode(&b)), Ok(Some(ServingStatus::Serving)));
        assert_eq!(checked(&h, "helloworld.Greeter"), Err(Code::NotFound));

        h.set_services(&services(&["helloworld.Greeter", "shop.v1.Catalog"]));
        assert_eq!(checked(&h, "helloworld.Greeter"), Ok(Some(ServingStatus::Serving)));
        assert_eq!(checked(&h, "shop.v1.Catalog"), Ok(Some(ServingStatus::Serving)));
        assert_eq!(checked(&h, "shop.v1"), Err(Code::NotFound));
        assert_eq!(checked(&h, "helloworld.greeter"), Err(Code::NotFound));
        let err = h.check(&request("nope.Svc")).unwrap_err();
        assert!(err.message.contains("nope.Svc"), "{}", err.message);

        // A swap replaces the set.
        h.set_services(&services(&["shop.v1.Catalog"]));
        assert_eq!(checked(&h, "helloworld.Greeter"), Err(Code::NotFound));
        assert_eq!(checked(&h, "shop.v1.Catalog"), Ok(Some(ServingStatus::Serving)));
    }

    #[test]
    fn draining_is_permanent() {
        let h = Health::new();
        h.set_services(&services(&["helloworld.Greeter"]));
        h.set_draining();
        assert!(!h.is_serving());
        assert_eq!(checked(&h, ""), Ok(Some(ServingStatus::NotServing)));
        assert_eq!(checked(&h, "helloworld.Greeter"), Ok(Some(ServingStatus::NotServing)));
        assert_eq!(checked(&h, "unknown.Svc"), Err(Code::NotFound));
        // A plan swapped in while draining does not bring anything back.
        h.set_services(&services(&["helloworld.Greeter", "shop.v1.Catalog"]));
        h.set_draining();
        assert!(!h.is_serving());
        assert_eq!(checked(&h, "shop.v1.Catalog"), Ok(Some(ServingStatus::NotServing)));
    }

    #[test]
    fn watch_statuses() {
        let h = Health::new();
        h.set_services(&services(&["helloworld.Greeter"]));
        let status = |s: &str| ServingStatus::decode(&h.status_of(s));
        assert_eq!(status(""), Some(ServingStatus::Serving));
        assert_eq!(status("helloworld.Greeter"), Some(ServingStatus::Serving));
        assert_eq!(status("unknown.Svc"), Some(ServingStatus::ServiceUnknown));
        h.set_draining();
        assert_eq!(status(""), Some(ServingStatus::NotServing));
        assert_eq!(status("helloworld.Greeter"), Some(ServingStatus::NotServing));
        assert_eq!(status("unknown.Svc"), Some(ServingStatus::ServiceUnknown));
    }

    #[test]
    fn malformed_requests() {
        let h = Health::new();
        for bad in [&[0x0a, 0x05, b'a'][..], &[0x0a, 0x02, 0xff, 0xfe], &[0xff], &[0x0b]] {
            assert_eq!(h.check(bad).unwrap_err().code, Code::InvalidArgument, "{bad:?}");
            assert_eq!(h.watched(bad).unwrap_err().code, Code::InvalidArgument, "{bad:?}");
        }
        assert_eq!(h.watched(&request("a.B")), Ok("a.B".to_string()));
        // Unknown fields are skipped, as by any protobuf decoder.
        assert_eq!(h.watched(&[0x10, 0x01, 0x0a, 0x01, b'x']), Ok("x".to_string()));
    }

    #[test]
    fn changes_bump_subscribers() {
        let h = Health::new();
        let mut rx = h.subscribe();
        assert!(!rx.has_changed().unwrap());
        h.set_services(&services(&["a.B"]));
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        // The same set again changes nothing.
        h.set_services(&services(&["a.B"]));
        assert!(!rx.has_changed().unwrap());
        h.set_draining();
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        h.set_draining();
        assert!(!rx.has_changed().unwrap());
    }

    #[tokio::test]
    async fn subscribe_wakes_a_waiting_watch() {
        let h = std::sync::Arc::new(Health::new());
        h.set_services(&services(&["a.B"]));
        let mut rx = h.subscribe();
        let waiter = tokio::spawn(async move {
            rx.changed().await.expect("sender alive");
        });
        tokio::task::yield_now().await;
        let h2 = h.clone();
        std::thread::spawn(move || h2.set_draining()).join().unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.expect("woken").unwrap();
        assert_eq!(ServingStatus::decode(&h.status_of("a.B")), Some(ServingStatus::NotServing));
    }
}
