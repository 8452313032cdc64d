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
}
