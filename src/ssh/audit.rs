//! Audit log: one JSON object per line in `state_dir/audit.jsonl` (0600).
//!
//! Records are built as plain values ([`AuditEvent`]) so their content is
//! unit-testable; [`AuditLog`] only appends lines. Nothing secret goes in:
//! passwords offered during auth are never looked at, environment variables
//! are logged by name only, session data only as byte counts.
#![warn(missing_docs)]

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::SshError;
use super::journal::Journal;
use crate::daemon::identity::Identity;
use crate::policy::{Action, SshDecision};

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum EventKind {
    /// An authentication decision (one per login name tried on a connection).
    Auth,
    /// A shell, exec or subsystem started.
    SessionStart,
    /// A session ended (exit status, bytes, duration).
    SessionEnd,
    /// A session request refused (login denied, policy changed, spawn failed).
    SessionDenied,
    /// A forwarding request (`ssh -L`, `-R`, agent, X11), allowed or refused.
    Forward,
    /// An allowed forward finished.
    ForwardEnd,
    /// An admitted login stopped being allowed (the policy or the caller's
    /// identity changed); its sessions and forwards are being ended.
    Revoked,
    /// A `check` (second factor) outcome; `kind` is `passed`, `cached`,
    /// `failed`, `lockout` or `unavailable`.
    Check,
}

/// The caller as recorded: the verified tailnet identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Caller {
    pub node: String,
    pub node_key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    pub tags: Vec<String>,
    pub ip: String,
}

impl From<&Identity> for Caller {
    fn from(id: &Identity) -> Self {
        Caller {
            node: id.node_name.clone(),
            node_key: id.node_key.clone(),
            user: id.user.clone(),
            tags: id.tags.clone(),
            ip: id.ip.to_string(),
        }
    }
}

/// One audit line. Absent fields are omitted from the JSON.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct AuditEvent {
    /// Node-unique, increasing by one per event (set by the writer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// SHA-256 (hex) of the previous event's line: the node's hash chain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prev: Option<String>,
    /// RFC 3339, UTC, millisecond precision.
    pub time: String,
    pub event: EventKind,
    /// Connection id (all events of one SSH connection share it).
    pub conn: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    pub caller: Caller,
    /// This node's name.
    pub target: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub login: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    /// The final outcome (a policy `accept` can still be refused locally, e.g. no such user).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `shell`, `exec`, `subsystem`, or for forwards `direct-tcpip`, `tcpip-forward`, `agent`, `x11`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pty: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub term: Option<String>,
    /// Names (never values) of client-supplied environment variables that were accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_in: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_out: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_signal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recording: Option<String>,
}

impl AuditEvent {
    pub(crate) fn new(event: EventKind, conn: &str, caller: &Identity, target: &Identity, now: SystemTime) -> Self {
        AuditEvent {
            id: None,
            prev: None,
            time: rfc3339_utc(now),
            event,
            conn: conn.to_string(),
            session: None,
            caller: caller.into(),
            target: target.node_name.clone(),
            login: None,
            rule: None,
            action: None,
            allowed: None,
            reason: None,
            kind: None,
            command: None,
            pty: None,
            term: None,
            env: None,
            dest: None,
            bytes_in: None,
            bytes_out: None,
            exit_status: None,
            exit_signal: None,
            duration_ms: None,
            recording: None,
        }
    }

    /// Copies login, rule, action from a policy decision.
    pub(crate) fn decision(mut self, login: &str, d: &SshDecision) -> Self {
        self.login = Some(login.to_string());
        self.rule = d.rule.clone();
        self.action = Some(d.action);
        self
    }

    pub(crate) fn to_line(&self) -> String {
        // Serialization of this struct cannot fail (no maps with non-string keys).
        let mut s = serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"));
        s.push('\n');
        s
    }
}

/// Appends audit lines, through the writer thread ([`super::journal`]):
/// callers never touch the file themselves.
pub(crate) struct AuditLog {
    journal: Journal,
}

impl AuditLog {
    /// Opens `audit.jsonl` in `state_dir` (0600) and starts the writer.
    pub(crate) fn open(state_dir: &Path, path: &Path, recordings_dir: &Path) -> Result<AuditLog, SshError> {
        Ok(AuditLog { journal: Journal::open(state_dir, path, recordings_dir)? })
    }

    pub(crate) fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Appends one event (queued; written in order by the writer thread). A
    /// failing write is logged, not fatal: refusing service because the disk
    /// is full would lock admins out of the box.
    pub(crate) fn write(&self, ev: &AuditEvent) {
        crate::daemon::metrics::ssh_event(ev);
        self.journal.audit(ev.clone());
    }
}

/// `2024-05-06T07:08:09.123Z`.
pub(crate) fn rfc3339_utc(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = d.as_secs() as i64;
    let millis = d.subsec_millis();
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, dd) = civil_from_days(days);
    format!("{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{millis:03}Z", sod / 3600, (sod / 60) % 60, sod % 60)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn alice() -> Identity {
        Identity {
            node_key: "a2V5".into(),
            node_name: "laptop".into(),
            user: Some("alice".into()),
            tags: vec![],
            ip: IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2)),
            groups: Vec::new(),
        }
    }

    fn web1() -> Identity {
        Identity {
            node_key: "d2Vi".into(),
            node_name: "web1".into(),
            user: None,
            tags: vec!["tag:prod".into()],
            ip: IpAddr::V4(Ipv4Addr::new(100, 64, 0, 3)),
            groups: Vec::new(),
        }
    }

    #[test]
    fn rfc3339_known_values() {
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(951_782_400_007); // leap day 2000
        assert_eq!(rfc3339_utc(t), "2000-02-29T00:00:00.007Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_251_199); // 2024-02-29T23:59:59
        assert_eq!(rfc3339_utc(t), "2024-02-29T23:59:59.000Z");
        let t = UNIX_EPOCH + Duration::from_secs(4_102_444_800); // 2100-01-01
        assert_eq!(rfc3339_utc(t), "2100-01-01T00:00:00.000Z");
    }

    #[test]
    fn auth_event_json_shape() {
        let d = SshDecision {
            action: Action::Reject,
            rule: Some("ssh[1] (p.toml:3)".into()),
            reason: "nope".into(),
            record: false,
            record_required: false,
            max_duration: None,
            accept_env: vec![],
            check_period: Default::default(),
        };
        let mut ev = AuditEvent::new(EventKind::Auth, "c1", &alice(), &web1(), UNIX_EPOCH).decision("root", &d);
        ev.allowed = Some(false);
        let line = ev.to_line();
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "auth");
        assert_eq!(v["time"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["caller"]["user"], "alice");
        assert_eq!(v["caller"]["node"], "laptop");
        assert_eq!(v["caller"]["ip"], "100.64.0.2");
        assert_eq!(v["target"], "web1");
        assert_eq!(v["login"], "root");
        assert_eq!(v["action"], "reject");
        assert_eq!(v["rule"], "ssh[1] (p.toml:3)");
        assert_eq!(v["allowed"], false);
        assert!(v.get("session").is_none());
        assert!(v.get("bytes_in").is_none());
    }

    #[test]
    fn log_file_is_private_and_appends() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let ev = AuditEvent::new(EventKind::SessionStart, "c", &alice(), &web1(), SystemTime::now());
        rt.block_on(async {
            let log = AuditLog::open(dir.path(), &p, &dir.path().join("r")).unwrap();
            log.write(&ev);
            log.write(&ev);
            log.journal().flush().await;
            let log = AuditLog::open(dir.path(), &p, &dir.path().join("r")).unwrap();
            log.write(&ev);
            log.journal().flush().await;
        });
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 3);
        for (i, l) in text.lines().enumerate() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["event"], "session_start");
            assert_eq!(v["id"], i as u64 + 1, "the chain continues across reopen");
        }
    }
}
