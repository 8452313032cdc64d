//! Who may use the relay: a node key the control server knows and whose key
//! has not expired. The relay asks a [`NodeAuthorizer`] when a node connects
//! and again every `reauth_interval` while it stays connected.

use std::collections::HashSet;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;

use crate::key::Key;

/// Decides whether a node key may use the relay.
pub trait NodeAuthorizer: Send + Sync {
    fn allowed<'a>(&'a self, node: &'a Key) -> BoxFuture<'a, bool>;
}

/// Any `Fn(&Key) -> bool` is an authorizer (tests, static tables).
impl<F> NodeAuthorizer for F
where
    F: Fn(&Key) -> bool + Send + Sync,
{
    fn allowed<'a>(&'a self, node: &'a Key) -> BoxFuture<'a, bool> {
        Box::pin(std::future::ready(self(node)))
    }
}

/// Fetches the set of keys allowed right now (e.g. from the control hub).
pub type KeySetFetch = Box<dyn Fn() -> BoxFuture<'static, Result<HashSet<Key>, String>> + Send + Sync>;

/// An authorizer over a fetched key set, cached so that a storm of
/// connections (every node reconnecting after a restart) costs a few
/// fetches, not one each:
///
/// - a key present in a set fetched less than `max_age` ago is allowed
///   without a fetch (so a revoked key may be used for up to `max_age`
///   more, and a connected node is dropped at its next re-check);
/// - otherwise the caller waits for a fetch that *started after it asked*
///   (concurrent callers share one), so a node that has just registered is
///   never refused for a stale cache;
/// - fetches are at least `min_interval` apart;
/// - if a fetch fails, the last set is used while it is younger than
///   `max_stale`, then everything is refused.
pub struct CachedKeySet {
    fetch: KeySetFetch,
    pub max_age: Duration,
    pub min_interval: Duration,
    pub max_stale: Duration,
    state: tokio::sync::Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    keys: HashSet<Key>,
    /// When the fetch that produced `keys` started.
    fetched_at: Option<Instant>,
    last_attempt: Option<Instant>,
    fetches: u64,
}

impl CachedKeySet {
    /// Defaults: `max_age` 2 s, `min_interval` 100 ms, `max_stale` 60 s.
    pub fn new(fetch: KeySetFetch) -> CachedKeySet {
        CachedKeySet {
            fetch,
            max_age: Duration::from_secs(2),
            min_interval: Duration::from_millis(100),
            max_stale: Duration::from_secs(60),
            state: tokio::sync::Mutex::new(CacheState::default()),
        }
    }

    /// Fetches made so far (successful or not).
    pub async fn fetches(&self) -> u64 {
        self.state.lock().await.fetches
    }

    async fn check(&self, key: &Key) -> bool {
        let asked = Instant::now();
        let mut st = self.state.lock().await;
        if let Some(t) = st.fetched_at {
            if t >= asked {
                return st.keys.contains(key);
            }
            if asked.duration_since(t) < self.max_age && st.keys.contains(key) {
                return true;
            }
        }
        if let Some(a) = st.last_attempt {
            tokio::time::sleep_until(a + self.min_interval).await;
        }
        let started = Instant::now();
        st.last_attempt = Some(started);
        st.fetches += 1;
        match (self.fetch)().await {
            Ok(keys) => {
                st.keys = keys;
                st.fetched_at = Some(started);
                st.keys.contains(key)
            }
            Err(e) => {
                tracing::warn!("relay: cannot fetch the allowed node keys: {e}");
                st.fetched_at.is_some_and(|t| t.elapsed() < self.max_stale) && st.keys.contains(key)
            }
        }
    }
}

impl NodeAuthorizer for CachedKeySet {
    fn allowed<'a>(&'a self, node: &'a Key) -> BoxFuture<'a, bool> {
        Box::pin(self.check(node))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    fn fetcher(set: Arc<Mutex<HashSet<Key>>>, calls: Arc<AtomicUsize>, fail: Arc<Mutex<bool>>) -> KeySetFetch {
        Box::new(move || {
            let (set, calls, fail) = (set.clone(), calls.clone(), fail.clone());
            Box::pin(async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
                if *fail.lock().unwrap() { Err("hub gone".into()) } else { Ok(set.lock().unwrap().clone()) }
            })
        })
    }

    fn fast(fetch: KeySetFetch) -> CachedKeySet {
        let mut c = CachedKeySet::new(fetch);
        c.max_age = Duration::from_millis(300);
        c.min_interval = Duration::from_millis(30);
        c.max_stale = Duration::from_millis(900);
        c
    }

    #[tokio::test]
    async fn cache_hits_misses_revocation_and_failures() {
        let set = Arc::new(Mutex::new(HashSet::from([[1u8; 32]])));
        let calls = Arc::new(AtomicUsize::new(0));
        let fail = Arc::new(Mutex::new(false));
        let auth = fast(fetcher(set.clone(), calls.clone(), fail.clone()));
        assert!(auth.allowed(&[1; 32]).await);
        assert!(auth.allowed(&[1; 32]).await);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "second check is a cache hit");
        // A key registered just now: the miss fetches again.
        set.lock().unwrap().insert([2; 32]);
        assert!(auth.allowed(&[2; 32]).await);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // Unknown keys are refused (each miss fetches, paced).
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(!auth.allowed(&[9; 32]).await);
        }
        assert!(t0.elapsed() >= Duration::from_millis(120), "misses are paced by min_interval");
        assert_eq!(calls.load(Ordering::SeqCst), 7);
        // Revocation takes effect once the entry is older than max_age.
        set.lock().unwrap().remove(&[1; 32]);
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(!auth.allowed(&[1; 32]).await);
        // Fetch failures: the last set holds for max_stale, then nothing.
        *fail.lock().unwrap() = true;
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(auth.allowed(&[2; 32]).await, "stale but recent set");
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(!auth.allowed(&[2; 32]).await, "too stale");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_misses_share_a_fetch() {
        let set = Arc::new(Mutex::new(HashSet::from([[1u8; 32]])));
        let calls = Arc::new(AtomicUsize::new(0));
        let auth = Arc::new(fast(fetcher(set, calls.clone(), Arc::new(Mutex::new(false)))));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let a = auth.clone();
            tasks.push(tokio::spawn(async move { a.allowed(&[1; 32]).await }));
        }
        for t in tasks {
            assert!(t.await.unwrap());
        }
        // The first fetch serves every caller that asked before it started;
        // later ones hit the (fresh) cache.
        assert!(calls.load(Ordering::SeqCst) <= 2, "{} fetches", calls.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn closures_are_authorizers() {
        let a: Arc<dyn NodeAuthorizer> = Arc::new(|k: &Key| k[0] == 7);
        assert!(a.allowed(&[7; 32]).await);
        assert!(!a.allowed(&[8; 32]).await);
    }
}
