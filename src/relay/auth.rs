//! Who may use the relay: a node key the control server knows and whose key
//! has not expired. The relay asks a [`NodeAuthorizer`] when a node connects
//! and again every `reauth_interval` while it stays connected.

use futures::future::BoxFuture;

use crate::key::Key;

/// Decides whether a node key may use the relay. The control server's
/// implementation asks its hub one typed question per check; a check
/// that does not answer in time counts as no.
pub trait NodeAuthorizer: Send + Sync {
    /// May `node` use the relay right now?
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn closures_are_authorizers() {
        let a: Arc<dyn NodeAuthorizer> = Arc::new(|k: &Key| k[0] == 7);
        assert!(a.allowed(&[7; 32]).await);
        assert!(!a.allowed(&[8; 32]).await);
    }
}
