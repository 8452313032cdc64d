//! Interactive sessions: stock `ssh -tt` runs on a pty we drive like a user
//! (type a command, read its output, resize the window, `exit`), and the
//! session recording replays with the real `asciinema cat` to exactly the
//! bytes the user's terminal received.

#[path = "common/ssh_harness.rs"]
mod ssh_harness;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ssh_harness::*;

fn policy(max_duration: Option<&str>) -> String {
    format!(
        r#"{POLICY_HEAD}
[[ssh]]
src = ["alice@example.com"]
dst = ["tag:test"]
users = ["root"]
action = "accept"
record = true
{}
"#,
        max_duration.map(|d| format!("max_duration = \"{d}\"")).unwrap_or_default()
    )
}

fn winsize(fd: i32, cols: u16, rows: u16) {
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    assert_eq!(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) }, 0);
}

/// A client terminal: `ssh -tt` on a pty whose master we hold.
struct Terminal {
    master: std::fs::File,
    seen: Arc<Mutex<Vec<u8>>>,
    child: KillOnDrop,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Terminal {
    fn open(mut cmd: Command, cols: u16, rows: u16) -> Terminal {
        let (mut m, mut s) = (0, 0);
        let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        assert_eq!(unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) }, 0);
        let (master, slave) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
        unsafe {
            libc::fcntl(master.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
            libc::fcntl(slave.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
        }
        cmd.stdin(Stdio::from(slave.try_clone().unwrap())).stdout(Stdio::from(slave.try_clone().unwrap())).stderr(Stdio::from(slave));
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                libc::ioctl(0, libc::TIOCSCTTY, 0);
                Ok(())
            });
        }
        let child = KillOnDrop(cmd.spawn().unwrap());
        drop(cmd); // closes our copies of the slave, so EOF/EIO comes when ssh exits
        let master = std::fs::File::from(master);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (mut r, seen2) = (master.try_clone().unwrap(), seen.clone());
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen2.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Terminal { master, seen, child, reader: Some(reader) }
    }

    fn seen(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }

    /// Waits until the output (from byte `from` on) contains `what`; returns the end offset.
    fn expect(&self, from: usize, what: &str) -> usize {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            {
                let v = self.seen.lock().unwrap();
                let text = String::from_utf8_lossy(&v[from.min(v.len())..]).into_owned();
                if let Some(i) = text.find(what) {
                    return from + text[..i].len() + what.len();
                }
            }
            if Instant::now() > deadline {
                panic!("terminal never showed {what:?}; got:\n{}", self.seen());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn len(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn type_line(&mut self, line: &str) {
        self.master.write_all(line.as_bytes()).unwrap();
        self.master.write_all(b"\r").unwrap();
    }

    /// Waits for the client to exit and the output to drain; returns (exit code, bytes seen).
    fn finish(mut self) -> (i32, Vec<u8>) {
        let st = wait_timeout(&mut self.child.0, Duration::from_secs(20)).expect("ssh did not exit");
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let v = self.seen.lock().unwrap().clone();
        (st.code().unwrap_or(-1), v)
    }
}

/// `asciinema cat FILE`, stdout captured from a pipe (exact bytes). asciinema
/// insists on opening /dev/tty, so it gets a pty as controlling terminal.
fn asciinema_cat(cast: &str) -> Out {
    let (mut m, mut s) = (0, 0);
    assert_eq!(unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), std::ptr::null(),) }, 0);
    let (_master, slave) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
    let mut cmd = Command::new("asciinema");
    cmd.arg("cat").arg(cast);
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            libc::ioctl(0, libc::TIOCSCTTY, 0);
            Ok(())
        });
    }
    let mut child = cmd.stdin(Stdio::from(slave)).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (mut so, mut se) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let ro = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let mut stderr = Vec::new();
    let _ = se.read_to_end(&mut stderr);
    let status = wait_timeout(&mut child, Duration::from_secs(30)).expect("asciinema cat timed out");
    Out { status, stdout: ro.join().unwrap(), stderr }
}

fn ssh_tt(s: &TestServer) -> Command {
    let mut c = s.ssh("root");
    c.arg("-tt").env("TERM", "xterm-256color").env_remove("LANG");
    c
}

#[test]
fn interactive_shell_resize_and_recording_replays() {
    let s = TestServer::start(&policy(None));
    let mut term = Terminal::open(ssh_tt(&s), 100, 30);

    // A login shell in root's home, on a terminal of the client's size.
    let start = s.wait_audit("session_start", |v| v["event"] == "session_start");
    assert_eq!(
        (start["kind"].as_str(), start["pty"].as_bool(), start["term"].as_str()),
        (Some("shell"), Some(true), Some("xterm-256color"))
    );
    let pos = term.len();
    term.type_line("echo hi-$((1+2)); echo \"$0 in $(pwd) on $(tty)\"");
    let pos = term.expect(pos, "hi-3");
    let pos = term.expect(pos, "-");
    let shell_line = term.seen()[pos - 1..].lines().next().unwrap().to_string();
    assert!(shell_line.contains(" in /root on /dev/pts/"), "login shell argv0 / home / tty: {shell_line:?}");

    term.type_line("stty size");
    let pos = term.expect(pos, "30 100");
    winsize(term.master.as_raw_fd(), 120, 40); // the kernel sends ssh SIGWINCH
    std::thread::sleep(Duration::from_millis(300));
    term.type_line("stty size");
    let pos = term.expect(pos, "40 120");

    // Multi-byte output in large chunks: characters get split across reads.
    term.type_line("for i in $(seq 1 3000); do printf '€✓'; done; echo; echo END-$((6*7))");
    let pos = term.expect(pos, "END-42");
    term.type_line("exit 0");
    let _ = pos;
    let (code, seen) = term.finish();
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&seen));

    let end = s.wait_audit("session_end", |v| v["event"] == "session_end");
    assert_eq!(end["exit_status"], 0);
    let cast = end["recording"].as_str().expect("recorded").to_string();
    assert_eq!(start["recording"].as_str(), Some(cast.as_str()));
    assert!(cast.ends_with(&format!("{}.cast", end["session"].as_str().unwrap())));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&cast).unwrap().permissions().mode() & 0o777, 0o600);

    let text = std::fs::read_to_string(&cast).unwrap();
    let mut lines = text.lines();
    let header: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!((header["version"].as_u64(), header["width"].as_u64(), header["height"].as_u64()), (Some(2), Some(100), Some(30)));
    assert!(header["timestamp"].as_u64().unwrap() > 1_600_000_000);
    let events: Vec<serde_json::Value> = lines.map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(events.iter().any(|e| e[1] == "r" && e[2] == "120x40"), "resize event missing");
    let mut last = 0.0;
    for e in &events {
        let t = e[0].as_f64().unwrap();
        assert!(t >= last, "time goes backwards");
        last = t;
    }

    let o = asciinema_cat(&cast);
    assert_eq!(o.code(), 0, "{o:?}");
    if o.stdout != seen {
        let common = o.stdout.iter().zip(&seen).take_while(|(a, b)| a == b).count();
        panic!(
            "asciinema cat differs from what the terminal got at byte {common} (replay {} bytes, terminal {} bytes)\nreplay: {:?}\nterminal: {:?}",
            o.stdout.len(),
            seen.len(),
            String::from_utf8_lossy(&o.stdout[common.saturating_sub(40)..(common + 40).min(o.stdout.len())]),
            String::from_utf8_lossy(&seen[common.saturating_sub(40)..(common + 40).min(seen.len())]),
        );
    }
}

#[test]
fn signals_reach_the_foreground_job() {
    let s = TestServer::start(&policy(None));
    let mut term = Terminal::open(ssh_tt(&s), 80, 24);
    let pos = term.len();
    let t0 = Instant::now();
    term.type_line("sleep 30");
    std::thread::sleep(Duration::from_millis(500));
    // ^C through the remote pty's line discipline interrupts the foreground job.
    term.master.write_all(&[3]).unwrap();
    term.type_line("echo after-$((2+3))");
    let pos = term.expect(pos, "after-5");
    assert!(t0.elapsed() < Duration::from_secs(20), "sleep was not interrupted");
    term.type_line("exit 7");
    let _ = pos;
    let (code, _) = term.finish();
    assert_eq!(code, 7);
}

#[test]
fn max_duration_ends_the_session() {
    let s = TestServer::start(&policy(Some("2s")));
    let t0 = Instant::now();
    let o = run(s.ssh("root").arg("sleep 30; echo not-reached"), b"", Duration::from_secs(20));
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
    assert_ne!(o.code(), 0, "{o:?}");
    assert!(o.err().contains("session time limit (2s) reached"), "{o:?}");
    assert!(!o.out().contains("not-reached"));
    let end = s.wait_audit("session_end", |v| v["event"] == "session_end");
    assert!(end["reason"].as_str().unwrap().contains("time limit"), "{end}");
}
