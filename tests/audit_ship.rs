//! The audit trail and recordings leave the box (issue 10): real `tailgate
//! control` and `tailgate up` processes in namespaces, stock `ssh` on the
//! laptop, `asciinema cat` on what control exports.

mod common;
use common::*;

use std::time::Duration;

/// The admins-root policy with `record` on its ssh rule.
fn policy(record: &str) -> String {
    format!("{ADMINS_ROOT_POLICY}record = {record}\n")
}

/// Control on `NET.1:8443` with extra flags (the lab's helper has none).
fn start_control(w: &ControlLab, net: &str, extra: &str, n: u32) -> Proc {
    let d = w.d();
    let mut p = w.ctl.spawn(
        &format!(
            "env RUST_LOG=tailgate=info {TAILGATE} control --state-dir {d}/ctl --listen {net}.1:8443 --policy {d}/policy.toml {extra}"
        ),
        &w.dir.path().join(format!("ctl{n}.log")),
    );
    p.wait_log("listening on", 15);
    p
}

struct Lab {
    w: ControlLab,
    net: String,
    control: Option<Proc>,
    vps: Option<Proc>,
    _laptop: Proc,
    ssh: String,
}

impl Lab {
    fn new(prefix: &str, net: &str, record: &str, control_flags: &str) -> Lab {
        let _ = std::fs::remove_file("/root/.pyenv/shims/.pyenv-shim");
        let w = ControlLab::new(prefix, net);
        let d = w.d();
        std::fs::write(format!("{d}/policy.toml"), policy(record)).unwrap();
        let control = start_control(&w, net, control_flags, 1);
        w.admin("users add alice");
        let server_key = w.authkey("--tag tag:prod");
        let laptop_key = w.authkey("--user alice");
        let vps = w.start_node(&w.vps, "vps", &format!("--authkey {server_key}"), 1);
        let mut laptop = w.laptop.spawn(
            &format!("env RUST_LOG=tailgate=info {TAILGATE} up --authkey {laptop_key} --state-dir {d}/laptop --hostname laptop --no-ssh"),
            &w.dir.path().join("laptop.log"),
        );
        laptop.wait_log("tailgate: up at", 15);
        let mut ok = false;
        for _ in 0..40 {
            w.on_laptop(&format!("{TAILGATE} ssh-config > {d}/ssh_config"), 10);
            if std::fs::read_to_string(format!("{d}/ssh_config")).unwrap_or_default().contains("vps") {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        assert!(ok, "the laptop never saw vps");
        let ssh = format!("ssh -F {d}/ssh_config -o BatchMode=yes -o ConnectTimeout=15");
        Lab { w, net: net.into(), control: Some(control), vps: Some(vps), _laptop: laptop, ssh }
    }

    fn d(&self) -> String {
        self.w.d()
    }

    /// Runs `ssh root@vps CMD` on the laptop (retrying while the path comes up).
    fn ssh_ok(&self, cmd: &str) -> String {
        let mut r = (0, String::new(), String::new());
        let ok = eventually(30, || {
            r = self.w.on_laptop(&format!("{} root@vps {}", self.ssh, shell_quote(cmd)), 30);
            r.0 == 0
        });
        assert!(ok, "ssh root@vps {cmd}: {r:?}\nvps log:\n{}", self.vps.as_ref().map(|p| p.log_text()).unwrap_or_default());
        r.1
    }

    fn admin_json(&self, args: &str) -> serde_json::Value {
        let out = self.w.admin(&format!("--json {args}"));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args}: {e}: {out}"))
    }

    /// Audit event lines (`--json` prints one object per line).
    fn control_events(&self, filter: &str) -> Vec<serde_json::Value> {
        self.w.admin(&format!("--json audit --limit 100000 {filter}")).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    fn local_events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(format!("{}/vps/audit.jsonl", self.d()))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until control holds every event the node wrote.
    fn wait_all_events_shipped(&self) {
        let mut last = (0, 0);
        let ok = eventually(90, || {
            let local = self.local_events().iter().filter_map(|e| e["id"].as_u64()).max().unwrap_or(0);
            let remote = self.control_events("").iter().filter_map(|e| e["id"].as_u64()).max().unwrap_or(0);
            last = (local, remote);
            local > 0 && local == remote
        });
        assert!(ok, "events never all arrived (node, control) = {last:?}");
    }

    /// Waits until every recording on the node is complete at control and
    /// byte-identical to the node's file; returns the ids.
    fn wait_recordings_identical(&self) -> Vec<String> {
        let d = self.d();
        let mut why = String::new();
        let mut ids = Vec::new();
        let ok = eventually(90, || {
            let local: Vec<String> = std::fs::read_dir(format!("{d}/vps/recordings"))
                .map(|rd| {
                    rd.flatten().filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".cast")).map(String::from)).collect()
                })
                .unwrap_or_default();
            let listed = self.admin_json("recordings list");
            let complete: Vec<String> = listed
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["complete"] == true)
                .map(|r| r["id"].as_str().unwrap().to_string())
                .collect();
            if local.is_empty() || local.iter().any(|l| !complete.contains(l)) {
                why = format!("local {local:?} vs complete at control {complete:?}");
                return false;
            }
            for id in &local {
                let out = format!("{d}/export-{id}.cast");
                must(&format!("ip netns exec {} {TAILGATE} control --state-dir {d}/ctl recordings export {id} > {out}", self.w.ctl.name));
                let (got, want) = (std::fs::read(&out).unwrap(), std::fs::read(format!("{d}/vps/recordings/{id}.cast")).unwrap());
                if got != want {
                    let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
                    why = format!(
                        "recording {id} differs from the node's copy: control {} bytes, node {} bytes, first difference at {at}: control {:?} node {:?}",
                        got.len(),
                        want.len(),
                        String::from_utf8_lossy(&got[at.saturating_sub(40)..(at + 40).min(got.len())]),
                        String::from_utf8_lossy(&want[at.saturating_sub(40)..(at + 40).min(want.len())]),
                    );
                    return false;
                }
            }
            ids = local;
            true
        });
        assert!(ok, "{why}");
        ids
    }

    fn kill_control(&mut self) {
        if let Some(mut p) = self.control.take() {
            p.kill();
        }
    }

    fn restart_control(&mut self, extra: &str, n: u32) {
        self.control = Some(start_control(&self.w, &self.net, extra, n));
    }
}

#[test]
fn a_recorded_session_reaches_control_and_exports_for_asciinema() {
    if !is_root() || !require(&["ssh", "asciinema", "script"]) {
        eprintln!("SKIPPED: needs root, ssh and asciinema");
        return;
    }
    let lab = Lab::new("as", "10.97.41", "true", "");
    let d = lab.d();
    // A pty session, typed the way a person types.
    let (code, out, err) = lab.w.on_laptop(&format!("printf 'echo typed-$((6*7))\\nexit\\n' | {} -tt root@vps", lab.ssh), 30);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("typed-42"), "{out}");
    lab.wait_all_events_shipped();
    let ids = lab.wait_recordings_identical();
    assert_eq!(ids.len(), 1);
    // asciinema reads /dev/tty even for `cat`: give it one with script(1).
    let cat = must(&format!("script -qec 'asciinema cat {d}/export-{}.cast' /dev/null < /dev/null", ids[0]));
    assert!(cat.contains("typed-42"), "asciinema cat: {cat}");

    // The trail at control: filters by user, login, session.
    let evs = lab.control_events(&format!("--user alice --login root --session {}", &ids[0][..8]));
    let kinds: Vec<&str> = evs.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"session_start") && kinds.contains(&"session_end"), "{kinds:?}");
    assert!(evs.iter().all(|e| e["node"] == "vps" && e["caller"]["user"] == "alice"), "{evs:?}");
    assert!(lab.control_events("--user bob").is_empty());
    let v = lab.admin_json("audit verify");
    assert_eq!(v["ok"], true, "{v}");
    // The stored recording is compressed; the node's spool cursor moved past it.
    let gz = must(&format!("ls {d}/ctl/recordings/*/"));
    assert!(gz.contains(&format!("{}.cast.gz", ids[0])), "{gz}");
    assert!(std::path::Path::new(&format!("{d}/vps/recordings/{}.cast.shipped", ids[0])).exists());
    let mode = must(&format!("stat -c %a {d}/vps/ship.json"));
    assert_eq!(mode.trim(), "600");
}

#[test]
fn nothing_is_lost_when_control_or_the_node_dies_mid_session() {
    if !is_root() || !require(&["ssh"]) {
        eprintln!("SKIPPED: needs root and ssh");
        return;
    }
    let mut lab = Lab::new("ak", "10.97.42", "true", "");
    let d = lab.d();
    lab.ssh_ok("true");
    lab.w.wait_direct(30);
    // 1. Control killed (SIGKILL: the connection drops mid-recording) while
    //    a recorded session prints; another session runs while it is down.
    let mut long = lab.w.laptop.spawn(
        &format!("env TAILGATE_STATE_DIR={d}/laptop {} root@vps 'for i in $(seq 1 30); do echo line-$i; sleep 0.1; done'", lab.ssh),
        &lab.w.dir.path().join("long.log"),
    );
    long.wait_log("line-3", 20);
    lab.kill_control();
    long.wait_log("line-30", 20);
    lab.ssh_ok("echo while-control-is-down");
    lab.restart_control("", 2);
    lab.wait_all_events_shipped();
    lab.wait_recordings_identical();

    // 2. The node restarts mid-session: the partial recording still arrives
    //    whole, and the chain goes on where it was.
    let mut long = lab.w.laptop.spawn(
        &format!("env TAILGATE_STATE_DIR={d}/laptop {} root@vps 'for i in $(seq 1 100); do echo more-$i; sleep 0.1; done'", lab.ssh),
        &lab.w.dir.path().join("long2.log"),
    );
    long.wait_log("more-5", 20);
    if let Some(mut p) = lab.vps.take() {
        p.kill();
    }
    long.kill();
    lab.vps = Some(lab.w.start_node(&lab.w.vps, "vps", "", 2));
    lab.ssh_ok("echo after-node-restart");
    lab.wait_all_events_shipped();
    lab.wait_recordings_identical();
    let v = lab.admin_json("audit verify");
    assert_eq!(v["ok"], true, "{v}");
    // Every event exactly once at control.
    let evs = lab.control_events("");
    let mut ids: Vec<u64> = evs.iter().filter_map(|e| e["id"].as_u64()).collect();
    let n = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), n, "no event stored twice");
    assert_eq!(ids, (1..=n as u64).collect::<Vec<_>>());
}

/// Rewrites `from` to `to` (same length) in place, in the first unshipped line containing `from`.
fn edit_in_place(path: &str, from: &str, to: &str) {
    assert_eq!(from.len(), to.len());
    let text = std::fs::read_to_string(path).unwrap();
    let at = text.rfind(from).unwrap_or_else(|| panic!("{from} not in {path}"));
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(to.as_bytes(), at as u64).unwrap();
}

#[test]
fn an_edited_or_truncated_spool_is_detected() {
    if !is_root() || !require(&["ssh"]) {
        eprintln!("SKIPPED: needs root and ssh");
        return;
    }
    let mut lab = Lab::new("at", "10.97.43", "true", "");
    let d = lab.d();
    lab.ssh_ok("true");
    lab.wait_all_events_shipped();
    // Edited before shipping: a login rewritten in the spool.
    lab.kill_control();
    lab.ssh_ok("echo one");
    lab.ssh_ok("echo two");
    edit_in_place(&format!("{d}/vps/audit.jsonl"), "\"command\":\"echo one\"", "\"command\":\"echo uno\"");
    lab.restart_control("", 2);
    lab.wait_all_events_shipped();
    let out = lab.w.ctl.run(&format!("{TAILGATE} control --state-dir {d}/ctl audit verify"), 20);
    assert_ne!(out.0, 0, "verify must fail: {out:?}");
    assert!(out.1.contains("vps") && out.1.contains("break"), "{out:?}");

    // Truncated before shipping: the last lines cut off the spool.
    lab.kill_control();
    let path = format!("{d}/vps/audit.jsonl");
    let before = std::fs::metadata(&path).unwrap().len();
    lab.ssh_ok("echo three");
    must(&format!("truncate -s {before} {path}"));
    lab.ssh_ok("echo four");
    lab.restart_control("", 3);
    lab.wait_all_events_shipped();
    let (code, text, _) = lab.w.ctl.run(&format!("{TAILGATE} control --state-dir {d}/ctl --json audit verify --node vps"), 20);
    assert_ne!(code, 0, "verify exits non-zero on a broken chain");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["ok"], false);
    assert!(text.contains("\"gap\""), "{text}");
    // The server recorded them as audit events of its own, too.
    let admin = lab.w.admin("audit admin --limit 100");
    assert!(admin.contains("audit.gap") && admin.contains("audit.break"), "{admin}");
}

#[test]
fn record_required_fails_closed_without_control() {
    if !is_root() || !require(&["ssh"]) {
        eprintln!("SKIPPED: needs root and ssh");
        return;
    }
    let mut lab = Lab::new("aq", "10.97.44", "\"required\"", "");
    assert_eq!(lab.ssh_ok("echo recorded-for-sure").trim(), "recorded-for-sure");
    lab.w.wait_direct(30);
    lab.kill_control();
    let mut r = (0, String::new(), String::new());
    let refused = eventually(20, || {
        r = lab.w.on_laptop(&format!("{} root@vps echo should-not-run", lab.ssh), 20);
        r.0 != 0 && r.2.contains("must be recorded on the control server")
    });
    assert!(refused, "{r:?}");
    assert!(!r.1.contains("should-not-run"));
    lab.restart_control("", 2);
    lab.ssh_ok("true");
    lab.wait_all_events_shipped();
    let denied = lab.control_events("").into_iter().filter(|e| e["event"] == "session_denied").count();
    assert!(denied >= 1, "the refusal is audited");

    // Control goes away mid-session and the spool (1 MiB here) fills: the
    // session ends with a message instead of running unrecorded.
    let d = lab.d();
    if let Some(mut p) = lab.vps.take() {
        p.kill();
    }
    let mut vps = lab.w.vps.spawn(
        &format!("env RUST_LOG=tailgate=info TAILGATE_SPOOL_LIMIT_MB=1 {TAILGATE} up --state-dir {d}/vps --hostname vps"),
        &lab.w.dir.path().join("vps-small-spool.log"),
    );
    vps.wait_log("tailgate: up at", 15);
    lab.vps = Some(vps);
    lab.ssh_ok("true");
    // Over the relay, killing control would cut the session itself.
    lab.w.wait_direct(30);
    let mut long = lab.w.laptop.spawn(
        &format!(
            "env TAILGATE_STATE_DIR={d}/laptop {} root@vps 'echo started; sleep 3; head -c 4000000 /dev/zero | tr \\0 x | fold -w 100; echo END'",
            lab.ssh
        ),
        &lab.w.dir.path().join("spoolfull.log"),
    );
    long.wait_log("started", 20);
    lab.kill_control();
    long.wait_log("must be recorded", 30);
    let log = long.log_text();
    assert!(!log.contains("END"), "the session was ended before its end");
    assert!(lab.vps.as_ref().unwrap().log_text().contains("audit spool full"), "a clear log line on the node");
}

#[test]
fn retention_prunes_events_and_recordings() {
    if !is_root() || !require(&["ssh"]) {
        eprintln!("SKIPPED: needs root and ssh");
        return;
    }
    let lab = Lab::new("ar", "10.97.45", "true", "--retention 5s");
    lab.ssh_ok("echo soon-gone");
    let d = lab.d();
    // Control acknowledged the whole recording (the node marks it), so what
    // disappears next was stored and then pruned.
    let shipped = eventually(60, || !must(&format!("find {d}/vps/recordings -name '*.cast.shipped'")).trim().is_empty());
    assert!(shipped, "the recording reached control");
    let gone = eventually(30, || {
        lab.admin_json("recordings list").as_array().unwrap().is_empty()
            && lab.control_events("").is_empty()
            && must(&format!("find {d}/ctl/recordings -name '*.cast*'")).trim().is_empty()
    });
    assert!(gone, "events and recordings older than 5s are pruned");
    // The node keeps its own copy.
    assert!(!lab.local_events().is_empty());
}

/// Every wire form of recording chunks reaches control whole: a node that
/// ships them as JSON (as nodes did before binary chunks, and as a node
/// does to a control server too old to take them: it never says
/// `binary_chunks`), then the same node shipping plain binary frames (as
/// before gzip chunks), then gzip members.
#[test]
fn json_and_binary_recording_chunks_both_arrive_whole() {
    if !is_root() || !require(&["ssh"]) {
        eprintln!("SKIPPED: needs root and ssh");
        return;
    }
    let mut lab = Lab::new("aj", "10.97.44", "true", "");
    let d = lab.d();
    let restart_vps = |lab: &mut Lab, env: &str, n: u32| {
        if let Some(mut p) = lab.vps.take() {
            p.kill();
        }
        let mut p = lab.w.vps.spawn(
            &format!("env RUST_LOG=tailgate=info {env} {TAILGATE} up --state-dir {d}/vps --hostname vps"),
            &lab.w.dir.path().join(format!("vps{n}.log")),
        );
        p.wait_log("tailgate: up at", 15);
        lab.vps = Some(p);
    };
    restart_vps(&mut lab, "TAILGATE_SHIP_JSON_CHUNKS=1", 2);
    // Several chunks of either size, with bytes JSON must escape.
    lab.ssh_ok("for i in $(seq 1 3000); do printf 'json-%d \\t \"q\" \\\\ é\\n' $i; done");
    lab.wait_recordings_identical();
    // A recording the JSON node could not ship (control was down while it
    // ran; it may ship part once control is back), finished by the same
    // node restarted with binary frames, which finds it in its start scan.
    lab.w.wait_direct(30);
    lab.kill_control();
    lab.ssh_ok("for i in $(seq 1 3000); do printf 'half-%d \\t \"q\"\\n' $i; done");
    lab.restart_control("", 2);
    restart_vps(&mut lab, "TAILGATE_SHIP_PLAIN_CHUNKS=1", 3);
    lab.ssh_ok("for i in $(seq 1 3000); do printf 'binary-%d \\t \"q\"\\n' $i; done");
    lab.wait_recordings_identical();
    restart_vps(&mut lab, "", 4);
    // Enough to fill several gzip chunks of 1 MiB each.
    lab.ssh_ok("for i in $(seq 1 200000); do printf 'gzip-%d \\t \"q\" é\\n' $i; done");
    let ids = lab.wait_recordings_identical();
    assert_eq!(ids.len(), 4, "{ids:?}");
    let gz = must(&format!("find {d}/ctl/recordings -name '*.cast.gz'"));
    assert_eq!(gz.lines().count(), 4, "{gz}");
    let v = lab.admin_json("audit verify");
    assert_eq!(v["ok"], true, "{v}");
}

/// A frame limit below what nodes put in one frame (a full recording chunk,
/// an audit batch) is refused when control starts, saying what to do,
/// instead of refusing those frames from every node later.
#[tokio::test]
async fn a_frame_limit_below_a_full_chunk_is_refused_at_start() {
    use tailgate::control::{ControlServer, ServerOptions};
    let dir = tempfile::tempdir().unwrap();
    let mut o = ServerOptions::new("127.0.0.1:0".parse().unwrap(), dir.path());
    o.max_client_frame = 32 * 1024;
    let e = ControlServer::start(o).await.err().expect("a 32 KiB frame limit is refused");
    let msg = format!("{e:#}");
    assert!(msg.contains("max_client_frame is 32768 bytes") && msg.contains("use at least 65536"), "{msg}");
    let mut o = ServerOptions::new("127.0.0.1:0".parse().unwrap(), dir.path());
    o.max_client_frame = 64 * 1024;
    let s = ControlServer::start(o).await.expect("64 KiB starts");
    drop(s);
}
