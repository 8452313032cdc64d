//! The tokio side of the stack: [`TcpStream`] and [`TcpListener`] share the
//! [`Stack`] through [`Shared`]'s mutex and wake the driver through its
//! `Notify` when they queue data or close. Everything protocol-shaped stays
//! in the parent module; these types only move bytes and wakers.
#![warn(missing_docs)]

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use smoltcp::iface::SocketHandle;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, mpsc};

use super::*;
use crate::key::Key;

/// The stack plus the handle that wakes its driver; shared with streams.
pub(crate) struct Shared {
    stack: Mutex<Stack>,
    pub(crate) wake: Notify,
}

impl Shared {
    pub(crate) fn new(stack: Stack) -> Arc<Self> {
        Arc::new(Shared { stack: Mutex::new(stack), wake: Notify::new() })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Stack> {
        self.stack.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A TCP connection over the tailnet.
pub struct TcpStream {
    shared: Arc<Shared>,
    handle: SocketHandle,
    local: SocketAddr,
    remote: SocketAddr,
    peer: Key,
    closed: bool,
    /// End of stream was reported; smoltcp forgets the FIN when TIME-WAIT
    /// expires, and a later read must not turn into a timeout error.
    eof: bool,
}

impl std::fmt::Debug for TcpStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpStream").field("local", &self.local).field("remote", &self.remote).finish()
    }
}

impl TcpStream {
    pub(crate) fn new(shared: Arc<Shared>, handle: SocketHandle, local: SocketAddr, remote: SocketAddr, peer: Key) -> Self {
        TcpStream { shared, handle, local, remote, peer, closed: false, eof: false }
    }

    #[cfg(test)]
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The remote tailnet address and port.
    pub fn peer_addr(&self) -> SocketAddr {
        self.remote
    }

    /// The WireGuard public key of the peer this connection runs through.
    pub fn peer_key(&self) -> Key {
        self.peer
    }

    /// Wait until an outbound connection is established (or fails).
    pub(crate) async fn established(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| {
            let mut st = self.shared.lock();
            let s = st.socket(self.handle);
            match s.state() {
                tcp::State::Established | tcp::State::CloseWait => Poll::Ready(Ok(())),
                tcp::State::SynSent | tcp::State::SynReceived => {
                    s.register_send_waker(cx.waker());
                    Poll::Pending
                }
                _ => Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionRefused, format!("{} refused the connection", self.remote)))),
            }
        })
        .await
    }

    /// Abort the connection with a RST.
    pub fn abort(&mut self) {
        self.shared.lock().abort_conn(self.handle, "this side aborted it");
        self.closed = true;
        self.shared.wake.notify_one();
    }
}

impl AsyncRead for TcpStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.eof {
            return Poll::Ready(Ok(()));
        }
        let mut st = self.shared.lock();
        let s = st.socket(self.handle);
        if s.can_recv() {
            let before = s.recv_queue();
            let cap = s.recv_capacity();
            let n = s.recv_slice(buf.initialize_unfilled()).map_err(|e| io::Error::other(e.to_string()))?;
            buf.advance(n);
            drop(st);
            // The peer may be waiting for window; smoltcp sends the update on
            // the next poll, so wake the driver when the window was tight.
            if before * 4 >= cap {
                self.shared.wake.notify_one();
            }
            return Poll::Ready(Ok(()));
        }
        if !s.may_recv() {
            // A clean FIN is end of stream; a reset or timeout must not look
            // like one, or a cut transfer would pass for a complete one.
            let error = st.close_error(self.handle, self.local, self.remote);
            drop(st);
            self.eof = error.is_none();
            return Poll::Ready(error.map_or(Ok(()), Err));
        }
        s.register_recv_waker(cx.waker());
        Poll::Pending
    }
}

impl AsyncWrite for TcpStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let mut st = self.shared.lock();
        let s = st.socket(self.handle);
        if !s.may_send() {
            let e = st.close_error(self.handle, self.local, self.remote);
            return Poll::Ready(Err(e.unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::BrokenPipe, format!("the connection to {} is closed for sending", self.remote))
            })));
        }
        if s.can_send() {
            let n = s.send_slice(data).map_err(|e| io::Error::other(e.to_string()))?;
            drop(st);
            self.shared.wake.notify_one();
            return Poll::Ready(Ok(n));
        }
        s.register_send_waker(cx.waker());
        Poll::Pending
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.closed {
            self.shared.lock().socket(self.handle).close();
            self.closed = true;
            self.shared.wake.notify_one();
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        let s = st.socket(self.handle);
        if !self.closed {
            s.close();
        }
        // Unread data means the application walked away mid-stream; tell the
        // peer now instead of after a timeout.
        if s.recv_queue() > 0 {
            s.abort();
        }
        st.conns.entry(self.handle).or_default().dropped = true;
        drop(st);
        self.shared.wake.notify_one();
    }
}

/// Accepts connections for one port; dropping it stops listening.
pub struct TcpListener {
    pub(crate) port: u16,
    pub(crate) rx: mpsc::Receiver<TcpStream>,
    pub(crate) shared: Arc<Shared>,
}

impl TcpListener {
    /// The next inbound connection that passed the inbound filter;
    /// `NotConnected` once the node has shut down.
    pub async fn accept(&mut self) -> io::Result<TcpStream> {
        self.rx.recv().await.ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "the node has shut down"))
    }
}

impl Drop for TcpListener {
    fn drop(&mut self) {
        self.shared.lock().unlisten(self.port);
    }
}
