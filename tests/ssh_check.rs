//! `check` rules end to end: control, a "vps" and alice's "laptop" in their
//! own namespaces; stock `ssh` and dropbear's `dbclient` answer the
//! keyboard-interactive prompt through a pty (`expect`) with codes computed
//! by `oathtool`, an implementation independent of ours.

mod common;
use common::*;

const WHO: &str = "alice@example.com";

fn policy(period: &str) -> String {
    format!(
        r#"
[tag_owners]
"tag:prod" = ["{WHO}"]

[[ssh]]
src = ["{WHO}"]
dst = ["tag:prod"]
users = ["root"]
action = "check"
check_period = "{period}"

[[tests]]
src = "{WHO}"
dst = "tag:prod"
check = ["root"]
"#
    )
}

/// Answers the first "Verification code for alice@example.com: " prompt with
/// $CODE and fails on a second one; prints NO-PROMPT if none came.
const EXPECT: &str = r#"
set timeout 30
spawn sh $env(CMD)
expect {
  "Verification code for $env(WHO): " { send "$env(CODE)\r" }
  eof { puts "\nNO-PROMPT"; catch wait r; exit [lindex $r 3] }
  timeout { puts "\nTIMEOUT"; exit 98 }
}
expect {
  "Verification code" { puts "\nPROMPTED-AGAIN"; exit 97 }
  eof {}
  timeout { puts "\nTIMEOUT"; exit 98 }
}
catch wait r
exit [lindex $r 3]
"#;

struct Lab {
    w: ControlLab,
    n: std::cell::Cell<u32>,
}

impl Lab {
    fn d(&self) -> String {
        self.w.d()
    }

    /// Runs `cmd` on the laptop under a pty, answering the prompt with `code`.
    /// Returns (exit code, transcript).
    fn answer(&self, cmd: &str, code: &str) -> (i32, String) {
        let d = self.d();
        let n = self.n.get() + 1;
        self.n.set(n);
        std::fs::write(format!("{d}/cmd{n}.sh"), cmd).unwrap();
        let (code, out, err) = self.w.on_laptop(&format!("CMD={d}/cmd{n}.sh WHO={WHO} CODE={code} expect -f {d}/answer.exp"), 45);
        (code, format!("{out}{err}"))
    }

    fn ssh(&self, extra: &str, remote: &str) -> String {
        format!("ssh -F {}/ssh_config {extra} root@vps {remote}", self.d())
    }

    /// The current code for `secret`, by oathtool.
    fn code(&self, secret: &str) -> String {
        must(&format!("oathtool --totp -b {secret}")).trim().to_string()
    }

    /// A code that is certainly wrong now (and in the skew window).
    fn wrong(&self, secret: &str) -> String {
        let window = must(&format!("oathtool --totp -b -w 3 -N '1 minute ago' {secret}"));
        (100000..).map(|n: u32| n.to_string()).find(|c| !window.lines().any(|l| l.trim() == c)).unwrap()
    }

    fn enroll(&self) -> String {
        let out = self.w.admin(&format!("users totp enroll {WHO}"));
        assert!(out.contains(&format!("otpauth://totp/tailgate:{WHO}?secret=")), "{out}");
        assert!(out.contains('█') || out.contains('▀'), "a QR code is drawn: {out}");
        let secret = out.lines().find_map(|l| l.strip_prefix("secret:")).expect("secret line").trim().to_string();
        let shown = out.lines().find_map(|l| l.strip_prefix("current code:")).expect("code line");
        let shown = shown.split_whitespace().next().unwrap();
        // The code shown for confirmation is what an authenticator app shows
        // now (or a step ago, if the step turned meanwhile).
        let now_and_before = must(&format!("oathtool --totp -b {secret}; oathtool --totp -b -N '30 seconds ago' {secret}"));
        assert!(now_and_before.lines().any(|l| l.trim() == shown), "{shown} vs oathtool {now_and_before}");
        secret
    }
}

#[test]
fn check_with_totp_over_keyboard_interactive() {
    if !require(&["ssh", "dbclient", "expect", "oathtool"]) {
        return;
    }
    let _ = std::fs::remove_file("/root/.pyenv/shims/.pyenv-shim");
    let lab = Lab { w: ControlLab::new("ck", "10.91.44"), n: Default::default() };
    let w = &lab.w;
    let d = lab.d();
    std::fs::write(format!("{d}/answer.exp"), EXPECT).unwrap();
    std::fs::write(format!("{d}/policy.toml"), policy("always")).unwrap();
    let mut control = w.start_control(&format!("{d}/policy.toml"), 1);
    w.admin(&format!("users add {WHO}"));
    let server_key = w.authkey("--tag tag:prod");
    let laptop_key = w.authkey(&format!("--user {WHO}"));
    let vps = w.start_node(&w.vps, "vps", &format!("--authkey {server_key}"), 1);
    let _laptop = w.start_node(&w.laptop, "laptop", &format!("--authkey {laptop_key} --no-ssh"), 1);
    w.on_laptop(&format!("{TAILGATE} ssh-config > {d}/ssh_config"), 10);

    // Not enrolled: no prompt, a message saying what to do.
    let mut r = (0, String::new(), String::new());
    assert!(
        eventually(20, || {
            r = w.on_laptop(&lab.ssh("-o BatchMode=yes", "true"), 20);
            r.2.contains("ask an admin to enrol you")
        }),
        "{r:?}\nvps log:\n{}",
        vps.log_text()
    );
    assert!(r.2.contains(&format!("tailgate control users totp enroll {WHO}")), "{r:?}");
    assert_ne!(r.0, 0);

    let secret = lab.enroll();
    let status = w.admin(&format!("users totp status {WHO} --json"));
    assert!(status.contains("\"enrolled\": true"), "{status}");

    // The right code, through stock ssh, with a ControlMaster (as Ansible
    // uses it): one prompt, then a second command reuses the master without
    // one, in the same terminal (a closed terminal would hang up the
    // master's ProxyCommand). Period "always" would prompt a new connection.
    let cm = format!("-o ControlMaster=auto -o ControlPath={d}/cm -o ControlPersist=60");
    let code = lab.code(&secret);
    let both = format!(
        "{} && {} && {}",
        lab.ssh(&cm, "echo checked-in"),
        lab.ssh(&format!("{cm} -o BatchMode=yes"), "echo via-master"),
        lab.ssh(&format!("{cm} -O exit"), "")
    );
    let (rc, out) = lab.answer(&both, &code);
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("checked-in") && out.contains("via-master") && !out.contains("NO-PROMPT"), "{out}");

    // The same code again: prompted (period "always"), refused as a replay.
    let (rc, out) = lab.answer(&lab.ssh("", "echo should-not-run"), &code);
    assert_ne!(rc, 0, "{out}");
    assert!(out.contains("already used") && !out.contains("should-not-run"), "{out}");

    // A wrong code; then three more make five failures: locked out.
    let bad = lab.wrong(&secret);
    let (rc, out) = lab.answer(&lab.ssh("", "echo should-not-run"), &bad);
    assert_ne!(rc, 0, "{out}");
    assert!(out.contains("wrong verification code (3 more"), "{out}");
    for _ in 0..3 {
        let (rc, out) = lab.answer(&lab.ssh("", "true"), &bad);
        assert_ne!(rc, 0, "{out}");
    }
    // Locked out: no prompt, even a right code would not help.
    let (rc, out, err) = w.on_laptop(&lab.ssh("-o BatchMode=yes", "echo should-not-run"), 20);
    assert_ne!(rc, 0, "{out}");
    assert!(err.contains("locked out"), "{err}");
    let audit = w.admin("audit admin --json");
    for a in ["check.passed", "check.failed", "check.lockout"] {
        assert!(audit.contains(a), "control audit lacks {a}: {audit}");
    }
    let node_audit = std::fs::read_to_string(format!("{d}/vps/audit.jsonl")).unwrap();
    for k in ["\"kind\":\"passed\"", "\"kind\":\"failed\"", "\"kind\":\"lockout\""] {
        assert!(node_audit.lines().any(|l| l.contains("\"event\":\"check\"") && l.contains(k)), "vps audit lacks {k}:\n{node_audit}");
    }

    // An admin resets and re-enrols alice: the lockout goes with the old secret.
    w.admin(&format!("users totp reset {WHO}"));
    let secret = lab.enroll();

    // dbclient answers the same prompt.
    let db = format!("dbclient -y -y -J '{TAILGATE} nc vps 22' root@vps 'echo from-dbclient'");
    let (rc, out) = lab.answer(&db, &lab.code(&secret));
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("from-dbclient") && !out.contains("NO-PROMPT"), "{out}");

    // With a check period, the approval just made admits alice from her
    // laptop without a prompt (BatchMode: no keyboard-interactive at all).
    std::fs::write(format!("{d}/policy.toml"), policy("1h")).unwrap();
    let mut r = (0, String::new(), String::new());
    assert!(
        eventually(20, || {
            r = w.on_laptop(&lab.ssh("-o BatchMode=yes", "echo cached"), 20);
            r.0 == 0
        }),
        "{r:?}"
    );
    assert_eq!(r.1.trim(), "cached");

    // Control down: check denies, saying why. (Direct first: new sessions
    // over the relay would fail with control for another reason.)
    w.wait_direct(30);
    control.kill();
    let mut r = (0, String::new(), String::new());
    assert!(
        eventually(20, || {
            r = w.on_laptop(&lab.ssh("-o BatchMode=yes", "echo should-not-run"), 20);
            r.2.contains("cannot reach the control server")
        }),
        "{r:?}"
    );
    assert_ne!(r.0, 0);
    assert!(!r.1.contains("should-not-run"));

    // With the server stopped, the admin commands work on the database
    // under the state-dir lock; the secret is in no answer but enroll's.
    let status = w.admin(&format!("users totp status {WHO} --json"));
    assert!(status.contains("\"enrolled\": true") && !status.contains(&secret), "{status}");
    assert!(!status.contains("\"last_used\": null"), "a code was used: {status}");
    let db_mode = must(&format!("stat -c %a {d}/ctl/control.db"));
    assert_eq!(db_mode.trim(), "600");
}
