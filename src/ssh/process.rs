//! Spawning session processes as the login user, on a pty or on pipes.
//!
//! Every descriptor tailgate opens is close-on-exec, and the child
//! additionally marks everything above stderr close-on-exec before exec, so a
//! session never inherits sockets or keys of the daemon. Each process starts
//! its own session (setsid), so its process id is also the process group we
//! signal when the SSH session ends.
#![warn(missing_docs)]

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use russh::Pty;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::SshError;
use super::account::Account;

/// Terminal parameters from a `pty-req`.
#[derive(Clone, Debug, Default)]
pub(crate) struct PtyParams {
    pub term: String,
    pub cols: u32,
    pub rows: u32,
    pub px_width: u32,
    pub px_height: u32,
    pub modes: Vec<(Pty, u32)>,
}

/// What to run.
pub(crate) struct SpawnSpec {
    pub program: PathBuf,
    /// argv[0] (e.g. `-bash` for a login shell).
    pub arg0: OsString,
    pub args: Vec<OsString>,
    pub env: Vec<(String, String)>,
    pub account: Account,
    pub pty: Option<PtyParams>,
    /// Switch to the account's uid/gid/groups (only possible, and only done, as root).
    pub switch_user: bool,
}

/// The child side handed back to the session.
pub(crate) enum ChildIo {
    Pipes { stdin: tokio::process::ChildStdin, stdout: tokio::process::ChildStdout, stderr: tokio::process::ChildStderr },
    Pty { master: PtyMaster },
}

pub(crate) struct Spawned {
    pub child: tokio::process::Child,
    /// Process group (== pid, the child called setsid).
    pub pgid: i32,
    pub io: ChildIo,
}

/// Opens a pty pair with both ends close-on-exec. Returns (master, slave, slave path).
fn open_pty() -> Result<(OwnedFd, OwnedFd, String), SshError> {
    use nix::errno::Errno;
    // SAFETY: plain libc calls on descriptors we own; results are checked.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if m < 0 {
            return Err(Errno::last().into());
        }
        let master = OwnedFd::from_raw_fd(m);
        if libc::grantpt(m) != 0 || libc::unlockpt(m) != 0 {
            return Err(Errno::last().into());
        }
        let mut buf = [0 as libc::c_char; 128];
        if libc::ptsname_r(m, buf.as_mut_ptr(), buf.len()) != 0 {
            return Err(Errno::last().into());
        }
        let name = std::ffi::CStr::from_ptr(buf.as_ptr()).to_owned();
        let s = libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if s < 0 {
            return Err(Errno::last().into());
        }
        Ok((master, OwnedFd::from_raw_fd(s), name.to_string_lossy().into_owned()))
    }
}

pub(crate) fn set_winsize(fd: RawFd, cols: u32, rows: u32, px_w: u32, px_h: u32) {
    let clamp = |v: u32| v.min(u16::MAX as u32) as u16;
    let ws = libc::winsize { ws_row: clamp(rows), ws_col: clamp(cols), ws_xpixel: clamp(px_w), ws_ypixel: clamp(px_h) };
    // SAFETY: TIOCSWINSZ reads a winsize struct we own; failure is harmless.
    unsafe {
        libc::ioctl(fd, libc::TIOCSWINSZ, &ws);
    }
}

/// Applies the client's terminal modes (RFC 4254 §8) to the slave, as sshd does;
/// unknown or unsupported opcodes are ignored.
fn apply_modes(fd: RawFd, modes: &[(Pty, u32)]) {
    // SAFETY: termios is plain data; tcgetattr fills it, we check the result.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return;
    }
    fn flag(f: &mut libc::tcflag_t, bit: libc::tcflag_t, on: bool) {
        if on { *f |= bit } else { *f &= !bit }
    }
    for &(op, v) in modes {
        let on = v != 0;
        let cc = |t: &mut libc::termios, i: usize| t.c_cc[i] = if v == 255 { 0 } else { v as libc::cc_t };
        match op {
            Pty::VINTR => cc(&mut t, libc::VINTR),
            Pty::VQUIT => cc(&mut t, libc::VQUIT),
            Pty::VERASE => cc(&mut t, libc::VERASE),
            Pty::VKILL => cc(&mut t, libc::VKILL),
            Pty::VEOF => cc(&mut t, libc::VEOF),
            Pty::VEOL => cc(&mut t, libc::VEOL),
            Pty::VEOL2 => cc(&mut t, libc::VEOL2),
            Pty::VSTART => cc(&mut t, libc::VSTART),
            Pty::VSTOP => cc(&mut t, libc::VSTOP),
            Pty::VSUSP => cc(&mut t, libc::VSUSP),
            Pty::VREPRINT => cc(&mut t, libc::VREPRINT),
            Pty::VWERASE => cc(&mut t, libc::VWERASE),
            Pty::VLNEXT => cc(&mut t, libc::VLNEXT),
            Pty::VDISCARD => cc(&mut t, libc::VDISCARD),
            Pty::IGNPAR => flag(&mut t.c_iflag, libc::IGNPAR, on),
            Pty::PARMRK => flag(&mut t.c_iflag, libc::PARMRK, on),
            Pty::INPCK => flag(&mut t.c_iflag, libc::INPCK, on),
            Pty::ISTRIP => flag(&mut t.c_iflag, libc::ISTRIP, on),
            Pty::INLCR => flag(&mut t.c_iflag, libc::INLCR, on),
            Pty::IGNCR => flag(&mut t.c_iflag, libc::IGNCR, on),
            Pty::ICRNL => flag(&mut t.c_iflag, libc::ICRNL, on),
            Pty::IUCLC => flag(&mut t.c_iflag, libc::IUCLC, on),
            Pty::IXON => flag(&mut t.c_iflag, libc::IXON, on),
            Pty::IXANY => flag(&mut t.c_iflag, libc::IXANY, on),
            Pty::IXOFF => flag(&mut t.c_iflag, libc::IXOFF, on),
            Pty::IMAXBEL => flag(&mut t.c_iflag, libc::IMAXBEL, on),
            Pty::IUTF8 => flag(&mut t.c_iflag, libc::IUTF8, on),
            Pty::ISIG => flag(&mut t.c_lflag, libc::ISIG, on),
            Pty::ICANON => flag(&mut t.c_lflag, libc::ICANON, on),
            Pty::ECHO => flag(&mut t.c_lflag, libc::ECHO, on),
            Pty::ECHOE => flag(&mut t.c_lflag, libc::ECHOE, on),
            Pty::ECHOK => flag(&mut t.c_lflag, libc::ECHOK, on),
            Pty::ECHONL => flag(&mut t.c_lflag, libc::ECHONL, on),
            Pty::NOFLSH => flag(&mut t.c_lflag, libc::NOFLSH, on),
            Pty::TOSTOP => flag(&mut t.c_lflag, libc::TOSTOP, on),
            Pty::IEXTEN => flag(&mut t.c_lflag, libc::IEXTEN, on),
            Pty::ECHOCTL => flag(&mut t.c_lflag, libc::ECHOCTL, on),
            Pty::ECHOKE => flag(&mut t.c_lflag, libc::ECHOKE, on),
            Pty::PENDIN => flag(&mut t.c_lflag, libc::PENDIN, on),
            Pty::OPOST => flag(&mut t.c_oflag, libc::OPOST, on),
            Pty::OLCUC => flag(&mut t.c_oflag, libc::OLCUC, on),
            Pty::ONLCR => flag(&mut t.c_oflag, libc::ONLCR, on),
            Pty::OCRNL => flag(&mut t.c_oflag, libc::OCRNL, on),
            Pty::ONOCR => flag(&mut t.c_oflag, libc::ONOCR, on),
            Pty::ONLRET => flag(&mut t.c_oflag, libc::ONLRET, on),
            Pty::CS7 if on => t.c_cflag = (t.c_cflag & !libc::CSIZE) | libc::CS7,
            Pty::CS8 if on => t.c_cflag = (t.c_cflag & !libc::CSIZE) | libc::CS8,
            Pty::PARENB => flag(&mut t.c_cflag, libc::PARENB, on),
            Pty::PARODD => flag(&mut t.c_cflag, libc::PARODD, on),
            _ => {}
        }
    }
    // SAFETY: as above.
    unsafe {
        libc::tcsetattr(fd, libc::TCSANOW, &t);
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

static TTY_GID: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();

/// Looks up group `tty` once. An NSS lookup can block (LDAP, sssd), so the
/// SSH server calls this at startup, off the async workers.
pub(crate) fn init_tty_gid() -> Option<u32> {
    *TTY_GID.get_or_init(|| nix::unistd::Group::from_name("tty").ok().flatten().map(|g| g.gid.as_raw()))
}

fn tty_gid() -> Option<u32> {
    // Not initialised (the module used without an SshServer): look up now.
    TTY_GID.get().copied().unwrap_or_else(init_tty_gid)
}

/// Spawns `spec`. Must be called within a tokio runtime.
pub(crate) fn spawn(spec: SpawnSpec) -> Result<Spawned, SshError> {
    let program_name = spec.program.display().to_string();
    let spawn_err = |e: io::Error| SshError::Spawn { program: program_name.clone(), source: e };

    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.arg0(&spec.arg0).args(&spec.args).env_clear().envs(spec.env.iter().map(|(k, v)| (k, v)));
    // Dropping the Child (runtime shutdown) must not leave the process behind.
    cmd.kill_on_drop(true);

    let mut pty = None;
    if let Some(p) = &spec.pty {
        let (master, slave, name) = open_pty()?;
        apply_modes(slave.as_raw_fd(), &p.modes);
        set_winsize(master.as_raw_fd(), p.cols, p.rows, p.px_width, p.px_height);
        if spec.switch_user {
            // As sshd does: the user owns their terminal, group tty may write to it.
            let tty_gid = tty_gid().unwrap_or(spec.account.gid);
            // SAFETY: fchown/fchmod on a descriptor we own.
            unsafe {
                libc::fchown(slave.as_raw_fd(), spec.account.uid, tty_gid);
                libc::fchmod(slave.as_raw_fd(), 0o620);
            }
        }
        let s_in = slave.try_clone().map_err(spawn_err)?;
        let s_out = slave.try_clone().map_err(spawn_err)?;
        cmd.stdin(Stdio::from(s_in)).stdout(Stdio::from(s_out)).stderr(Stdio::from(slave));
        cmd.env("SSH_TTY", &name);
        pty = Some((master, name));
    } else {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    }

    // Everything the child needs is prepared here: between fork and exec only
    // async-signal-safe calls are allowed (no allocation, no NSS lookups).
    let home = CString::new(spec.account.home.as_os_str().as_bytes()).unwrap_or_else(|_| c"/".into());
    let groups: Vec<libc::gid_t> = spec.account.groups.clone();
    let (uid, gid) = (spec.account.uid, spec.account.gid);
    let switch_user = spec.switch_user;
    let want_ctty = pty.is_some();
    // SAFETY: the closure only performs async-signal-safe syscalls on data
    // prepared above.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if want_ctty && libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            if switch_user {
                if libc::setgroups(groups.len() as _, groups.as_ptr()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // Paranoia, as in OpenSSH: privileges must be gone for good.
                if uid != 0 && libc::setuid(0) == 0 {
                    return Err(io::Error::from_raw_os_error(libc::EPERM));
                }
            }
            if libc::chdir(home.as_ptr()) != 0 {
                libc::chdir(c"/".as_ptr());
            }
            // Defence in depth against descriptors some library opened without
            // O_CLOEXEC. CLOEXEC rather than close keeps std's exec-error pipe working.
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
            Ok(())
        });
    }

    let mut child = cmd.spawn().map_err(spawn_err)?;
    let pgid = child.id().map(|p| p as i32).unwrap_or(-1);
    let io = match pty {
        Some((master, _tty_name)) => ChildIo::Pty { master: PtyMaster::new(master).map_err(spawn_err)? },
        None => ChildIo::Pipes {
            stdin: child.stdin.take().ok_or_else(|| spawn_err(io::ErrorKind::BrokenPipe.into()))?,
            stdout: child.stdout.take().ok_or_else(|| spawn_err(io::ErrorKind::BrokenPipe.into()))?,
            stderr: child.stderr.take().ok_or_else(|| spawn_err(io::ErrorKind::BrokenPipe.into()))?,
        },
    };
    Ok(Spawned { child, pgid, io })
}

/// Sends `sig` to a whole process group; a vanished group is not an error.
pub(crate) fn signal_group(pgid: i32, sig: i32) {
    if pgid > 1 {
        // SAFETY: kill(2) with a negative pid addresses the group.
        unsafe {
            libc::kill(-pgid, sig);
        }
    }
}

/// The pty master, readable and writable concurrently from async tasks.
#[derive(Clone)]
pub(crate) struct PtyMaster(Arc<AsyncFd<OwnedFd>>);

impl PtyMaster {
    fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(fd.as_raw_fd())?;
        // SAFETY: the OwnedFd is moved into the AsyncFd and never replaced or
        // closed while registered.
        let afd = unsafe { AsyncFd::register(fd) }.map_err(|e| io::Error::other(e.to_string()))?;
        Ok(PtyMaster(Arc::new(afd)))
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.0.get_ref().as_raw_fd()
    }
}

impl AsyncRead for PtyMaster {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let res = guard.try_io(|fd| {
                // SAFETY: reading into an initialized buffer we own.
                let n = unsafe { libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len()) };
                if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
            });
            match res {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // EIO: every slave descriptor is closed, i.e. the terminal hung up: EOF.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for PtyMaster {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            let res = guard.try_io(|fd| {
                // SAFETY: writing from a buffer we borrow.
                let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
                if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
            });
            match res {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Maps a signal number to the SSH signal name (RFC 4254 §6.10, without "SIG").
pub(crate) fn signal_name(sig: i32) -> String {
    match nix::sys::signal::Signal::try_from(sig) {
        Ok(s) => s.as_str().trim_start_matches("SIG").to_string(),
        Err(_) => format!("{sig}"),
    }
}

/// Maps an SSH signal name to a number.
pub(crate) fn signal_number(name: &str) -> Option<i32> {
    use std::str::FromStr;
    nix::sys::signal::Signal::from_str(&format!("SIG{name}")).ok().map(|s| s as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names_round_trip() {
        assert_eq!(signal_name(libc::SIGTERM), "TERM");
        assert_eq!(signal_name(libc::SIGKILL), "KILL");
        assert_eq!(signal_number("INT"), Some(libc::SIGINT));
        assert_eq!(signal_number("WINCH"), Some(libc::SIGWINCH));
        assert_eq!(signal_number("NOPE"), None);
    }

    #[test]
    fn pty_pair_is_cloexec() {
        let (m, s, name) = open_pty().unwrap();
        assert!(name.starts_with("/dev/pts/"));
        for fd in [m.as_raw_fd(), s.as_raw_fd()] {
            let fl = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            assert!(fl & libc::FD_CLOEXEC != 0);
        }
    }
}
