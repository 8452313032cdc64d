//! The README's first command: `tailgate demo` sets up control + two nodes and
//! a real SSH login between them works.
mod common;
use common::*;

#[test]
fn demo_check_logs_in() {
    if !require(&["ssh"]) {
        return;
    }
    let dir = tempdir();
    let (code, out, err) = run_timeout(&format!("{TAILGATE} demo --check --dir {}/demo", dir.path().display()), 60);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("ssh --state-dir") && out.contains("worked"), "{out}");
    let audit = std::fs::read_to_string(dir.path().join("demo/vps/audit.jsonl")).unwrap();
    assert!(audit.contains("demo-ok") || audit.contains("\"accept\""), "{audit}");
    // The check logs in as root, a recorded session: it reached control and
    // `recordings play` replays it.
    if is_root() {
        let id = out.lines().find_map(|l| l.strip_prefix("check: recording ")).and_then(|l| l.split(' ').next()).expect("recording id");
        let (code, played, err) = run_timeout(
            &format!("{TAILGATE} control --state-dir {}/demo/control recordings play {id} --speed 50", dir.path().display()),
            60,
        );
        assert_eq!(code, 0, "{err}");
        assert!(played.contains("demo-ok"), "{played}");
    }
}
