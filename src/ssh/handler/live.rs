//! The watcher that keeps an admitted login true to the identity and policy
//! in force.
#![warn(missing_docs)]

use std::sync::Arc;
use std::time::Instant;

use russh::Disconnect;
use tokio::sync::watch;

use super::{ConnCtx, Judged, REVOKE_GRACE, deadline};
use crate::ssh::account::Account;
use crate::ssh::audit::EventKind;
use crate::ssh::session;

/// Keeps an admitted login true to the identity and policy in force: judges
/// it again on every change of either, moves the time limit when the
/// deciding rule's `max_duration` changes, and on revocation tells every
/// session and forward to end (they show the message), writes an audit line
/// and drops the connection. Also ends the connection at its time limit.
pub(super) async fn watch_live(ctx: Arc<ConnCtx>, user: String, acct: Account, at: Instant, handle: russh::server::Handle) {
    // Subscribed before the first judgement, so no change can slip in between.
    let mut ids = Some(ctx.resolver.changes());
    let mut policy = Some(ctx.server.cfg.policy.changes());
    let mut first = true;
    loop {
        if !first {
            let limit = ctx.live.borrow().deadline;
            let expired = async {
                match limit {
                    Some((t, _)) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = changed(&mut ids) => if r.is_err() { ids = None },
                r = changed(&mut policy) => if r.is_err() { policy = None },
                _ = expired => {
                    // Sessions end themselves at the limit and say so; this also
                    // ends forwards and idle connections.
                    tokio::time::sleep(REVOKE_GRACE).await;
                    let d = limit.map(|(_, d)| d).unwrap_or_default();
                    let msg = format!("tailgate: session time limit ({}) reached", session::human_duration(d));
                    let _ = handle.disconnect(Disconnect::ByApplication, msg, "en".into()).await;
                    return;
                }
            }
        }
        first = false;
        match ctx.judge(&user, &acct) {
            Judged::Yes(d) => {
                let limit = deadline(at, d.max_duration);
                // Always notify: forwards re-check their port on every change.
                ctx.live.send_modify(|l| l.deadline = limit);
            }
            Judged::No(msg, d) => {
                let why = msg.strip_prefix("tailgate: access denied: ").unwrap_or_else(|| msg.trim_start_matches("tailgate: "));
                let msg = format!("tailgate: access revoked (the policy or your identity changed): {why}");
                let mut ev = ctx.event(EventKind::Revoked);
                ev.login = Some(user.clone());
                ev.rule = d.as_ref().and_then(|d| d.rule.clone());
                ev.action = d.as_ref().map(|d| d.action);
                ev.allowed = Some(false);
                ev.reason = Some(msg.trim_start_matches("tailgate: ").to_string());
                ctx.server.audit.write(&ev);
                tracing::info!("{}", msg.trim_start_matches("tailgate: "));
                ctx.live.send_modify(|l| l.revoked = Some(msg.clone()));
                tokio::time::sleep(REVOKE_GRACE).await;
                let _ = handle.disconnect(Disconnect::ByApplication, msg, "en".into()).await;
                return;
            }
        }
    }
}

/// `rx.changed()`, or never once the sender is gone.
async fn changed(rx: &mut Option<watch::Receiver<u64>>) -> Result<(), watch::error::RecvError> {
    match rx {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}
