//! Caps on connections that have not authenticated yet.

#![warn(missing_docs)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Counts connections that have not authenticated yet, in total and per
/// source address. Until a peer has proven a node key it costs the server a
/// task, buffers and a handshake timer for nothing, so that is what gets a
/// cap; authenticated connections are bounded by the number of nodes.
pub(crate) struct PreAuthLimits {
    max_total: usize,
    max_per_ip: usize,
    state: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

impl PreAuthLimits {
    /// At most `max_total` unauthenticated connections, `max_per_ip` from one address.
    pub(crate) fn new(max_total: usize, max_per_ip: usize) -> Arc<PreAuthLimits> {
        Arc::new(PreAuthLimits { max_total, max_per_ip, state: Mutex::new((0, HashMap::new())) })
    }

    /// A permit for one more unauthenticated connection from `ip` (`None`:
    /// in-memory streams, counted in the total only), or `None` if a cap
    /// is reached.
    pub(crate) fn try_acquire(self: &Arc<Self>, ip: Option<IpAddr>) -> Option<PreAuthPermit> {
        // Nothing panics under this lock; recovering keeps the counts usable.
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.0 >= self.max_total {
            return None;
        }
        if let Some(ip) = ip {
            let n = st.1.entry(ip).or_insert(0);
            if *n >= self.max_per_ip {
                return None;
            }
            *n += 1;
        }
        st.0 += 1;
        Some(PreAuthPermit { limits: Some(self.clone()), ip })
    }

    /// Unauthenticated connections right now.
    pub(crate) fn current(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    fn release(&self, ip: Option<IpAddr>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0 = st.0.saturating_sub(1);
        if let Some(ip) = ip
            && let Some(n) = st.1.get_mut(&ip)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.1.remove(&ip);
            }
        }
    }
}

/// One unauthenticated connection's slot; freed when dropped.
pub struct PreAuthPermit {
    limits: Option<Arc<PreAuthLimits>>,
    ip: Option<IpAddr>,
}

impl PreAuthPermit {
    /// A permit that counts nowhere (handlers driven outside a server).
    pub fn none() -> PreAuthPermit {
        PreAuthPermit { limits: None, ip: None }
    }
}

impl Drop for PreAuthPermit {
    fn drop(&mut self) {
        if let Some(l) = self.limits.take() {
            l.release(self.ip);
        }
    }
}
