//! The node's services on top of the data plane: control-mode agent, the
//! SSH listener glue, forwards, the local API, names, identities, audit
//! shipping, sign-in and metrics.
#![warn(missing_docs)]
pub mod agent;
pub(crate) mod config;
pub mod directory;
pub mod forward;
pub mod identity;
pub mod localapi;
pub(crate) mod metrics;
pub(crate) mod serve;
pub(crate) mod ship;
pub(crate) mod signin;
