//! ACME against pebble (the ACME test CA, Debian package `pebble`) in a
//! network namespace, with real TLS-ALPN-01 validation: the namespace's
//! `/etc/hosts` (`/etc/netns/NAME/hosts`, bind-mounted by `ip netns exec`)
//! maps `control.test` to 127.0.0.1, pebble's validator resolves it there
//! and connects to the control port (443) with ALPN `acme-tls/1`.
//! Pebble issues 40 s certificates, so renewal (at two thirds of the
//! lifetime) happens within the test; a restart reuses the stored one.

#[path = "common/certs.rs"]
mod certs;
mod common;

use common::*;

/// Removes the namespace's hosts file on drop.
struct NsEtc(String);

impl Drop for NsEtc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn serial(ns: &Netns) -> String {
    let (_, out, _) =
        ns.run("openssl s_client -connect 127.0.0.1:443 -servername control.test </dev/null 2>/dev/null | openssl x509 -noout -serial", 10);
    out.trim().to_string()
}

#[test]
fn acme_issues_renews_and_reuses_the_stored_certificate() {
    if !require(&["pebble", "openssl", "curl"]) {
        return;
    }
    let ns = Netns::new("acme");
    let etc = NsEtc(format!("/etc/netns/{}", ns.name));
    std::fs::create_dir_all(&etc.0).unwrap();
    std::fs::write(format!("{}/hosts", etc.0), "127.0.0.1 localhost control.test\n").unwrap();
    let dir = tempdir();
    let d = dir.path().display().to_string();
    certs::make_certs(dir.path(), "pebble", &["127.0.0.1", "localhost"]);
    std::fs::write(
        format!("{d}/pebble.json"),
        format!(
            r#"{{"pebble": {{"listenAddress": "127.0.0.1:14000", "managementListenAddress": "127.0.0.1:15000",
              "certificate": "{d}/pebble-cert.pem", "privateKey": "{d}/pebble-key.pem",
              "httpPort": 5002, "tlsPort": 443, "ocspResponderURL": "", "externalAccountBindingRequired": false,
              "certificateValidityPeriod": 40}}}}"#
        ),
    )
    .unwrap();
    let mut pebble = ns.spawn(
        &format!("env PEBBLE_VA_NOSLEEP=1 PEBBLE_WFE_NONCEREJECT=0 PEBBLE_AUTHZREUSE=0 pebble -config {d}/pebble.json"),
        &dir.path().join("pebble.log"),
    );
    pebble.wait_log("ACME directory available", 15);

    let control = |n: u32| {
        let mut p = ns.spawn(
            &format!(
                "env RUST_LOG=tailgate=info {TAILGATE} control --state-dir {d}/ctl --listen 127.0.0.1:443 --acme-domain control.test \
                 --acme-email ops@control.test --acme-directory https://127.0.0.1:14000/dir --acme-ca {d}/pebble-ca.pem"
            ),
            &dir.path().join(format!("ctl{n}.log")),
        );
        p.wait_log("listening on", 15);
        p
    };
    let mut ctl = control(1);
    assert!(ctl.log_text().contains("URL:               https://control.test\n"), "{}", ctl.log_text());

    // First issuance, validated over TLS-ALPN-01 on the control port.
    ctl.wait_log("DeployedNewCert", 60);
    ns.exec(&format!("curl -sSf --cacert {d}/pebble-ca.pem https://127.0.0.1:15000/roots/0 > {d}/root.pem"));
    let (code, out, err) = ns.run(&format!("curl -sS --cacert {d}/root.pem https://control.test/tailgate/health"), 10);
    assert_eq!((code, out.trim()), (0, "ok"), "{err}\n{}", ctl.log_text());
    let first = serial(&ns);
    assert!(first.starts_with("serial="), "{first}");
    // Validated for real (not PEBBLE_VA_ALWAYS_VALID); nothing listens on
    // the HTTP-01 port, so it was TLS-ALPN-01 on the control port.
    assert!(pebble.log_text().contains("set VALID by completed challenge"), "{}", pebble.log_text());

    // The stored account and certificate (with its key) are private.
    for e in std::fs::read_dir(format!("{d}/ctl/acme")).unwrap() {
        let m = e.unwrap().metadata().unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(m.permissions().mode() & 0o077, 0, "acme cache files are 0600");
    }

    // Renewal before expiry: a new certificate is served without a restart.
    let mut renewed = String::new();
    assert!(
        eventually(90, || {
            renewed = serial(&ns);
            renewed.starts_with("serial=") && renewed != first
        }),
        "no renewal: {renewed}\n{}",
        ctl.log_text()
    );
    assert!(ctl.log_text().matches("DeployedNewCert").count() >= 2, "{}", ctl.log_text());

    // Restart: the stored certificate is loaded, not ordered again.
    ctl.kill();
    let mut ctl2 = control(2);
    ctl2.wait_log("DeployedCachedCert", 15);
    let (code, out, err) = ns.run(&format!("curl -sS --cacert {d}/root.pem https://control.test/tailgate/health"), 10);
    assert_eq!((code, out.trim()), (0, "ok"), "{err}");
}
