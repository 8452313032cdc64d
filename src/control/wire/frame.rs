//! Framing, sans-IO. Two layers:
//!
//! 1. **Wire messages** (below Noise): `[u16 BE length][length bytes]`, one
//!    Noise message each (handshake or transport), at most 65535 bytes as the
//!    Noise spec requires. [`WireDecoder`] splits a byte stream into them.
//! 2. **Frames** (above Noise, in the decrypted byte stream):
//!    `[u8 version][u32 BE length][length bytes of JSON]`. A frame may span
//!    several Noise messages, so maps larger than 64 KiB are fine; each side
//!    enforces its own maximum and refuses a bigger length *before* buffering
//!    it. [`FrameDecoder`] yields complete frame payloads.
//!
//! Malformed input is an error value, never a panic; after an error the
//! connection is closed (there is no resynchronisation).
#![warn(missing_docs)]

use bytes::{Buf, BytesMut};

use crate::control::PROTOCOL_VERSION;

/// Largest Noise message (spec limit).
pub(crate) const MAX_WIRE_MESSAGE: usize = 65535;
/// Bytes of a frame header: version + u32 length.
pub(crate) const FRAME_HEADER: usize = 5;
/// Default limit on frames a node may send (its messages are small).
pub(crate) const DEFAULT_MAX_CLIENT_FRAME: usize = 64 * 1024;
/// Default limit on frames the server may send (full maps can be large).
pub(crate) const DEFAULT_MAX_SERVER_FRAME: usize = 64 * 1024 * 1024;

/// Why a byte stream is not valid framing; the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A frame header announces more than this side accepts.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Length the header announces.
        len: usize,
        /// This decoder's limit.
        max: usize,
    },
    /// The frame's version byte is not [`PROTOCOL_VERSION`] (an older or
    /// newer peer, or not our protocol at all).
    #[error("frame speaks protocol version {got}, this build speaks version {PROTOCOL_VERSION}")]
    Version {
        /// The version byte received.
        got: u8,
    },
    /// A wire message of length 0 (Noise never sends one).
    #[error("empty Noise message (length 0)")]
    EmptyWireMessage,
}

/// Prefix `msg` (a Noise message) with its u16 length.
pub fn encode_wire(msg: &[u8], out: &mut Vec<u8>) {
    debug_assert!(!msg.is_empty() && msg.len() <= MAX_WIRE_MESSAGE);
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// Splits a byte stream into u16-length-prefixed messages.
#[derive(Default)]
pub struct WireDecoder {
    buf: BytesMut,
}

impl WireDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, if buffered.
    pub fn next_message(&mut self) -> Result<Option<BytesMut>, FrameError> {
        if self.buf.len() < 2 {
            return Ok(None);
        }
        let len = u16::from_be_bytes([self.buf[0], self.buf[1]]) as usize;
        if len == 0 {
            return Err(FrameError::EmptyWireMessage);
        }
        if self.buf.len() < 2 + len {
            return Ok(None);
        }
        self.buf.advance(2);
        Ok(Some(self.buf.split_to(len)))
    }

    /// Bytes buffered but not yet returned.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// How many more bytes the message being buffered needs before
    /// [`next_message`](Self::next_message) can return it (or its length
    /// can be read); 0 when nothing is buffered.
    pub(crate) fn missing(&self) -> usize {
        match self.buf.len() {
            0 => 0,
            1 => 1,
            n => (2 + u16::from_be_bytes([self.buf[0], self.buf[1]]) as usize).saturating_sub(n),
        }
    }
}

/// Reads the frame header at the start of `buf`: the payload length once the
/// whole frame is in `buf`, `None` while it is incomplete. Version and size
/// are checked as soon as the header is in, so an oversized frame is
/// refused without waiting for (or buffering) its body. Lets a reader that
/// keeps decrypted bytes in its own buffer take frames where they lie
/// instead of copying them through a [`FrameDecoder`].
pub(crate) fn frame_at(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    let Some(&v) = buf.first() else { return Ok(None) };
    if v != PROTOCOL_VERSION {
        return Err(FrameError::Version { got: v });
    }
    let Some(h) = buf.get(1..FRAME_HEADER) else { return Ok(None) };
    let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok((buf.len() >= FRAME_HEADER + len).then_some(len))
}

/// Header + payload of one frame.
pub fn encode_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER + payload.len());
    append_frame(payload, &mut out);
    out
}

/// Appends header + payload of one frame to `out`. Many frames may be
/// sealed together: [`FrameDecoder`] reads a byte stream.
pub(crate) fn append_frame(payload: &[u8], out: &mut Vec<u8>) {
    append_frame_with(out, |o| o.extend_from_slice(payload));
}

/// Appends one frame whose payload `write` appends to `out` in place (no
/// intermediate buffer); the length is filled in afterwards.
pub(crate) fn append_frame_with(out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.push(PROTOCOL_VERSION);
    out.extend_from_slice(&[0; 4]);
    write(out);
    let len = (out.len() - start - FRAME_HEADER) as u32;
    out[start + 1..start + FRAME_HEADER].copy_from_slice(&len.to_be_bytes());
}

/// Reassembles frames from decrypted bytes, enforcing a maximum size.
pub struct FrameDecoder {
    buf: BytesMut,
    max: usize,
}

impl FrameDecoder {
    /// A decoder refusing frames longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        FrameDecoder { buf: BytesMut::new(), max }
    }

    /// Appends decrypted bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame payload. Checks version and size as soon as
    /// the header is in, so an oversized frame is refused without waiting
    /// for (or buffering) its body.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let Some(len) = frame_at(&self.buf, self.max)? else { return Ok(None) };
        self.buf.advance(FRAME_HEADER);
        Ok(Some(self.buf.split_to(len).to_vec()))
    }

    /// Moves the buffered (not yet returned) bytes to the end of `out`.
    pub(crate) fn take_into(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.buf);
        self.buf.clear();
    }

    /// Bytes buffered but not yet returned.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_roundtrip_byte_by_byte() {
        let mut stream = encode_frame(b"hello");
        stream.extend(encode_frame(b""));
        stream.extend(encode_frame(&[7u8; 1000]));
        let mut d = FrameDecoder::new(4096);
        let mut got = Vec::new();
        for b in stream {
            d.push(&[b]);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, vec![b"hello".to_vec(), vec![], vec![7u8; 1000]]);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn oversized_frame_refused_from_header_alone() {
        let mut d = FrameDecoder::new(100);
        let mut hdr = vec![PROTOCOL_VERSION];
        hdr.extend_from_slice(&101u32.to_be_bytes());
        d.push(&hdr);
        assert_eq!(d.next_frame(), Err(FrameError::TooLarge { len: 101, max: 100 }));
        let mut d = FrameDecoder::new(100);
        d.push(&[PROTOCOL_VERSION, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(d.next_frame(), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn wrong_version_refused() {
        let mut d = FrameDecoder::new(100);
        d.push(b"GET / HTTP/1.1\r\n");
        assert_eq!(d.next_frame(), Err(FrameError::Version { got: b'G' }));
        let e = FrameError::Version { got: 9 }.to_string();
        assert!(e.contains("version 9") && e.contains("version 1"), "{e}");
    }

    #[test]
    fn wire_messages_split() {
        let mut out = Vec::new();
        encode_wire(b"abc", &mut out);
        encode_wire(&[1u8; 65535], &mut out);
        let mut d = WireDecoder::new();
        d.push(&out[..4]);
        assert!(d.next_message().unwrap().is_none());
        d.push(&out[4..]);
        assert_eq!(&d.next_message().unwrap().unwrap()[..], b"abc");
        assert_eq!(d.next_message().unwrap().unwrap().len(), 65535);
        assert!(d.next_message().unwrap().is_none());
        let mut d = WireDecoder::new();
        d.push(&[0, 0, 1]);
        assert_eq!(d.next_message(), Err(FrameError::EmptyWireMessage));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap fuzz: every prefix of some structured garbage.
        let mut seed = 0x1234_5678u32;
        for round in 0..200 {
            let mut bytes = Vec::new();
            for _ in 0..(round * 7 % 300) {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                bytes.push((seed >> 16) as u8);
            }
            if round % 3 == 0 && !bytes.is_empty() {
                bytes[0] = PROTOCOL_VERSION;
            }
            let mut f = FrameDecoder::new(64);
            f.push(&bytes);
            while let Ok(Some(_)) = f.next_frame() {}
            let mut w = WireDecoder::new();
            w.push(&bytes);
            while let Ok(Some(_)) = w.next_message() {}
        }
    }
}
