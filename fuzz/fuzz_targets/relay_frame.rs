//! Relay frames (src/relay/proto.rs): the payload of every frame a relay
//! server reads from a connected node, and a node reads from the relay.
//!
//! Invariants: no panic; whatever decodes re-encodes to exactly the input
//! (the format has one encoding per frame) and stays within MAX_FRAME.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tailgate::relay::proto::{Frame, MAX_DATAGRAM, MAX_FRAME};

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = Frame::decode(data) {
        assert_eq!(f.to_vec(), data, "{f:?} does not re-encode to its input");
        assert!(data.len() <= MAX_FRAME);
        if let Frame::Send { datagram, .. } | Frame::Recv { datagram, .. } = f {
            assert!(datagram.len() <= MAX_DATAGRAM);
        }
    }
});
