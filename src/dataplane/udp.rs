//! The WireGuard UDP socket: binding and kernel buffer sizes, in one place.
//!
//! Bulk TCP through the tunnel arrives in bursts (smoltcp emits a whole
//! congestion window per poll, a peer's kernel as fast as it can encrypt).
//! A datagram the kernel drops for want of buffer is a lost TCP segment, and
//! the stack that sent it pays a recovery for it, so the buffers are sized to
//! hold a burst at gigabit rates. The default `rmem_max`/`wmem_max` caps what
//! an unprivileged `SO_RCVBUF` gets; as root (the usual case for a VPN daemon)
//! `SO_RCVBUFFORCE` goes past the cap for this socket only, with no sysctl.

use std::io;
use std::net::SocketAddr;

use socket2::Socket;
use tokio::net::UdpSocket;

/// Requested receive and send buffer, per direction.
pub const BUFFER: usize = 8 * 1024 * 1024;

/// Bind the node's UDP socket at `addr` with large buffers; a wildcard
/// `addr` binds dual-stack (see [`crate::dataplane::dualstack`]).
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    crate::dataplane::dualstack::udp(addr, size_buffers)
}

/// Best effort: a smaller buffer only costs speed, never correctness.
fn size_buffers(sock: &Socket) {
    let _ = sock.set_recv_buffer_size(BUFFER);
    let _ = sock.set_send_buffer_size(BUFFER);
    // Linux reports twice the usable size it was given; below BUFFER means
    // the sysctl cap applied, so try the privileged option.
    if sock.recv_buffer_size().unwrap_or(0) < BUFFER {
        force(sock, libc::SO_RCVBUFFORCE);
    }
    if sock.send_buffer_size().unwrap_or(0) < BUFFER {
        force(sock, libc::SO_SNDBUFFORCE);
    }
    tracing::debug!(rcvbuf = sock.recv_buffer_size().unwrap_or(0), sndbuf = sock.send_buffer_size().unwrap_or(0), "UDP socket buffers");
}

fn force(sock: &Socket, option: libc::c_int) {
    use std::os::fd::AsRawFd;
    let size = BUFFER as libc::c_int;
    // SAFETY: a valid socket descriptor, and a pointer to an int that lives
    // for the duration of the call with its exact size as the length.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        // EPERM without CAP_NET_ADMIN: keep the capped size.
        tracing::debug!(option, error = %io::Error::last_os_error(), "could not raise the UDP buffer past the sysctl cap");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn binds_with_buffers_at_least_the_default() {
        let s = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let sock = socket2::SockRef::from(&s);
        // Whatever the privileges, never below what an unprivileged
        // request gets (the kernel's default is ~208 KiB).
        assert!(sock.recv_buffer_size().unwrap() >= 256 * 1024);
        assert!(sock.send_buffer_size().unwrap() >= 256 * 1024);
        assert!(s.local_addr().unwrap().port() != 0);
    }
}
