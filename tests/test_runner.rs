//! The test command itself: without root, namespace tests are reported as
//! skipped (not passed), and missing Debian packages stop tests/run.sh with
//! the exact `apt-get install` line. Both are checked by running as
//! `nobody`, which needs root to switch to.
mod common;
use common::*;

use std::os::unix::fs::PermissionsExt;

/// A real namespace test: as root it builds and removes a namespace; as
/// anyone else it must report itself skipped.
#[test]
fn namespace_probe() {
    if !require(&["ip"]) {
        return;
    }
    let ns = Netns::new("tr");
    assert!(ns.exec("ip -o link show lo").contains("lo"));
}

/// `nobody` must be able to reach the file: copy it into a fresh 0755 dir.
fn world_readable_copy(dir: &std::path::Path, src: &std::path::Path, name: &str) -> String {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let dst = dir.join(name);
    std::fs::copy(src, &dst).unwrap();
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).unwrap();
    dst.display().to_string()
}

const AS_NOBODY: &str = "setpriv --reuid=65534 --regid=65534 --clear-groups";

#[test]
fn without_root_namespace_tests_are_reported_skipped() {
    if !require(&["setpriv"]) {
        return;
    }
    let dir = tempdir();
    let me = world_readable_copy(dir.path(), &std::env::current_exe().unwrap(), "test_runner-copy");
    let log = dir.path().join("skipped");
    std::fs::write(&log, "").unwrap();
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (code, out, err) =
        run_timeout(&format!("cd / && TAILGATE_SKIP_LOG={} {AS_NOBODY} {me} --exact namespace_probe", log.display()), 30);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("SKIPPED: namespace_probe: needs root"), "a visible SKIPPED line: {err}");
    assert_eq!(std::fs::read_to_string(&log).unwrap().trim(), "test_runner::namespace_probe", "counted by tests/run.sh");
}

#[test]
fn missing_packages_stop_with_the_apt_get_line() {
    if !require(&["setpriv", "dpkg"]) {
        return;
    }
    let dir = tempdir();
    let deps = world_readable_copy(dir.path(), std::path::Path::new("tests/deps.sh"), "deps.sh");
    let script = format!(". {deps}; TEST_PACKAGES=\"coreutils tailgate-no-such-package\"; ensure_test_packages; echo unreachable");
    let (code, out, err) = run_timeout(&format!("cd / && {AS_NOBODY} bash -c '{script}'"), 30);
    assert_ne!(code, 0, "{out}{err}");
    assert!(!out.contains("unreachable"), "stops at once: {out}");
    assert!(err.contains("sudo apt-get install -y --no-install-recommends tailgate-no-such-package\n"), "the exact line: {err}");
    // Everything installed: nothing to say, the caller goes on.
    let script = format!(". {deps}; TEST_PACKAGES=coreutils; ensure_test_packages; echo went-on");
    let (code, out, err) = run_timeout(&format!("cd / && {AS_NOBODY} bash -c '{script}'"), 30);
    assert_eq!((code, out.trim()), (0, "went-on"), "{err}");
}
