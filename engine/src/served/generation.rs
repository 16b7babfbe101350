//! One loaded plan with what serves it: the prepared plan, its metrics,
//! its reflection answers and its descriptors. Calls and journal entries
//! keep the generation they started on.

use crate::observe::metrics::Stats;
use crate::observe::reflection::Reflection;
use crate::served::Served;
use bytes::Bytes;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

/// One loaded plan, prepared for serving, with what the admin side needs
/// about it. Calls keep the generation they started on until they end.
pub struct Generation {
    pub served: Served,
    /// Per-worker counters of calls served by this generation.
    pub stats: Arc<Stats>,
    pub reflection: Reflection,
    /// The plan's `FileDescriptorSet`, encoded.
    pub descriptors: Bytes,
    /// FNV-1a 64 of the plan's encoding, in hex: equal plans, equal ids.
    pub identity: String,
    /// The plan layout version it was read from.
    pub version: u32,
    /// Where it came from: the plan file, or the directories compiled.
    pub source: String,
    pub loaded: SystemTime,
    /// Number of this generation: 1 for the first plan, +1 per swap.
    pub number: u64,
    pub(crate) schema: OnceLock<Option<prost_reflect::DescriptorPool>>,
}

impl Generation {
    /// The descriptors as a pool (decoded on first use; None when they do
    /// not decode), for JSON views and names. Never on the request path.
    pub fn schema(&self) -> Option<&prost_reflect::DescriptorPool> {
        self.schema.get_or_init(|| prost_reflect::DescriptorPool::decode(&self.descriptors[..]).ok()).as_ref()
    }

    /// Fully-qualified names of the services the plan mocks.
    pub fn services(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for m in &self.served.methods {
            if m.builtin.is_some() {
                continue;
            }
            if let Some(service) = m.plan.path.strip_prefix('/').and_then(|p| p.split_once('/')).map(|(s, _)| s) {
                if out.last().map(String::as_str) != Some(service) {
                    out.push(service.to_string());
                }
            }
        }
        out.dedup();
        out
    }
}
