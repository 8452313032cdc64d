//! The control server's Prometheus metrics (`tailgate control
//! --metrics-listen ADDR`).
//!
//! Node and policy figures come from the hub's `status` (the same numbers
//! `tailgate control status --json` prints), relay figures from the relay's
//! own stats; only what nobody counted before is counted here: logins and
//! registrations, maps sent and their bytes, policy reloads, and connections
//! turned away before they authenticated.

#![warn(missing_docs)]

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::registry::Registry;
use serde_json::Value;

use crate::daemon::metrics::{counter, counter_family, gauge};
use crate::relay::RelayStats;

#[derive(Default)]
pub(crate) struct ControlMetrics {
    pub(crate) registrations: AtomicU64,
    pub(crate) logins: AtomicU64,
    pub(crate) hellos_refused: AtomicU64,
    pub(crate) map_full_sends: AtomicU64,
    pub(crate) map_delta_sends: AtomicU64,
    /// Sealed bytes of map messages written to nodes.
    pub(crate) map_bytes: AtomicU64,
    pub(crate) policy_reloads: AtomicU64,
    pub(crate) rejected_cap: AtomicU64,
    pub(crate) rejected_tls: AtomicU64,
    pub(crate) rejected_request: AtomicU64,
}

pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl ControlMetrics {
    /// Renders a scrape from the hub's status and the relay's stats.
    pub(crate) fn render(&self, status: &Value, relay: Option<RelayStats>, unauthenticated: usize) -> String {
        let mut reg = Registry::with_prefix("tailgate_control");
        let n = |k: &str| status[k].as_u64().unwrap_or(0);
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        gauge(&mut reg, "nodes", "Nodes registered", n("nodes") as i64);
        gauge(&mut reg, "nodes_online", "Nodes with a live control connection", n("online") as i64);
        gauge(&mut reg, "users", "Users", n("users") as i64);
        gauge(&mut reg, "policy_version", "Version of the policy in force", n("policy_version") as i64);
        counter(&mut reg, "policy_reloads", "Policy file changes read (in force or refused)", get(&self.policy_reloads));
        counter(&mut reg, "registrations", "Nodes registered with an auth key", get(&self.registrations));
        counter(&mut reg, "logins", "Logins of known node keys", get(&self.logins));
        counter(&mut reg, "hellos_refused", "Registrations and logins refused", get(&self.hellos_refused));
        counter_family(
            &mut reg,
            "map_sends",
            "Netmaps sent to nodes, full or delta",
            [
                (vec![("kind".into(), "full".into())], get(&self.map_full_sends)),
                (vec![("kind".into(), "delta".into())], get(&self.map_delta_sends)),
            ],
        );
        counter(&mut reg, "map_sent_bytes", "Bytes of netmap messages written (sealed)", get(&self.map_bytes));
        counter_family(
            &mut reg,
            "rejected_connections",
            "Connections closed before authenticating, by reason",
            [
                (vec![("reason".into(), "unauthenticated_cap".into())], get(&self.rejected_cap)),
                (vec![("reason".into(), "tls_handshake".into())], get(&self.rejected_tls)),
                (vec![("reason".into(), "bad_request".into())], get(&self.rejected_request)),
            ],
        );
        gauge(&mut reg, "unauthenticated_connections", "Connections that have not authenticated yet", unauthenticated as i64);
        counter(&mut reg, "audit_write_failures", "Audit rows that could not be written", n("audit_write_failures"));
        if let Some(r) = relay {
            gauge(&mut reg, "relay_connections", "Nodes connected to the relay", r.connections as i64);
            counter(&mut reg, "relay_accepted", "Relay connections accepted", r.accepted);
            counter(&mut reg, "relay_refused", "Relay connections refused", r.refused);
            counter(&mut reg, "relay_forwarded_packets", "Datagrams forwarded by the relay", r.forwarded_packets);
            counter(&mut reg, "relay_forwarded_bytes", "Bytes forwarded by the relay", r.forwarded_bytes);
            counter_family(
                &mut reg,
                "relay_dropped",
                "Datagrams the relay dropped, by reason",
                [
                    (vec![("reason".into(), "queue_full".into())], r.dropped_queue_full),
                    (vec![("reason".into(), "no_peer".into())], r.dropped_no_peer),
                ],
            );
        }
        crate::daemon::metrics::encode(&reg)
    }
}
