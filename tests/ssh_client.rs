//! `tailgate ssh` as a newcomer uses it, on a control-mode tailnet (control,
//! a "vps" and a "laptop" in namespaces): OpenSSH's own options pass
//! through, a typo gets a suggestion, and `tailgate status` shows an idle
//! peer as online.
mod common;
use common::*;

/// alice may log in to prod as root and reach port 9080 there (the `-L`
/// target); nobody else.
const POLICY: &str = r#"
[tag_owners]
"tag:prod" = ["alice"]

[[acl]]
src = ["alice"]
dst = ["tag:prod:9080"]

[[ssh]]
src = ["alice"]
dst = ["tag:prod"]
users = ["root"]
action = "accept"
"#;

#[test]
fn ssh_options_typos_and_status_on_a_tailnet() {
    if !require(&["ssh", "socat"]) {
        return;
    }
    let w = ControlLab::new("sc", "10.91.0");
    let d = w.d();
    std::fs::write(format!("{d}/policy.toml"), POLICY).unwrap();
    let _control = w.start_control(&format!("{d}/policy.toml"), 1);
    w.admin("users add alice");
    let server_key = w.authkey("--tag tag:prod");
    let laptop_key = w.authkey("--user alice");
    let _vps = w.start_node(&w.vps, "vps", &format!("--authkey {server_key}"), 1);
    let mut laptop = w.start_node(&w.laptop, "laptop", &format!("--authkey {laptop_key} --no-ssh"), 1);

    // Before any SSH traffic: control says vps is online, and the nodes
    // greeted each other with a handshake when they saw each other online
    // (shown in its own column), so the first login does not wait for one.
    let mut out = String::new();
    assert!(
        eventually(15, || {
            out = w.on_laptop(&format!("{TAILGATE} status"), 10).1;
            out.lines().any(|l| l.starts_with("vps ") && !l.contains("never"))
        }),
        "the greeting handshake shows in status:\n{out}"
    );
    let vps_line = out.lines().find(|l| l.starts_with("vps ")).unwrap().to_string();
    let cols: Vec<&str> = vps_line.split_whitespace().collect();
    assert_eq!(cols[3], "yes", "an idle peer that control reports online is online:\n{out}");
    assert!(vps_line.contains(" ago"), "the handshake, in its own column:\n{out}");
    assert!(out.contains("LAST HANDSHAKE"), "{out}");
    let (_, json, _) = w.on_laptop(&format!("{TAILGATE} status --json"), 10);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let vps = v["peers"].as_array().unwrap().iter().find(|p| p["name"] == "vps").unwrap();
    assert_eq!(vps["online"], true, "{json}");
    assert!(vps["last_handshake_secs_ago"].is_u64(), "{json}");

    // A typo: swapped letters suggest the real name.
    let (code, _, err) = w.on_laptop(&format!("{TAILGATE} ssh root@vsp true"), 10);
    assert_ne!(code, 0);
    assert!(err.contains("unknown host \"vsp\"; did you mean vps?"), "{err}");

    // -o reaches ssh: User=nobody is refused by the policy, root works.
    let mut r = (0, String::new(), String::new());
    assert!(
        eventually(20, || {
            r = w.on_laptop(&format!("{TAILGATE} ssh -o BatchMode=yes -o User=root vps id -un"), 20);
            r.0 == 0
        }),
        "{r:?}"
    );
    assert_eq!(r.1.trim(), "root");
    let (code, _, err) = w.on_laptop(&format!("{TAILGATE} ssh -o User=nobody vps true"), 20);
    assert_ne!(code, 0);
    assert!(err.contains("denied"), "-o User=nobody must reach ssh: {err}");

    // -t (twice, clustered, since stdin is no terminal): a pty on the far side.
    let (code, out, err) = w.on_laptop(&format!("{TAILGATE} ssh -tt -v root@vps tty"), 20);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("/dev/pts/"), "-tt gives a pty: {out}");
    assert!(err.contains("debug1:"), "-v is ssh's, not tailgate's: {err}");

    // -L with -N: a port forward through our SSH server to a service on vps.
    let _web =
        w.vps.spawn("socat TCP-LISTEN:9080,bind=127.0.0.1,reuseaddr,fork SYSTEM:'echo hello-from-vps'", &w.dir.path().join("web.log"));
    let fwd = w.laptop.spawn(
        &format!(
            "env TAILGATE_STATE_DIR={d}/laptop {TAILGATE} ssh -N -L 127.0.0.1:18080:127.0.0.1:9080 -o ExitOnForwardFailure=yes root@vps"
        ),
        &w.dir.path().join("fwd.log"),
    );
    let mut got = String::new();
    assert!(
        eventually(20, || {
            got = w.laptop.run("socat -T 5 - TCP:127.0.0.1:18080 </dev/null", 10).1;
            got.contains("hello-from-vps")
        }),
        "fetch through -L: {got:?}\nforward log: {}",
        fwd.log_text()
    );

    // Options the tailnet makes meaningless are refused with the reason.
    for bad in ["-J jump root@vps", "-o ProxyCommand=nc root@vps", "-o ProxyJump=x root@vps"] {
        let (code, _, err) = w.on_laptop(&format!("{TAILGATE} ssh {bad} true"), 10);
        assert_ne!(code, 0, "{bad}");
        assert!(err.contains("meaningless here") && err.contains("tailnet"), "{bad}: {err}");
    }

    // vps goes away: control reports it offline.
    drop(_vps);
    assert!(
        eventually(60, || {
            let out = w.on_laptop(&format!("{TAILGATE} status"), 10).1;
            out.lines().find(|l| l.starts_with("vps ")).is_some_and(|l| l.split_whitespace().nth(3) == Some("no"))
        }),
        "vps offline in status:\n{}",
        laptop.log_text()
    );
    laptop.kill();
}
