//! Relay frames, sans-IO.
//!
//! After the HTTP upgrade and the Noise IK handshake (see [`super`]), both
//! directions carry [`crate::control::wire::frame`] frames inside the Noise channel,
//! exactly as the control protocol does; the payload of each frame is one
//! binary relay frame (not JSON: it sits on the data path):
//!
//! | type | name | direction | body |
//! |---|---|---|---|
//! | 1 | `Send` | node → relay | destination node key (32) \| datagram |
//! | 2 | `Recv` | relay → node | source node key (32) \| datagram |
//! | 3 | `KeepAlive` | both | — |
//! | 4 | `Accepted` | relay → node, first frame | keepalive interval, seconds (u16 BE) |
//! | 5 | `Closing` | relay → node, last frame | reason (UTF-8, ≤ [`MAX_REASON`] bytes) |
//! | 6 | `PeerGone` | relay → node | node key (32): the destination of a `Send` is not connected |
//!
//! Datagrams are opaque (WireGuard or disco bytes); the relay never parses
//! them. Decoding never panics; any malformed frame is an error and the
//! connection is closed (no resynchronisation).

use crate::key::Key;

/// Largest datagram a `Send`/`Recv` carries (a UDP datagram's maximum).
pub const MAX_DATAGRAM: usize = 65_535;
/// Largest `Closing` reason.
pub const MAX_REASON: usize = 1024;
/// Largest relay frame (type + key + datagram): the frame limit both ends
/// give their [`crate::control::wire::noise::SecureChannel`].
pub const MAX_FRAME: usize = 1 + 32 + MAX_DATAGRAM;

const T_SEND: u8 = 1;
const T_RECV: u8 = 2;
const T_KEEPALIVE: u8 = 3;
const T_ACCEPTED: u8 = 4;
const T_CLOSING: u8 = 5;
const T_PEER_GONE: u8 = 6;

/// One relay frame (the plaintext of one Noise transport message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Node → relay: forward `datagram` to node `dst`.
    Send {
        /// The destination node's key.
        dst: Key,
        /// The opaque datagram.
        datagram: &'a [u8],
    },
    /// Relay → node: `datagram` from node `src` (authenticated by the relay).
    Recv {
        /// The sending node's key.
        src: Key,
        /// The opaque datagram.
        datagram: &'a [u8],
    },
    /// Both ways: proof of life.
    KeepAlive,
    /// Relay → node: authorized; send keepalives this often.
    Accepted {
        /// Keepalive period, seconds.
        keepalive_secs: u16,
    },
    /// Relay → node: the relay hangs up, and why.
    Closing {
        /// What the node is told.
        reason: &'a str,
    },
    /// Relay → node: `key` is not connected, so a datagram to it was dropped.
    PeerGone {
        /// The destination that is not connected.
        key: Key,
    },
}

/// Why bytes are not a relay frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// No type byte.
    #[error("empty relay frame")]
    Empty,
    /// A type byte this build does not know.
    #[error("unknown relay frame type {0}")]
    UnknownType(u8),
    /// Shorter than its type requires.
    #[error("truncated relay frame (type {0})")]
    Truncated(u8),
    /// Longer than its type allows.
    #[error("relay frame of type {0} has trailing bytes")]
    Trailing(u8),
    /// A datagram over [`MAX_DATAGRAM`].
    #[error("datagram of {0} bytes exceeds the {MAX_DATAGRAM}-byte limit")]
    TooLarge(usize),
    #[error("closing reason is not UTF-8 or longer than {MAX_REASON} bytes")]
    /// A `Closing` reason that is not short UTF-8.
    BadReason,
}

fn key_at(b: &[u8], t: u8) -> Result<Key, FrameError> {
    b.get(..32).and_then(|k| k.try_into().ok()).ok_or(FrameError::Truncated(t))
}

impl<'a> Frame<'a> {
    /// Appends the encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Send { dst, datagram } => {
                out.push(T_SEND);
                out.extend_from_slice(dst);
                out.extend_from_slice(datagram);
            }
            Frame::Recv { src, datagram } => {
                out.push(T_RECV);
                out.extend_from_slice(src);
                out.extend_from_slice(datagram);
            }
            Frame::KeepAlive => out.push(T_KEEPALIVE),
            Frame::Accepted { keepalive_secs } => {
                out.push(T_ACCEPTED);
                out.extend_from_slice(&keepalive_secs.to_be_bytes());
            }
            Frame::Closing { reason } => {
                out.push(T_CLOSING);
                // Cut at a char boundary at most MAX_REASON bytes in.
                let mut end = reason.len().min(MAX_REASON);
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                out.extend_from_slice(&reason.as_bytes()[..end]);
            }
            Frame::PeerGone { key } => {
                out.push(T_PEER_GONE);
                out.extend_from_slice(key);
            }
        }
    }

    /// [`encode`](Self::encode) into a new vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }

    /// Parses one frame (borrowing the datagram from `b`).
    pub fn decode(b: &'a [u8]) -> Result<Frame<'a>, FrameError> {
        let (&t, rest) = b.split_first().ok_or(FrameError::Empty)?;
        let exact = |n: usize| match rest.len().cmp(&n) {
            std::cmp::Ordering::Less => Err(FrameError::Truncated(t)),
            std::cmp::Ordering::Greater => Err(FrameError::Trailing(t)),
            std::cmp::Ordering::Equal => Ok(()),
        };
        match t {
            T_SEND | T_RECV => {
                let key = key_at(rest, t)?;
                let datagram = &rest[32..];
                if datagram.len() > MAX_DATAGRAM {
                    return Err(FrameError::TooLarge(datagram.len()));
                }
                Ok(if t == T_SEND { Frame::Send { dst: key, datagram } } else { Frame::Recv { src: key, datagram } })
            }
            T_KEEPALIVE => exact(0).map(|_| Frame::KeepAlive),
            T_ACCEPTED => {
                exact(2)?;
                Ok(Frame::Accepted { keepalive_secs: u16::from_be_bytes([rest[0], rest[1]]) })
            }
            T_CLOSING => {
                if rest.len() > MAX_REASON {
                    return Err(FrameError::BadReason);
                }
                Ok(Frame::Closing { reason: std::str::from_utf8(rest).map_err(|_| FrameError::BadReason)? })
            }
            T_PEER_GONE => {
                exact(32)?;
                Ok(Frame::PeerGone { key: key_at(rest, t)? })
            }
            other => Err(FrameError::UnknownType(other)),
        }
    }
}

/// Appends `f` as one control-wire frame, encoded in place, to `plain`.
/// Many of these are sealed together (one Noise message per 64 KiB instead
/// of one per datagram); the receiver's frame decoder reads a byte stream,
/// so nodes and relays that seal one frame per message and those that
/// batch understand each other.
pub(crate) fn push_frame(f: &Frame<'_>, plain: &mut Vec<u8>) {
    crate::control::wire::frame::append_frame_with(plain, |p| f.encode(p));
}

/// The encoded `Recv { src, datagram }` for an encoded `Send { dst, datagram }`:
/// the one copy the relay makes of a datagram, straight from the buffer it
/// decrypted into. `None` if `f` is not a well-formed `Send`.
pub(crate) fn recv_from_send(f: &[u8], src: &Key) -> Option<Vec<u8>> {
    if f.len() < 33 || f[0] != T_SEND || f.len() - 33 > MAX_DATAGRAM {
        return None;
    }
    let mut r = Vec::with_capacity(f.len());
    r.push(T_RECV);
    r.extend_from_slice(src);
    r.extend_from_slice(&f[33..]);
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_frame_roundtrips() {
        let big = vec![0xEEu8; MAX_DATAGRAM];
        let frames = [
            Frame::Send { dst: [1; 32], datagram: b"\x04\x00\x00\x00wireguard" },
            Frame::Send { dst: [1; 32], datagram: b"" },
            Frame::Recv { src: [2; 32], datagram: &big },
            Frame::KeepAlive,
            Frame::Accepted { keepalive_secs: 30 },
            Frame::Closing { reason: "replaced by a newer connection" },
            Frame::Closing { reason: "" },
            Frame::PeerGone { key: [3; 32] },
        ];
        for f in frames {
            let v = f.to_vec();
            assert!(v.len() <= MAX_FRAME);
            assert_eq!(Frame::decode(&v), Ok(f));
        }
    }

    #[test]
    fn exact_bytes() {
        assert_eq!(Frame::KeepAlive.to_vec(), [3]);
        assert_eq!(Frame::Accepted { keepalive_secs: 0x0102 }.to_vec(), [4, 1, 2]);
        let mut s = vec![1u8];
        s.extend_from_slice(&[9; 32]);
        s.extend_from_slice(b"dg");
        assert_eq!(Frame::Send { dst: [9; 32], datagram: b"dg" }.to_vec(), s);
    }

    #[test]
    fn malformed_frames_are_errors() {
        assert_eq!(Frame::decode(&[]), Err(FrameError::Empty));
        assert_eq!(Frame::decode(&[0]), Err(FrameError::UnknownType(0)));
        assert_eq!(Frame::decode(&[7]), Err(FrameError::UnknownType(7)));
        assert_eq!(Frame::decode(&[1; 32]), Err(FrameError::Truncated(1)));
        assert_eq!(Frame::decode(&[3, 0]), Err(FrameError::Trailing(3)));
        assert_eq!(Frame::decode(&[4, 0]), Err(FrameError::Truncated(4)));
        assert_eq!(Frame::decode(&[6; 34]), Err(FrameError::Trailing(6)));
        assert_eq!(Frame::decode(&[5, 0xFF, 0xFE]), Err(FrameError::BadReason));
        let mut huge = vec![2u8; 33];
        huge.resize(33 + MAX_DATAGRAM + 1, 0);
        assert_eq!(Frame::decode(&huge), Err(FrameError::TooLarge(MAX_DATAGRAM + 1)));
    }

    #[test]
    fn long_reasons_are_cut_at_a_char_boundary() {
        let reason = "é".repeat(MAX_REASON); // 2 bytes each
        let v = Frame::Closing { reason: &reason }.to_vec();
        match Frame::decode(&v).unwrap() {
            Frame::Closing { reason: r } => assert_eq!(r.len(), MAX_REASON),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn batched_frames_decode_like_single_ones() {
        use crate::control::wire::frame::FrameDecoder;
        let frames = [
            Frame::Send { dst: [1; 32], datagram: b"one" },
            Frame::KeepAlive,
            Frame::Recv { src: [2; 32], datagram: &[7; 1400] },
            Frame::PeerGone { key: [3; 32] },
        ];
        let mut batched = Vec::new();
        for f in &frames {
            push_frame(f, &mut batched);
        }
        let mut single = Vec::new();
        for f in &frames {
            single.extend_from_slice(&crate::control::wire::frame::encode_frame(&f.to_vec()));
        }
        assert_eq!(batched, single, "the same bytes as frame-at-a-time sealing");
        let mut dec = FrameDecoder::new(MAX_FRAME);
        dec.push(&batched);
        for f in &frames {
            assert_eq!(Frame::decode(&dec.next_frame().unwrap().unwrap()).unwrap(), *f);
        }
        let mut raw = Vec::new();
        crate::control::wire::frame::append_frame(&Frame::KeepAlive.to_vec(), &mut raw);
        assert_eq!(raw, crate::control::wire::frame::encode_frame(&[3]));
    }

    #[test]
    fn a_send_becomes_a_recv() {
        let send = Frame::Send { dst: [1; 32], datagram: b"dg" }.to_vec();
        let recv = recv_from_send(&send, &[9; 32]).unwrap();
        assert_eq!(Frame::decode(&recv), Ok(Frame::Recv { src: [9; 32], datagram: b"dg" }));
        assert_eq!(recv_from_send(&Frame::KeepAlive.to_vec(), &[9; 32]), None);
        assert_eq!(recv_from_send(&[1; 32], &[9; 32]), None);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(f) = Frame::decode(&b) {
                prop_assert_eq!(f.to_vec(), b);
            }
        }
    }
}
