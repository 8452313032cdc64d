//! TLS on the control port (issue 14): a test CA made here with rcgen,
//! control serving `--tls-cert/--tls-key`, nodes pinning the CA with
//! `--control-ca`. In process: control client, relay client, wrong CA,
//! plain HTTP against TLS. In namespaces: the real binary joins, maps,
//! relays and carries `tailgate ssh`, and curl (a browser stand-in) reads
//! `/tailgate/health`.

#[path = "common/certs.rs"]
mod certs;
mod common;
#[path = "control_util.rs"]
mod util;

use std::path::Path;

use certs::make_certs;
use common::*;
use tailgate::control::server::tls::TlsSource;
use tailgate::control::{ControlError, ControlServer, ControlTarget};
use tailgate::dataplane::wg;
use tailgate::relay::RelayClient;
use tailgate::relay::client::RelayClientOptions;

async fn tls_server(dir: &Path) -> (ControlServer, String) {
    let ca = make_certs(dir, "srv", &["127.0.0.1"]);
    let mut o = util::options(&dir.join("ctl"));
    o.tls = Some(TlsSource::Files { cert: dir.join("srv-cert.pem"), key: dir.join("srv-key.pem") });
    (ControlServer::start(o).await.expect("TLS server starts"), ca)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_and_relay_clients_work_through_tls_with_a_pinned_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (s, ca) = tls_server(dir.path()).await;
    assert!(s.url().starts_with("https://127.0.0.1:"), "{}", s.url());
    util::setup_users(&s, &["alice"]).await;
    let token = util::make_key(&s, Some("alice"), &[], true, false).await;
    assert!(token.url.starts_with("https://"), "tokens carry the https URL: {}", token.url);

    // Join and see each other (map over TLS).
    let mut target = ControlTarget::from(&token);
    target.ca_pem = Some(ca.clone());
    let join = |name: &'static str| {
        let (target, token) = (target.clone(), token.clone());
        async move {
            let key = wg::generate_private_key();
            let (client, map) =
                tailgate::control::ControlClient::connect(&target, &key, util::hello(&token, name)).await.expect("join over TLS");
            util::Node { key, client, map }
        }
    };
    let a = join("a").await;
    let mut b = join("b").await;
    b.wait_for("a in b's map", |m| m.peers.values().any(|p| p.name == "a")).await;

    // The relay on the same TLS port.
    let opts = || RelayClientOptions { ca_pem: Some(ca.clone()), ..Default::default() };
    let (ta, _ra) = RelayClient::connect_with(s.url(), &s.public_key(), &a.key, opts()).await.expect("relay a over TLS");
    let (_tb, mut rb) = RelayClient::connect_with(s.url(), &s.public_key(), &b.key, opts()).await.expect("relay b over TLS");
    // b's relay session is registered once the server has authorized it,
    // which may be just after connect returns: resend until one arrives.
    let mut got = None;
    for _ in 0..20 {
        ta.send(&wg::public_key_of(&b.key), b"through tls").unwrap();
        if let Ok(r) = tokio::time::timeout(std::time::Duration::from_millis(500), rb.recv()).await {
            got = Some(r.expect("alive"));
            break;
        }
    }
    let (src, d) = got.expect("a datagram relayed over TLS within 10 s");
    assert_eq!((src, d.as_slice()), (wg::public_key_of(&a.key), &b"through tls"[..]));

    // Certificate files replaced in place (as certbot does): new
    // connections get the new certificate without a restart.
    let new_ca = make_certs(dir.path(), "srv", &["127.0.0.1"]);
    let mut renewed = target.clone();
    renewed.ca_pem = Some(new_ca);
    assert!(
        common::eventually(30, || {
            let (t, tok) = (renewed.clone(), token.clone());
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async move {
                    tailgate::control::ControlClient::connect(&t, &wg::generate_private_key(), util::hello(&tok, "r")).await.is_ok()
                })
            })
        }),
        "the replaced certificate must be served"
    );

    // The Noise pin still applies inside TLS.
    let mut wrong = renewed.clone();
    wrong.server_public = wg::public_key_of(&wg::generate_private_key());
    match tailgate::control::ControlClient::connect(&wrong, &wg::generate_private_key(), util::hello(&token, "c")).await {
        Err(ControlError::WrongServerKey { .. }) => {}
        other => panic!("a wrong Noise key inside TLS must be refused: {:?}", other.map(|_| ())),
    }
    s.shutdown().await;
}

#[tokio::test]
async fn a_node_with_the_wrong_ca_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _ca) = tls_server(dir.path()).await;
    util::setup_users(&s, &["alice"]).await;
    let token = util::make_key(&s, Some("alice"), &[], true, false).await;
    let other_ca = make_certs(dir.path(), "other", &["127.0.0.1"]);
    let mut target = ControlTarget::from(&token);
    target.ca_pem = Some(other_ca.clone());
    let e = match tailgate::control::ControlClient::connect(&target, &wg::generate_private_key(), util::hello(&token, "x")).await {
        Err(e) => e,
        Ok(_) => panic!("a certificate from another CA must be refused"),
    };
    let msg = e.to_string();
    assert!(matches!(e, ControlError::Tls(_)), "{e:?}");
    assert!(!e.is_transient(), "a person has to fix this: {msg}");
    assert!(msg.contains("TLS with https://127.0.0.1") && msg.contains("--control-ca") && msg.contains("certificate"), "{msg}");
    // The relay refuses the same way.
    let opts = RelayClientOptions { ca_pem: Some(other_ca), ..Default::default() };
    let e = RelayClient::connect_with(s.url(), &s.public_key(), &wg::generate_private_key(), opts).await.err().expect("refused");
    assert!(e.to_string().contains("--control-ca"), "{e}");

    // No CA given: the system roots do not know the test CA either.
    target.ca_pem = None;
    let e = tailgate::control::ControlClient::connect(&target, &wg::generate_private_key(), util::hello(&token, "y"))
        .await
        .err()
        .expect("refused");
    assert!(matches!(e, ControlError::Tls(_)), "{e:?}");

    // A plain-HTTP client talking to the TLS port gets no upgrade.
    target.url = s.url().replace("https://", "http://");
    let e = tailgate::control::ControlClient::connect(&target, &wg::generate_private_key(), util::hello(&token, "z"))
        .await
        .err()
        .expect("refused");
    assert!(!matches!(e, ControlError::WrongServerKey { .. }), "{e:?}");
    s.shutdown().await;
}

#[test]
fn tailnet_over_tls_join_map_relay_ssh() {
    if !require(&["ssh", "curl", "nft"]) {
        return;
    }
    let w = ControlLab::new("tl", "10.97.0");
    let d = w.d();
    std::fs::write(format!("{d}/policy.toml"), ADMINS_ROOT_POLICY).unwrap();
    make_certs(w.dir.path(), "ctl", &["10.97.0.1"]);
    make_certs(w.dir.path(), "wrong", &["10.97.0.1"]);
    let mut ctl = w.ctl.spawn(
        &format!(
            "{TAILGATE} control --state-dir {d}/ctl --listen 10.97.0.1:8443 --policy {d}/policy.toml \
             --tls-cert {d}/ctl-cert.pem --tls-key {d}/ctl-key.pem"
        ),
        &w.dir.path().join("ctl.log"),
    );
    ctl.wait_log("listening on", 15);
    assert!(ctl.log_text().contains("URL:               https://10.97.0.1:8443"), "{}", ctl.log_text());
    w.admin("users add alice");
    let vps_key = w.authkey("--tag tag:prod");
    let laptop_key = w.authkey("--user alice --reusable");

    // A browser (curl) sees the health page over TLS with the CA, and refuses without it.
    let (code, out, err) = w.laptop.run(&format!("curl -sS --cacert {d}/ctl-ca.pem https://10.97.0.1:8443/tailgate/health"), 10);
    assert_eq!((code, out.trim()), (0, "ok"), "{err}");
    let (code, _, _) = w.laptop.run("curl -sS https://10.97.0.1:8443/tailgate/health", 10);
    assert_ne!(code, 0, "an unknown CA must fail in a browser too");

    // The wrong CA: `tailgate up` stops with a message saying what to do.
    let (code, _, err) = w.laptop.run(
        &format!("{TAILGATE} up --state-dir {d}/bad --hostname bad --no-ssh --authkey {laptop_key} --control-ca {d}/wrong-ca.pem"),
        20,
    );
    assert_ne!(code, 0);
    assert!(err.contains("TLS with https://10.97.0.1:8443 failed") && err.contains("--control-ca"), "{err}");

    let vps = w.start_node(&w.vps, "vps", &format!("--authkey {vps_key} --control-ca {d}/ctl-ca.pem"), 1);
    // UDP between laptop and vps blocked: only the relay (inside TLS) connects them.
    w.laptop.exec(
        "nft add table ip tlsblk && nft add chain ip tlsblk in '{ type filter hook input priority 0; }' \
         && nft add rule ip tlsblk in ip saddr 10.97.0.2 ip protocol udp drop \
         && nft add chain ip tlsblk out '{ type filter hook output priority 0; }' \
         && nft add rule ip tlsblk out ip daddr 10.97.0.2 ip protocol udp drop",
    );
    let laptop = w.start_node(&w.laptop, "laptop", &format!("--authkey {laptop_key} --no-ssh --control-ca {d}/ctl-ca.pem"), 1);
    let mut r = (0, String::new(), String::new());
    assert!(
        eventually(30, || {
            r = w.on_laptop(&format!("{TAILGATE} ssh root@vps echo over-tls"), 20);
            r.0 == 0
        }),
        "tailgate ssh over the TLS relay: {r:?}\nlaptop:\n{}\nvps:\n{}",
        laptop.log_text(),
        vps.log_text()
    );
    assert_eq!(r.1.trim(), "over-tls");
    let (_, status, _) = w.on_laptop(&format!("{TAILGATE} status --json"), 10);
    let v: serde_json::Value = serde_json::from_str(&status).expect("status json");
    assert_eq!(v["peers"][0]["path"], "relay", "{status}");

    // The pinned CA is remembered: a restart without the flag still connects.
    let saved = std::fs::read_to_string(format!("{d}/laptop/control.json")).unwrap();
    assert!(saved.contains("BEGIN CERTIFICATE"), "{saved}");
    drop(laptop);
    let _laptop2 = w.start_node(&w.laptop, "laptop", "--no-ssh", 2);
    let (code, out, err) = w.on_laptop(&format!("{TAILGATE} ssh root@vps echo again"), 30);
    assert_eq!((code, out.trim()), (0, "again"), "{err}");
}
