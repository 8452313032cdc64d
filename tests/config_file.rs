//! Config files (`/etc/tailgate/node.toml`, `control.toml`, `--config`): a
//! file sets flags, a flag overrides it, mistakes are refused at FILE:LINE.
//! `TAILGATE_CONFIG_DIR` stands in for /etc/tailgate, which is never read.
mod common;
use common::*;

const WG: &str = "[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\nAddress = 100.64.0.1/32\n";

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts `tailgate ARGS` with `env`, returns what it printed once `needle`
/// shows up (the process is then killed).
fn started(dir: &std::path::Path, env: &str, args: &str, needle: &str) -> String {
    let log = dir.join(format!("{}.log", unique("run")));
    let f = std::fs::File::create(&log).unwrap();
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("exec env {env} {TAILGATE} {args}"))
        .stdin(std::process::Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap();
    let mut p = Proc::from_child(child, log);
    p.wait_log(needle, 15);
    p.log_text()
}

#[test]
fn node_toml_sets_flags_and_the_command_line_wins() {
    let dir = tempdir();
    let d = dir.path().display();
    let wg = write(dir.path(), "web1.conf", WG);
    // The default file, in the directory that stands in for /etc/tailgate.
    // Static mode, so the test needs no control server; the state
    // directory and the SSH host key in it show which flags took effect.
    std::fs::create_dir(dir.path().join("etc")).unwrap();
    write(
        &dir.path().join("etc"),
        "node.toml",
        &format!("# node settings\nwg_config = \"{wg}\"\nstate-dir = \"{d}/state\"\nno-ssh = true\nforward = [\"8080=127.0.0.1:80\"]\n"),
    );
    let env = format!("TAILGATE_CONFIG_DIR={d}/etc");
    let out = started(dir.path(), &env, "up", "up at");
    assert!(out.contains("up at 100.64.0.1"), "the file's wg-config: {out}");
    assert!(dir.path().join("state").is_dir(), "the file's state-dir");
    assert!(!dir.path().join("state/ssh_host_ed25519_key").exists(), "the file's no-ssh");

    let out = started(dir.path(), &env, &format!("up --state-dir {d}/flag"), "up at");
    assert!(out.contains("up at 100.64.0.1"), "{out}");
    assert!(dir.path().join("flag").is_dir(), "the flag wins over the file");

    // --config names another file; the default one is then not read.
    let other = write(dir.path(), "other.toml", &format!("wg-config = \"{wg}\"\nstate-dir = \"{d}/state2\"\nssh-port = 2222\n"));
    let out = started(dir.path(), &env, &format!("up --config {other}"), "up at");
    assert!(out.contains("up at 100.64.0.1"), "{out}");
    assert!(dir.path().join("state2/ssh_host_ed25519_key").exists(), "no no-ssh from the default file");
}

#[test]
fn control_toml_sets_server_flags_and_admin_commands_use_its_state_dir() {
    let dir = tempdir();
    let d = dir.path().display();
    let port = free_tcp_port();
    let conf = write(
        dir.path(),
        "control.toml",
        &format!("listen = \"127.0.0.1:{port}\"\nstate_dir = \"{d}/ctl\"\ndomain = \"corp.example\"\nephemeral-grace = \"10s\"\n"),
    );
    let out = started(dir.path(), "", &format!("control --config {conf}"), "listening on");
    assert!(out.contains(&format!("listening on 127.0.0.1:{port}")), "{out}");
    // Server flags in the file do not trip admin commands; --state-dir applies.
    let (code, out, err) = run_timeout(&format!("{TAILGATE} control --config {conf} users add alice"), 20);
    assert_eq!(code, 0, "{out}{err}");
    // The default location, through the stand-in directory.
    std::fs::create_dir(dir.path().join("etc")).unwrap();
    std::fs::copy(&conf, dir.path().join("etc/control.toml")).unwrap();
    let (code, out, err) = run_timeout(&format!("TAILGATE_CONFIG_DIR={d}/etc {TAILGATE} control users list"), 20);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("alice"), "the default file's state-dir: {out}");
}

#[test]
fn mistakes_in_the_file_are_refused_at_file_and_line() {
    let dir = tempdir();
    let d = dir.path().display();
    let cases = [
        (
            "up",
            "state-dir = \"/tmp/x\"\n\nlisten_prot = 5\n",
            ":3: unknown key `listen_prot` (did you mean `listen-port`?); `tailgate up` takes: ",
        ),
        ("up", "no-ssh = \"yes\"\n", ":1: `no-ssh` is a switch"),
        ("up", "listen-port = 70000\n", ":1: invalid value '70000' for '--listen-port"),
        ("up", "hostname = [\"a\", \"b\"]\n", ":1: `hostname` takes one value, not a list"),
        ("up", "listen-port = \n", ":1: "),
        ("control", "listen = \"127.0.0.1:1\"\ndomain = \"not a domain\"\n", ":2: invalid value 'not a domain' for '--domain"),
        ("control", "[server]\nlisten = \"x\"\n", ":1: unknown key `server`"),
    ];
    for (i, (cmd, body, want)) in cases.iter().enumerate() {
        let f = write(dir.path(), &format!("bad{i}.toml"), body);
        let (code, out, err) = run_timeout(&format!("{TAILGATE} {cmd} --config {f} --state-dir {d}/s"), 10);
        assert_eq!(code, 2, "{body}: {out} {err}");
        assert!(err.contains(&format!("{f}{want}")), "{body}: expected {f}{want:?} in {err}");
        assert!(!out.contains("up at") && !out.contains("listening"), "nothing starts: {out}");
    }
    let (code, _, err) = run_timeout(&format!("{TAILGATE} up --config {d}/nope.toml"), 10);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&format!("{d}/nope.toml: No such file")), "{err}");
    // The unknown-key message lists what exists, so the fix is in the message.
    let f = write(dir.path(), "k.toml", "bogus = 1\n");
    let (_, _, err) = run_timeout(&format!("{TAILGATE} control --config {f}"), 10);
    for k in ["listen", "policy", "url", "domain", "state-dir"] {
        assert!(err.contains(k), "{k} in {err}");
    }
}
