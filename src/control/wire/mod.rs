//! What a node and the control server (and its relay) both speak: the
//! framing, the Noise channel, the HTTP upgrade head, the messages and the
//! auth-key tokens. Sans-IO, no sockets.

pub mod chunk;
pub mod frame;
pub mod http;
pub mod noise;
pub mod proto;
pub mod token;
