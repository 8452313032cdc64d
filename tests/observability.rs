//! Metrics and logs (issue 14) in a namespace lab: control and a "vps"
//! node export Prometheus metrics that `promtool check metrics` accepts and
//! that reflect a real join and SSH session; a real Prometheus scrapes both;
//! `--log-format json` writes one JSON object per line, and debug logs of a
//! full join + SSH session hold no secret (auth key, node or server key).

mod common;
use common::*;

/// The value of the first sample line starting with `prefix` (name and labels).
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

fn promtool_ok(ns: &Netns, url: &str, d: &str, name: &str) -> String {
    let file = format!("{d}/{name}.prom");
    ns.exec(&format!("curl -sSf {url} > {file}"));
    let (code, out, err) = run_timeout(&format!("promtool check metrics < {file}"), 20);
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(code, 0, "promtool check metrics on {name}: {out}{err}\n{text}");
    text
}

#[test]
fn metrics_validate_and_scrape_and_json_logs_hold_no_secrets() {
    if !require(&["ssh", "curl", "promtool", "prometheus"]) {
        return;
    }
    let w = ControlLab::new("ob", "10.98.0");
    let d = w.d();
    std::fs::write(format!("{d}/policy.toml"), ADMINS_ROOT_POLICY).unwrap();
    let mut ctl = w.ctl.spawn(
        &format!(
            "env RUST_LOG=debug {TAILGATE} --log-format json control --state-dir {d}/ctl --listen 10.98.0.1:8443 \
             --policy {d}/policy.toml --metrics-listen 10.98.0.1:9100 2>{d}/ctl.err"
        ),
        &w.dir.path().join("ctl.log"),
    );
    ctl.wait_log("listening on", 15);
    w.admin("users add alice");
    let vps_token = w.authkey("--tag tag:prod");
    let laptop_token = w.authkey("--user alice");
    let mut vps = w.vps.spawn(
        &format!(
            "env RUST_LOG=debug {TAILGATE} up --log-format json --state-dir {d}/vps --hostname vps --authkey {vps_token} \
             --metrics-listen 127.0.0.1:9101 2>{d}/vps.err"
        ),
        &w.dir.path().join("vps.log"),
    );
    vps.wait_log("tailgate: up at", 15);
    let _laptop = w.start_node(&w.laptop, "laptop", &format!("--authkey {laptop_token} --no-ssh"), 1);
    let mut r = (0, String::new(), String::new());
    assert!(
        eventually(20, || {
            r = w.on_laptop(&format!("{TAILGATE} ssh root@vps echo hi"), 20);
            r.0 == 0
        }),
        "ssh: {r:?}"
    );
    let (code, _, _) = w.on_laptop(&format!("{TAILGATE} ssh nobody@vps true"), 20);
    assert_ne!(code, 0, "a denied login, for the denial counter");

    // The first login may have gone through the relay while the direct
    // path was being proven; the path gauge below wants the direct one.
    w.wait_direct(30);
    // Both outputs pass promtool and reflect what happened.
    let ctl_m = promtool_ok(&w.ctl, "http://10.98.0.1:9100/metrics", &d, "control");
    assert_eq!(sample(&ctl_m, "tailgate_control_nodes "), Some(2.0), "{ctl_m}");
    assert_eq!(sample(&ctl_m, "tailgate_control_nodes_online "), Some(2.0), "{ctl_m}");
    assert_eq!(sample(&ctl_m, "tailgate_control_registrations_total "), Some(2.0), "{ctl_m}");
    assert!(sample(&ctl_m, "tailgate_control_map_sends_total{kind=\"full\"}").unwrap_or(0.0) >= 2.0, "{ctl_m}");
    assert!(sample(&ctl_m, "tailgate_control_map_sent_bytes_total ").unwrap_or(0.0) > 0.0, "{ctl_m}");
    assert!(sample(&ctl_m, "tailgate_control_relay_forwarded_bytes_total ").is_some(), "{ctl_m}");
    let node_m = promtool_ok(&w.vps, "http://127.0.0.1:9101/metrics", &d, "node");
    assert!(sample(&node_m, "tailgate_node_handshakes_total{peer=\"laptop\"}").unwrap_or(0.0) >= 1.0, "{node_m}");
    assert!(sample(&node_m, "tailgate_node_received_bytes_total{peer=\"laptop\"}").unwrap_or(0.0) > 0.0, "{node_m}");
    assert!(node_m.contains("tailgate_node_peer_path{peer=\"laptop\",path=\"direct\"} 1"), "{node_m}");
    assert!(sample(&node_m, "tailgate_node_ssh_sessions_total ").unwrap_or(0.0) >= 1.0, "{node_m}");
    assert!(node_m.lines().any(|l| l.starts_with("tailgate_node_ssh_denials_total{reason=\"login")), "{node_m}");
    // Node metrics are only on loopback: the laptop cannot read them.
    let (code, _, _) = w.laptop.run("curl -sSf --max-time 3 http://10.98.0.2:9101/metrics", 10);
    assert_ne!(code, 0);

    // A real Prometheus (in the vps namespace) scrapes both once.
    std::fs::write(
        format!("{d}/prometheus.yml"),
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: control\n    static_configs:\n      - targets: ['10.98.0.1:9100']\n  \
         - job_name: node\n    static_configs:\n      - targets: ['127.0.0.1:9101']\n",
    )
    .unwrap();
    let _prom = w.vps.spawn(
        &format!(
            "prometheus --config.file={d}/prometheus.yml --storage.tsdb.path={d}/tsdb --web.listen-address=127.0.0.1:9190 \
             --log.level=warn"
        ),
        &w.dir.path().join("prometheus.log"),
    );
    let mut up = String::new();
    let both_up = eventually(60, || {
        up = w.vps.run("curl -sS 'http://127.0.0.1:9190/api/v1/query?query=up'", 10).1;
        let v: serde_json::Value = serde_json::from_str(&up).unwrap_or_default();
        let ups: Vec<(String, String)> = v["data"]["result"]
            .as_array()
            .map(|a| {
                a.iter().map(|r| (r["metric"]["job"].as_str().unwrap_or("").into(), r["value"][1].as_str().unwrap_or("").into())).collect()
            })
            .unwrap_or_default();
        ups.contains(&("control".into(), "1".into())) && ups.contains(&("node".into(), "1".into()))
    });
    assert!(both_up, "prometheus must see up == 1 on both targets: {up}");

    // JSON logs: every stderr line is one JSON object with level and message.
    for name in ["ctl", "vps"] {
        let text = std::fs::read_to_string(format!("{d}/{name}.err")).unwrap();
        assert!(text.lines().count() >= 3, "{name}: debug logs expected:\n{text}");
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{name}: not JSON ({e}): {line}"));
            assert!(v["level"].is_string() && v["timestamp"].is_string() && v.get("message").is_some(), "{name}: {line}");
        }
    }

    // No secret in any log of the join and the session.
    let mut secrets = vec![vps_token.clone(), laptop_token.clone()];
    for t in [&vps_token, &laptop_token] {
        secrets.push(tailgate::control::AuthKeyToken::parse(t).unwrap().secret);
    }
    for key in ["vps/node.key", "laptop/node.key", "ctl/server.key"] {
        secrets.push(std::fs::read_to_string(format!("{d}/{key}")).unwrap().trim().to_string());
    }
    let logs: Vec<String> = ["ctl.err", "ctl.log", "vps.err", "vps.log", "laptop1.log"]
        .iter()
        .map(|f| std::fs::read_to_string(format!("{d}/{f}")).unwrap_or_default())
        .collect();
    for s in &secrets {
        assert!(s.len() >= 16);
        for (i, l) in logs.iter().enumerate() {
            assert!(!l.contains(s.as_str()), "log {i} holds a secret ({}...)", &s[..6]);
        }
    }
}
