//! The node's services on top of the data plane: control-mode agent, the
//! SSH listener glue, forwards, the local API, names, identities, audit
//! shipping, sign-in and metrics.
pub mod agent;
pub mod config;
pub mod directory;
pub mod forward;
pub mod identity;
pub mod localapi;
pub mod metrics;
pub mod serve;
pub mod ship;
pub mod signin;
