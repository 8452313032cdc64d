//! The server's state directory: its lock, its Noise key, its admin socket path.

#![warn(missing_docs)]

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::daemon::config::write_secret;
use crate::dataplane::wg;
use crate::key::PrivateKey;
use secrecy::ExposeSecret;

/// Path of the admin socket in a state directory.
pub fn admin_socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("admin.sock")
}

/// Loads `state_dir/server.key`, creating it (0600) on first start.
/// Returns (private key, created).
pub fn load_or_create_server_key(state_dir: &Path) -> Result<(PrivateKey, bool)> {
    let path = state_dir.join("server.key");
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok((PrivateKey::from_base64(&s).with_context(|| format!("{} is not a valid key", path.display()))?, false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let k = wg::generate_private_key();
            write_secret(&path, format!("{}\n", k.to_base64().expose_secret()).as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            Ok((k, true))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// An exclusive lock on the state directory, held while a server runs.
pub(crate) struct DirLock(#[allow(dead_code)] std::fs::File);

pub(crate) fn lock_state_dir(dir: &Path) -> Result<DirLock> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("control.lock");
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(&path)?;
    // SAFETY: flock on a valid fd we own.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        bail!("another tailgate control server is running with state directory {}", dir.display());
    }
    Ok(DirLock(f))
}

/// Is a server holding the state directory's lock?
pub fn server_running(dir: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::OpenOptions::new().write(true).open(dir.join("control.lock")) else { return false };
    // SAFETY: flock on a valid fd we own; released when `f` drops.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    r != 0
}
