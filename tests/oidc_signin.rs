//! Signing in with a real OpenID Connect provider (issue 13): `oidc-provider`
//! from npm (tests/oidc/provider.js), its own login and consent pages driven
//! by curl the way a browser would, `tailgate control --oidc-*`, nodes that
//! join with `tailgate up --login-server`, and stock ssh decided by the
//! provider's groups. Everything runs in network namespaces made here.

mod common;
use common::*;

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

const CLIENT_ID: &str = "tailgate-test";
const CLIENT_SECRET: &str = "test-client-secret";

fn provider_script() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc");
    assert!(
        dir.join("node_modules/oidc-provider").exists(),
        "oidc-provider is not installed; run `npm ci --prefix tests/oidc` (.ci/run does)"
    );
    dir.join("provider.js")
}

/// The provider, in `ns` on `ip:port`, configured through a JSON file the
/// script re-reads on every login and token request.
struct Provider {
    ns_name: String,
    cfg_path: PathBuf,
    cfg: Value,
    proc: Option<Proc>,
    log: PathBuf,
    starts: u32,
}

impl Provider {
    fn start(ns: &Netns, dir: &Path, ip: &str, control_url: &str, users: Value) -> Provider {
        let cfg = json!({
            "issuer": format!("http://{ip}:9443"),
            "listen": ip,
            "port": 9443,
            "keys_file": dir.join("provider-keys.json"),
            "rotate_key": false,
            "clients": [{
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "redirect_uris": [format!("{control_url}/oidc/callback")],
            }],
            "users": users,
            "misbehave": "",
        });
        let mut p = Provider {
            ns_name: ns.name.clone(),
            cfg_path: dir.join("provider.json"),
            cfg,
            proc: None,
            log: dir.join("provider.log"),
            starts: 0,
        };
        p.write();
        p.run(ns);
        p
    }

    fn issuer(&self) -> String {
        self.cfg["issuer"].as_str().unwrap().to_string()
    }

    fn run(&mut self, ns: &Netns) {
        assert_eq!(ns.name, self.ns_name);
        self.starts += 1;
        let log = self.log.with_extension(format!("{}.log", self.starts));
        let mut proc = ns.spawn(&format!("node {} {}", provider_script().display(), self.cfg_path.display()), &log);
        proc.wait_log("provider: listening", 20);
        self.proc = Some(proc);
    }

    fn write(&self) {
        std::fs::write(&self.cfg_path, serde_json::to_vec_pretty(&self.cfg).unwrap()).unwrap();
    }

    fn set(&mut self, f: impl FnOnce(&mut Value)) {
        f(&mut self.cfg);
        self.write();
    }

    fn stop(&mut self) {
        self.proc.take();
    }
}

/// Writes the client secret 0600 and returns the `--oidc-*` flags.
fn oidc_flags(dir: &Path, issuer: &str, extra: &str) -> String {
    let secret = dir.join("client-secret");
    std::fs::write(&secret, format!("{CLIENT_SECRET}\n")).unwrap();
    must(&format!("chmod 600 {}", secret.display()));
    format!("--oidc-issuer {issuer} --oidc-client-id {CLIENT_ID} --oidc-client-secret-file {} {extra}", secret.display())
}

/// A browser: curl with a cookie jar, run in a namespace, following
/// redirects itself and filling in the provider's login and consent forms.
struct Browser {
    ns_name: String,
    jar: PathBuf,
}

struct Page {
    status: u16,
    location: Option<String>,
    body: String,
}

impl Browser {
    fn new(ns: &Netns, dir: &Path, name: &str) -> Browser {
        Browser { ns_name: ns.name.clone(), jar: dir.join(format!("{name}.cookies")) }
    }

    fn fetch(&self, url: &str, form: Option<&str>) -> Page {
        let data = form.map(|f| format!("--data {}", shell_quote(f))).unwrap_or_default();
        let cmd = format!("curl -sS -i --max-time 20 -c {0} -b {0} {data} {1}", self.jar.display(), shell_quote(url));
        let (code, out, err) = run_timeout(&format!("ip netns exec {} sh -c {}", self.ns_name, shell_quote(&cmd)), 30);
        if code != 0 {
            return Page { status: 0, location: None, body: format!("curl failed: {err}") };
        }
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let location = head
            .lines()
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("location")).map(|(_, v)| v.trim().to_string()));
        Page { status, location, body: body.to_string() }
    }

    /// Opens a sign-in URL and logs in as `login`; stops at the redirect to
    /// the control server's callback and returns it (not yet visited), or
    /// the page where it went elsewhere.
    fn sign_in(&self, start_url: &str, login: &str) -> Result<String, Page> {
        let origin = |u: &str| u.splitn(4, '/').take(3).collect::<Vec<_>>().join("/");
        let mut url = start_url.to_string();
        let mut form: Option<String> = None;
        for _ in 0..20 {
            let page = self.fetch(&url, form.as_deref());
            form = None;
            if let Some(loc) = &page.location {
                url = if loc.starts_with('/') { format!("{}{loc}", origin(&url)) } else { loc.clone() };
                if url.contains("/oidc/callback") {
                    return Ok(url);
                }
                continue;
            }
            let action = page.body.split("action=\"").nth(1).and_then(|s| s.split('"').next()).map(String::from);
            let prompt = if page.body.contains("value=\"login\"") {
                format!("prompt=login&login={login}&password=any")
            } else if page.body.contains("value=\"consent\"") {
                "prompt=consent".to_string()
            } else {
                return Err(page);
            };
            let Some(action) = action.filter(|_| page.status == 200) else { return Err(page) };
            url = if action.starts_with('/') { format!("{}{action}", origin(&url)) } else { action };
            form = Some(prompt);
        }
        panic!("sign-in at {start_url} did not end");
    }

    /// Signs in and delivers the callback; the control server's page.
    fn sign_in_all_the_way(&self, start_url: &str, login: &str) -> Page {
        match self.sign_in(start_url, login) {
            Ok(cb) => self.fetch(&cb, None),
            Err(p) => p,
        }
    }
}

/// `tailgate up --login-server URL ARGS` in `ns`; returns the process and
/// the sign-in URL it printed.
fn join_by_sign_in(ns: &Netns, dir: &Path, name: &str, control_url: &str, args: &str, n: u32) -> (Proc, String) {
    let d = dir.display();
    let mut p = ns.spawn(
        &format!("env RUST_LOG=tailgate=info {TAILGATE} up --state-dir {d}/{name} --hostname {name} --login-server {control_url} {args}"),
        &dir.join(format!("{name}{n}.log")),
    );
    p.wait_log("/oidc/start/", 20);
    let url = sign_in_url(&p.log_text());
    (p, url)
}

fn sign_in_url(log: &str) -> String {
    let i = log.rfind("To sign in, visit:").unwrap_or_else(|| panic!("no sign-in prompt in:\n{log}"));
    log[i..].split_whitespace().find(|w| w.contains("/oidc/start/")).expect("URL after the prompt").to_string()
}

/// Waits until the process has exited and returns its log.
fn wait_exit(p: &mut Proc, secs: u64) -> String {
    p.wait_log("the control server refused", secs);
    p.log_text()
}

const POLICY: &str = r#"
[tag_owners]
"tag:prod" = []

# Staff may reach the web port, so prod stays in their netmaps.
[[acl]]
src = ["group:oidc/staff"]
dst = ["tag:prod:80"]

# Root on prod for the identity provider's "admins", whoever they are.
[[ssh]]
src = ["group:oidc/admins"]
dst = ["tag:prod"]
users = ["root"]
action = "accept"

[[tests]]
src = "alice@example.com"
src_groups = ["admins"]
dst = "tag:prod"
accept = ["root"]

[[tests]]
src = "alice@example.com"
dst = "tag:prod"
deny = ["root"]
"#;

fn users() -> Value {
    json!({
        "alice": { "email": "alice@example.com", "groups": ["admins", "staff"] },
        "bob": { "email": "bob@example.com", "groups": ["staff"] },
        "mallory": { "email": "mallory@elsewhere.test", "groups": ["admins"] },
        "carol": { "email": "carol@example.com", "email_verified": false, "groups": ["admins"] },
    })
}

/// `tailgate ssh root@vps CMD` from the laptop namespace with this state dir.
fn ssh_from(lab: &ControlLab, state: &str, cmd: &str) -> (i32, String, String) {
    lab.laptop.run(&format!("export TAILGATE_STATE_DIR={}/{state}; {TAILGATE} ssh root@vps {cmd}", lab.d()), 20)
}

#[test]
fn sign_in_joins_and_the_provider_group_decides_ssh_live() {
    if !require(&["ssh", "node", "curl"]) {
        return;
    }
    let _ = std::fs::remove_file("/root/.pyenv/shims/.pyenv-shim");
    let lab = ControlLab::new("os", "10.97.13");
    let dir = lab.dir.path();
    let d = lab.d();
    let control_url = "http://10.97.13.1:8443";
    let mut provider = Provider::start(&lab.ctl, dir, "10.97.13.1", control_url, users());
    std::fs::write(format!("{d}/policy.toml"), POLICY).unwrap();
    let flags = oidc_flags(dir, &provider.issuer(), "--oidc-allowed-domains example.com");
    let mut control = lab.ctl.spawn(
        &format!("{TAILGATE} control --state-dir {d}/ctl --listen 10.97.13.1:8443 --policy {d}/policy.toml {flags}"),
        &dir.join("ctl.log"),
    );
    control.wait_log("listening on", 20);
    assert!(control.log_text().contains(&format!("redirect URL to register there: {control_url}/oidc/callback")), "{}", control.log_text());

    let prod = lab.authkey("--tag tag:prod");
    let vps = lab.start_node(&lab.vps, "vps", &format!("--authkey {prod}"), 1);

    // Alice joins her laptop by signing in; the browser is on the laptop too.
    let browser = Browser::new(&lab.laptop, dir, "laptop-browser");
    let (mut laptop, url) = join_by_sign_in(&lab.laptop, dir, "laptop", control_url, "--no-ssh", 1);
    assert!(url.starts_with(&format!("{control_url}/oidc/start/")), "{url}");
    let page = browser.sign_in_all_the_way(&url, "alice");
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("signed in as alice@example.com"), "{}", page.body);
    laptop.wait_log("tailgate: up at", 20);
    let users = lab.admin("users list --json");
    assert!(users.contains("alice@example.com") && users.contains("admins"), "{users}");

    // The provider's "admins" group admits alice as root (stock ssh).
    let mut r = (0, String::new(), String::new());
    assert!(
        eventually(20, || {
            r = ssh_from(&lab, "laptop", "id -u");
            r.0 == 0
        }),
        "alice (admins) should get root: {r:?}\nvps:\n{}",
        vps.log_text()
    );
    assert_eq!(r.1.trim(), "0");

    // Bob is staff, not admins: his node joins, ssh is refused.
    let (mut bobbox, url) = join_by_sign_in(&lab.laptop, dir, "bobbox", control_url, "--no-ssh", 1);
    let page = Browser::new(&lab.laptop, dir, "bob-browser").sign_in_all_the_way(&url, "bob");
    assert_eq!(page.status, 200, "{}", page.body);
    bobbox.wait_log("tailgate: up at", 20);
    let mut r = ssh_from(&lab, "bobbox", "id -u");
    assert_ne!(r.0, 0, "bob is not in admins: {r:?}");

    // A link is single use: after the sign-in it is gone.
    let again = browser.fetch(&url, None);
    assert_eq!(again.status, 404, "{}", again.body);
    assert!(again.body.contains("run `tailgate up` again"), "{}", again.body);

    // Alice leaves "admins" at the provider. While her laptop holds a root
    // session, she signs in on a second device: the new groups reach the
    // vps at once and the open session ends.
    let mut session = lab.laptop.spawn(
        &format!("sh -c 'export TAILGATE_STATE_DIR={d}/laptop; exec {TAILGATE} ssh root@vps \"touch {d}/session-open; sleep 120\"'"),
        &dir.join("session.log"),
    );
    assert!(eventually(20, || dir.join("session-open").exists()), "session never started: {}", session.log_text());
    provider.set(|c| c["users"]["alice"]["groups"] = json!(["staff"]));
    let (mut phone, url) = join_by_sign_in(&lab.laptop, dir, "phone", control_url, "--no-ssh", 1);
    let page = Browser::new(&lab.laptop, dir, "phone-browser").sign_in_all_the_way(&url, "alice");
    assert_eq!(page.status, 200, "{}", page.body);
    phone.wait_log("tailgate: up at", 20);
    session.wait_log("access revoked", 20);
    r = ssh_from(&lab, "laptop", "id -u");
    assert_ne!(r.0, 0, "alice left admins, root must be refused: {r:?}");

    // A saved state needs nothing: the laptop restarts without flags.
    laptop.kill();
    let mut laptop = lab.start_node(&lab.laptop, "laptop", "--no-ssh", 2);
    assert!(!laptop.log_text().contains("To sign in"), "{}", laptop.log_text());

    // Back in admins at the provider; --force-reauth renews the node through
    // the provider and picks the group up again.
    laptop.kill();
    provider.set(|c| c["users"]["alice"]["groups"] = json!(["admins"]));
    let (mut laptop, url) = join_by_sign_in(&lab.laptop, dir, "laptop", control_url, "--no-ssh --force-reauth", 3);
    let page = browser.sign_in_all_the_way(&url, "alice");
    assert_eq!(page.status, 200, "{}", page.body);
    laptop.wait_log("tailgate: up at", 20);
    assert!(
        eventually(20, || {
            r = ssh_from(&lab, "laptop", "id -u");
            r.0 == 0
        }),
        "alice is in admins again: {r:?}"
    );
    drop(session);
}

#[test]
fn refused_sign_ins_say_why() {
    if !require(&["node", "curl"]) {
        return;
    }
    let ns = Netns::new("orf");
    let dir = tempdir();
    let (dir, d) = (dir.path(), dir.path().display().to_string());
    let control_url = "http://127.0.0.1:8443";
    let mut provider = Provider::start(&ns, dir, "127.0.0.1", control_url, users());
    let flags = oidc_flags(dir, &provider.issuer(), "--oidc-allowed-domains example.com");
    let mut control = ns.spawn(&format!("{TAILGATE} control --state-dir {d}/ctl --listen 127.0.0.1:8443 {flags}"), &dir.join("ctl.log"));
    control.wait_log("listening on", 20);
    let browser = Browser::new(&ns, dir, "browser");

    // Each spoiled ID token is refused, in the browser and on the node.
    for (n, (mode, why)) in
        [("wrong_aud", "Invalid audiences"), ("bad_signature", "Signature verification failed"), ("expired", "Expired")].iter().enumerate()
    {
        provider.set(|c| c["misbehave"] = json!(mode));
        let (mut node, url) = join_by_sign_in(&ns, dir, &format!("spoiled{n}"), control_url, "--no-ssh", 1);
        let page = browser.sign_in_all_the_way(&url, "alice");
        assert_eq!(page.status, 403, "{mode}: {}", page.body);
        assert!(page.body.contains("ID token was refused") && page.body.contains(why), "{mode}: {}", page.body);
        let log = wait_exit(&mut node, 20);
        assert!(log.contains("refused") && log.contains(why), "{mode}: node log:\n{log}");
    }
    provider.set(|c| c["misbehave"] = json!(""));

    // A good sign-in, then its callback replayed: the state is spent.
    let (mut good, url) = join_by_sign_in(&ns, dir, "good", control_url, "--no-ssh", 1);
    let first_callback = browser.sign_in(&url, "alice").unwrap_or_else(|p| panic!("{}: {}", p.status, p.body));
    let page = browser.fetch(&first_callback, None);
    assert_eq!(page.status, 200, "{}", page.body);
    good.wait_log("tailgate: up at", 20);
    let replay = browser.fetch(&first_callback, None);
    assert_eq!(replay.status, 400, "{}", replay.body);
    assert!(replay.body.contains("unknown or already used sign-in state"), "{}", replay.body);

    // A fresh sign-in's state with the old (already used) code: the provider
    // refuses the code, the server says so, the node is told.
    let (mut reuse, url) = join_by_sign_in(&ns, dir, "reuse", control_url, "--no-ssh", 1);
    let cb = browser.sign_in(&url, "alice").unwrap_or_else(|p| panic!("{}: {}", p.status, p.body));
    let param = |u: &str, k: &str| u.split(['?', '&']).find_map(|kv| kv.strip_prefix(&format!("{k}="))).unwrap().to_string();
    let tampered = format!("{control_url}/oidc/callback?code={}&state={}", param(&first_callback, "code"), param(&cb, "state"));
    let page = browser.fetch(&tampered, None);
    assert_eq!(page.status, 403, "{}", page.body);
    assert!(page.body.contains("did not accept the authorization code"), "{}", page.body);
    let log = wait_exit(&mut reuse, 20);
    assert!(log.contains("did not accept the authorization code"), "{log}");

    // Outside the allowed domains, and an unverified email.
    for (login, why) in [("mallory", "not one of the allowed domains (example.com)"), ("carol", "is not verified")] {
        let (mut node, url) = join_by_sign_in(&ns, dir, login, control_url, "--no-ssh", 1);
        // Another person: another browser (the provider remembers alice's session).
        let page = Browser::new(&ns, dir, login).sign_in_all_the_way(&url, login);
        assert_eq!(page.status, 403, "{login}: {}", page.body);
        assert!(page.body.contains(why), "{login}: {}", page.body);
        let log = wait_exit(&mut node, 20);
        assert!(log.contains(why), "{login}: {log}");
    }
    let users = must(&format!("{TAILGATE} control --state-dir {d}/ctl users list"));
    assert!(!users.contains("mallory") && !users.contains("carol"), "refused people are not users:\n{users}");

    // The provider rotates its signing key: the next sign-in fetches the
    // new key and works.
    provider.stop();
    provider.set(|c| c["rotate_key"] = json!(true));
    provider.run(&ns);
    let (mut rotated, url) = join_by_sign_in(&ns, dir, "rotated", control_url, "--no-ssh", 1);
    let page = Browser::new(&ns, dir, "browser2").sign_in_all_the_way(&url, "bob");
    assert_eq!(page.status, 200, "{}", page.body);
    rotated.wait_log("tailgate: up at", 20);
}

#[test]
fn issuer_down_at_sign_in_is_clear_and_joined_nodes_keep_working() {
    if !require(&["ssh", "node", "curl"]) {
        return;
    }
    let _ = std::fs::remove_file("/root/.pyenv/shims/.pyenv-shim");
    let lab = ControlLab::new("od", "10.97.14");
    let dir = lab.dir.path();
    let d = lab.d();
    let control_url = "http://10.97.14.1:8443";
    let mut provider = Provider::start(&lab.ctl, dir, "10.97.14.1", control_url, users());
    std::fs::write(format!("{d}/policy.toml"), POLICY).unwrap();
    let flags = oidc_flags(dir, &provider.issuer(), "");
    let mut control = lab.ctl.spawn(
        &format!("{TAILGATE} control --state-dir {d}/ctl --listen 10.97.14.1:8443 --policy {d}/policy.toml {flags}"),
        &dir.join("ctl.log"),
    );
    control.wait_log("listening on", 20);
    let prod = lab.authkey("--tag tag:prod");
    let _vps = lab.start_node(&lab.vps, "vps", &format!("--authkey {prod}"), 1);
    let browser = Browser::new(&lab.laptop, dir, "browser");
    let (mut laptop, url) = join_by_sign_in(&lab.laptop, dir, "laptop", control_url, "--no-ssh", 1);
    assert_eq!(browser.sign_in_all_the_way(&url, "alice").status, 200);
    laptop.wait_log("tailgate: up at", 20);

    provider.stop();
    // A new device: the link says the provider is down, and stays usable.
    let (_late, url) = join_by_sign_in(&lab.laptop, dir, "late", control_url, "--no-ssh", 1);
    let page = browser.fetch(&url, None);
    assert_eq!(page.status, 503, "{}", page.body);
    assert!(page.body.contains("cannot be reached") && page.body.contains(&provider.issuer()), "{}", page.body);

    // Joined nodes do not need the provider: ssh works, and so does a restart.
    let mut r = (0, String::new(), String::new());
    assert!(
        eventually(20, || {
            r = ssh_from(&lab, "laptop", "id -u");
            r.0 == 0
        }),
        "{r:?}"
    );
    laptop.kill();
    let _laptop = lab.start_node(&lab.laptop, "laptop", "--no-ssh", 2);
    assert!(
        eventually(20, || {
            r = ssh_from(&lab, "laptop", "id -u");
            r.0 == 0
        }),
        "after a restart: {r:?}"
    );

    // Back up: the same link now leads to the provider.
    provider.run(&lab.ctl);
    let page = browser.fetch(&url, None);
    assert_eq!(page.status, 302, "{}", page.body);
    assert!(page.location.unwrap_or_default().starts_with(&provider.issuer()));
}

#[test]
fn control_refuses_to_start_with_an_unreachable_issuer_or_an_open_secret() {
    let dir = tempdir();
    let (dir, d) = (dir.path(), dir.path().display().to_string());
    // Nothing listens on port 9 of loopback: refused at once, a clear error.
    let flags = oidc_flags(dir, "http://127.0.0.1:9", "");
    let (code, _, err) = run_timeout(&format!("{TAILGATE} control --state-dir {d}/ctl --listen 127.0.0.1:0 {flags}"), 30);
    assert_ne!(code, 0);
    assert!(err.contains("cannot reach the identity provider at http://127.0.0.1:9"), "{err}");

    must(&format!("chmod 644 {d}/client-secret"));
    let (code, _, err) = run_timeout(&format!("{TAILGATE} control --state-dir {d}/ctl2 --listen 127.0.0.1:0 {flags}"), 30);
    assert_ne!(code, 0);
    assert!(err.contains("chmod 600"), "{err}");
}
