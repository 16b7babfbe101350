//! What watches calls and the plan without taking part in answering:
//! [`metrics`], the [`journal`], and the engine's own gRPC services,
//! [`health`] and [`reflection`].

pub mod health;
pub mod journal;
pub mod metrics;
pub mod record;
pub mod reflection;
pub mod shared_journal;
