//! The control server's side tasks: the hub's timer, the policy-file
//! watcher, the admin unix socket and the `/metrics` renderer.

#![warn(missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::mpsc;

use super::Shared;
use super::hub_thread::{HubCmd, admin_call};
use crate::control::server::hub::AdminRequest;

/// Reads a policy file: (text, the name it is reported under).
pub(super) fn read_policy_file(path: &Path) -> Result<(String, String)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading policy file {}", path.display()))?;
    Ok((text, path.display().to_string()))
}

/// One scrape: the hub's status (asked like an admin request) and the counters.
pub(super) fn metrics_render(shared: &Arc<Shared>) -> crate::daemon::metrics::Render {
    let weak = Arc::downgrade(shared);
    Arc::new(move || {
        let weak = weak.clone();
        Box::pin(async move {
            let Some(shared) = weak.upgrade() else { return String::new() };
            let status = admin_call(&shared, AdminRequest::Status).await.unwrap_or(Value::Null);
            shared.metrics.render(&status, shared.relay.as_ref().map(|r| r.stats()), shared.preauth.current())
        })
    })
}

/// Asks the hub to run its timers every `tick`.
pub(super) async fn tick_loop(shared: Arc<Shared>) {
    let mut iv = tokio::time::interval(shared.opts.tick);
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        iv.tick().await;
        // A busy hub skips a tick rather than queueing them up.
        if let Err(mpsc::error::TrySendError::Closed(_)) = shared.hub.try_send(HubCmd::Tick) {
            return;
        }
    }
}

/// Sends the policy file to the hub whenever its mtime or size changes.
pub(super) async fn policy_watch(path: PathBuf, shared: Arc<Shared>) {
    let stamp = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.modified().ok(), m.len()));
    let mut last = stamp(&path);
    let mut iv = tokio::time::interval(shared.opts.policy_poll);
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        iv.tick().await;
        let now = stamp(&path);
        if now == last {
            continue;
        }
        last = now;
        match read_policy_file(&path) {
            Ok((text, name)) => {
                if shared.hub.send(HubCmd::PolicyFile { text, name }).await.is_err() {
                    return;
                }
            }
            Err(e) => tracing::error!("policy file: {e:#}; the policy in force stays"),
        }
    }
}

/// Serves the admin socket: one JSON request per line, one answer per line.
pub(super) async fn admin_loop(l: UnixListener, shared: Arc<Shared>) {
    loop {
        let Ok((s, _)) = l.accept().await else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                // Fleet-audit requests (tagged `audit_op`) are reads answered
                // from their own connection, not by the hub thread.
                let resp = if let Ok(req) = serde_json::from_str::<crate::control::server::audit::AuditRequest>(&line) {
                    let dir = shared.opts.state_dir.clone();
                    tokio::task::spawn_blocking(move || crate::control::server::audit::handle(&dir, &req))
                        .await
                        .unwrap_or_else(|_| Err("audit query failed".into()))
                } else {
                    match serde_json::from_str::<AdminRequest>(&line) {
                        Ok(req) => admin_call(&shared, req).await.map_err(|e| e.message),
                        Err(e) => Err(format!("bad admin request: {e}")),
                    }
                };
                let v = match resp {
                    Ok(v) => serde_json::json!({"ok": true, "result": v}),
                    Err(e) => serde_json::json!({"ok": false, "error": e}),
                };
                let mut out = serde_json::to_vec(&v).unwrap_or_default();
                out.push(b'\n');
                if w.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
    }
}
