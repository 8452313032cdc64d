//! Endpoint report pacing. Every applied report is a store write and a
//! delta to every viewer, so each node gets a token bucket; reports beyond
//! it are coalesced (the latest wins) and applied by [`Hub::tick`].

use std::net::SocketAddr;
use std::time::Instant;

use super::{Hub, HubConfig, Now};

/// Per-node endpoint report pacing: a token bucket plus the latest report
/// that had to wait. Every applied report is a SQLite write and a delta to
/// every viewer, so a node may not make the server do that at will.
pub(super) struct EndpointGate {
    tokens: f64,
    refilled: Instant,
    pending: Option<Vec<SocketAddr>>,
}

impl EndpointGate {
    fn new(burst: u32, now: Instant) -> EndpointGate {
        EndpointGate { tokens: burst as f64, refilled: now, pending: None }
    }

    /// Refills, then takes a token if one is there.
    fn take(&mut self, cfg: &HubConfig, now: Instant) -> bool {
        let per = cfg.endpoint_interval.as_secs_f64();
        let gained = if per > 0.0 { now.saturating_duration_since(self.refilled).as_secs_f64() / per } else { f64::INFINITY };
        self.tokens = (self.tokens + gained).min(cfg.endpoint_burst.max(1) as f64);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Hub {
    /// A (validated) endpoint report: applied now if the node's budget
    /// allows, else kept as the node's pending report for [`Hub::tick`].
    pub(super) fn report_endpoints(&mut self, node: i64, endpoints: Vec<SocketAddr>, now: Now) {
        let now_i = now.mono;
        let Some(current) = self.nodes.get(&node).map(|n| &n.endpoints) else { return };
        let gate = self.endpoint_gates.entry(node).or_insert_with(|| EndpointGate::new(self.cfg.endpoint_burst, now_i));
        if gate.pending.is_none() && *current == endpoints {
            return;
        }
        if gate.pending.is_some() || !gate.take(&self.cfg, now_i) {
            gate.pending = Some(endpoints);
            return;
        }
        self.apply_endpoints(node, endpoints, now.unix);
    }

    fn apply_endpoints(&mut self, node: i64, endpoints: Vec<SocketAddr>, now: i64) {
        let Some(mut n) = self.nodes.get(&node).cloned() else { return };
        if n.endpoints == endpoints {
            return;
        }
        n.endpoints = endpoints;
        if let Err(e) = self.save(n) {
            tracing::warn!("store: {e:#}");
        }
        self.refresh(node, now);
    }

    /// Applies pending endpoint reports whose node has budget again.
    pub(super) fn flush_endpoints(&mut self, now: Now) {
        let now_i = now.mono;
        let cfg = self.cfg.clone();
        let ready: Vec<(i64, Vec<SocketAddr>)> = self
            .endpoint_gates
            .iter_mut()
            .filter(|(_, g)| g.pending.is_some())
            .filter_map(|(id, g)| if g.take(&cfg, now_i) { g.pending.take().map(|p| (*id, p)) } else { None })
            .collect();
        for (id, eps) in ready {
            self.apply_endpoints(id, eps, now.unix);
        }
        // Gates of nodes that are gone or idle long enough to be full again.
        let idle = cfg.endpoint_interval * cfg.endpoint_burst.max(1);
        self.endpoint_gates
            .retain(|id, g| g.pending.is_some() || (self.conns.contains_key(id) && now_i.saturating_duration_since(g.refilled) < idle));
    }
}
