//! Private keys never reach a log, even at trace level: control, a "vps"
//! node and a "laptop" node, each its own `tailgate` process in its own
//! namespace with `RUST_LOG=trace`, join, find a direct path and log in
//! over SSH; then every log is searched for each private key read from the
//! state directories, in every encoding a careless `{:?}`/`{}` would print.

mod common;
use common::*;

use base64::Engine;

/// The forms of `key` a log line could carry: base64 (standard, unpadded,
/// URL-safe), hex (both cases), Rust's `{:?}` of the byte array, and the
/// raw bytes. Each is cut to a prefix long enough (12+ bytes of key) that a
/// match cannot be chance, and short enough to catch a truncated print.
fn forms(key: &[u8; 32]) -> Vec<(String, Vec<u8>)> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    let b64 = STANDARD.encode(key);
    let url = URL_SAFE_NO_PAD.encode(key);
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let debug = format!("{:?}", &key[..12]);
    let debug = debug.trim_end_matches(']').to_string();
    vec![
        ("base64".into(), b64.as_bytes()[..16].to_vec()),
        ("base64 tail".into(), b64.as_bytes()[16..40].to_vec()),
        ("base64url".into(), url.as_bytes()[..16].to_vec()),
        ("hex".into(), hex.as_bytes()[..24].to_vec()),
        ("HEX".into(), hex[..24].to_uppercase().into_bytes()),
        ("hex tail".into(), hex.as_bytes()[40..].to_vec()),
        ("debug bytes".into(), debug.into_bytes()),
        ("raw".into(), key[..12].to_vec()),
    ]
}

fn read_key(path: &str) -> [u8; 32] {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let bytes = base64::engine::general_purpose::STANDARD.decode(text.trim()).unwrap();
    bytes.try_into().unwrap_or_else(|_| panic!("{path}: not 32 bytes"))
}

#[test]
fn trace_logs_of_control_and_nodes_carry_no_private_key() {
    if !is_root() {
        skip("needs root for network namespaces");
        return;
    }
    if !require(&["ssh"]) {
        return;
    }
    rm_pyenv_lock();
    let w = ControlLab::new("ks", "10.97.3");
    let d = w.d();
    std::fs::write(format!("{d}/policy.toml"), ADMINS_ROOT_POLICY).unwrap();

    let mut control = w.ctl.spawn(
        &format!("env RUST_LOG=trace {TAILGATE} control --state-dir {d}/ctl --listen 10.97.3.1:8443 --policy {d}/policy.toml"),
        &w.dir.path().join("ctl.log"),
    );
    control.wait_log("listening on", 15);
    w.admin("users add alice");
    let server_key = w.authkey("--tag tag:prod");
    let laptop_key = w.authkey("--user alice");

    let mut vps = w.vps.spawn(
        &format!("env RUST_LOG=trace {TAILGATE} up --authkey {server_key} --state-dir {d}/vps --hostname vps"),
        &w.dir.path().join("vps.log"),
    );
    vps.wait_log("tailgate: up at", 15);
    let mut laptop = w.laptop.spawn(
        &format!("env RUST_LOG=trace {TAILGATE} up --authkey {laptop_key} --state-dir {d}/laptop --hostname laptop --no-ssh"),
        &w.dir.path().join("laptop.log"),
    );
    laptop.wait_log("tailgate: up at", 15);

    // A login (control Noise + relay Noise + WireGuard handshakes + disco)
    // and a direct path (disco pings and pongs both ways).
    let mut r = (0, String::new(), String::new());
    assert!(
        eventually(30, || {
            r = w.on_laptop(&format!("{TAILGATE} ssh root@vps id -u"), 20);
            r.0 == 0
        }),
        "tailgate ssh root@vps: {r:?}\nvps log tail:\n{}",
        tail(&vps.log_text())
    );
    w.wait_direct(30);
    let (code, out, err) = w.on_laptop(&format!("{TAILGATE} ssh root@vps echo over-direct"), 20);
    assert_eq!((code, out.trim()), (0, "over-direct"), "{err}");
    let (_, status, _) = w.on_laptop(&format!("{TAILGATE} status"), 10);

    // Stop everything so the logs are complete.
    laptop.kill();
    vps.kill();
    control.kill();

    let keys = [
        ("control server.key", read_key(&format!("{d}/ctl/server.key"))),
        ("vps node.key", read_key(&format!("{d}/vps/node.key"))),
        ("laptop node.key", read_key(&format!("{d}/laptop/node.key"))),
    ];
    let logs: Vec<(&str, Vec<u8>)> = ["ctl.log", "vps.log", "laptop.log"]
        .into_iter()
        .map(|n| (n, std::fs::read(w.dir.path().join(n)).unwrap()))
        .chain([("tailgate status", status.into_bytes()), ("ssh stderr", err.into_bytes())])
        .collect();
    // The test means something only if the logs are trace logs that talk
    // about the keys' owners: each node's public key appears in short form.
    // (Control emits no trace events of its own; its debug lines show the
    // filter is open.)
    for (name, log) in &logs[..3] {
        let text = String::from_utf8_lossy(log);
        assert!(text.contains("DEBUG"), "{name} is not a verbose log:\n{}", tail(&text));
    }
    assert!(logs[1..3].iter().all(|(_, l)| String::from_utf8_lossy(l).contains("TRACE")), "the nodes did not log at trace level");
    let vps_short = format!("[{}]", &public_b64(&keys[1].1)[..8]);
    assert!(
        String::from_utf8_lossy(&logs[2].1).contains(&vps_short),
        "the laptop's trace log never names the vps {vps_short}; the check below would prove little"
    );
    for (key_name, key) in &keys {
        for (form, needle) in forms(key) {
            for (log_name, log) in &logs {
                assert!(
                    !log.windows(needle.len()).any(|w| w == needle.as_slice()),
                    "{log_name} contains the {key_name} private key ({form} form)"
                );
            }
        }
    }
}

fn public_b64(private: &[u8; 32]) -> String {
    let out = must(&format!("echo {} | {TAILGATE} pubkey", base64::engine::general_purpose::STANDARD.encode(private)));
    out.trim().to_string()
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// A stale pyenv shim lock makes root logins hang for a minute.
fn rm_pyenv_lock() {
    let _ = std::fs::remove_file("/root/.pyenv/shims/.pyenv-shim");
}
