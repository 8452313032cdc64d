//! Noise IK over `snow`, sans-IO.
//!
//! `Noise_IK_25519_ChaChaPoly_BLAKE2s`, prologue `tailgate-control/1`. The
//! node is the initiator; its static key is its WireGuard x25519 key, so the
//! server learns (and authenticates) the node key from the handshake itself.
//! The server's static public key is pinned by the node (it comes in the auth
//! key token): a wrong key makes the very first message undecryptable for the
//! real server, which drops the connection; nothing else is revealed.
//!
//! After the handshake a [`SecureChannel`] turns frames into wire bytes and
//! back (see [`crate::control::wire::frame`] for the layout). Handshake payloads are empty:
//! the protocol version rides in every frame.
#![warn(missing_docs)]

use crate::control::wire::frame::{FrameDecoder, FrameError, MAX_WIRE_MESSAGE, WireDecoder, encode_frame, encode_wire};
use crate::key::{Key, PrivateKey};

/// The Noise protocol name both sides build their state from.
pub(crate) const NOISE_PATTERN: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
/// Mixed into the handshake hash: a handshake made for another protocol
/// (or version of this one) fails instead of being reinterpreted.
pub(crate) const PROLOGUE: &[u8] = b"tailgate-control/1";
const TAG_LEN: usize = 16;
/// IK messages with empty payloads are 96 and 48 bytes.
const HANDSHAKE_BUF: usize = 256;
/// Largest plaintext that fits one Noise transport message.
pub(crate) const MAX_CHUNK: usize = MAX_WIRE_MESSAGE - TAG_LEN;

/// Why the Noise channel failed; the connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The handshake failed (wrong pinned key, not Noise, or a local
    /// key error); the text says which step.
    #[error("noise handshake failed: {0}")]
    Handshake(String),
    /// A transport message did not authenticate.
    #[error("cannot decrypt a message from the peer (corrupted, replayed or not Noise)")]
    Decrypt,
    /// The decrypted stream is not valid framing.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

fn params() -> snow::params::NoiseParams {
    NOISE_PATTERN.parse().expect("valid noise pattern")
}

/// The node side of the handshake, between sending message 1 and reading 2.
pub struct Initiator {
    hs: snow::HandshakeState,
}

impl Initiator {
    /// Starts a handshake; returns the state and message 1, wire-framed.
    pub fn start(local_private: &PrivateKey, server_public: &Key) -> Result<(Initiator, Vec<u8>), ChannelError> {
        let hs_err = |e: snow::Error| ChannelError::Handshake(e.to_string());
        let mut hs = snow::Builder::new(params())
            .local_private_key(local_private.expose_secret())
            .map_err(hs_err)?
            .remote_public_key(server_public)
            .map_err(hs_err)?
            .prologue(PROLOGUE)
            .map_err(hs_err)?
            .build_initiator()
            .map_err(hs_err)?;
        let mut buf = [0u8; HANDSHAKE_BUF];
        let n = hs.write_message(&[], &mut buf).map_err(hs_err)?;
        let mut out = Vec::with_capacity(n + 2);
        encode_wire(&buf[..n], &mut out);
        Ok((Initiator { hs }, out))
    }

    /// Reads message 2 (without its length prefix). `wire` is the decoder the
    /// message came from: bytes after it belong to the channel.
    pub fn finish(mut self, msg2: &[u8], wire: WireDecoder, max_frame: usize) -> Result<SecureChannel, ChannelError> {
        let mut payload = vec![0u8; msg2.len()];
        self.hs.read_message(msg2, &mut payload).map_err(|e| ChannelError::Handshake(format!("reading the server's reply: {e}")))?;
        let ts = self.hs.into_transport_mode().map_err(|e| ChannelError::Handshake(e.to_string()))?;
        Ok(SecureChannel::new(ts, wire, max_frame))
    }
}

/// The server side: reads message 1 (without length prefix), returns the
/// channel, the node's static key (its node key) and message 2 wire-framed.
pub(crate) fn respond(
    server_private: &PrivateKey,
    msg1: &[u8],
    wire: WireDecoder,
    max_frame: usize,
) -> Result<(SecureChannel, Key, Vec<u8>), ChannelError> {
    let hs_err = |e: snow::Error| ChannelError::Handshake(e.to_string());
    let mut hs = snow::Builder::new(params())
        .local_private_key(server_private.expose_secret())
        .map_err(hs_err)?
        .prologue(PROLOGUE)
        .map_err(hs_err)?
        .build_responder()
        .map_err(hs_err)?;
    let mut payload = vec![0u8; msg1.len()];
    hs.read_message(msg1, &mut payload).map_err(|e| {
        ChannelError::Handshake(format!(
            "cannot read the node's first message ({e}); it was not made for this server's key, or is not Noise"
        ))
    })?;
    let remote: Key =
        hs.get_remote_static().and_then(|k| k.try_into().ok()).ok_or_else(|| ChannelError::Handshake("no remote static key".into()))?;
    let mut buf = [0u8; HANDSHAKE_BUF];
    let n = hs.write_message(&[], &mut buf).map_err(hs_err)?;
    let mut out = Vec::with_capacity(n + 2);
    encode_wire(&buf[..n], &mut out);
    let ts = hs.into_transport_mode().map_err(hs_err)?;
    Ok((SecureChannel::new(ts, wire, max_frame), remote, out))
}

/// An established, encrypted, framed channel. Feed it received bytes with
/// [`push_wire`](Self::push_wire), take frames with
/// [`next_frame`](Self::next_frame), and seal outgoing frames with
/// [`seal_frame`](Self::seal_frame).
pub struct SecureChannel {
    ts: snow::TransportState,
    wire: WireDecoder,
    frames: FrameDecoder,
    /// Decryption buffer; grows to the largest message received (small on
    /// the server, whose nodes send small messages: 10,000 connections must
    /// not cost 64 KiB each).
    scratch: Vec<u8>,
}

impl SecureChannel {
    fn new(ts: snow::TransportState, wire: WireDecoder, max_frame: usize) -> Self {
        SecureChannel { ts, wire, frames: FrameDecoder::new(max_frame), scratch: Vec::new() }
    }

    /// Encrypts one frame (header + payload) into `out` as wire messages.
    pub fn seal_frame(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), ChannelError> {
        self.seal_raw(&encode_frame(payload), out)
    }

    /// Encrypts arbitrary plaintext bytes (normally a frame; tests use it to
    /// inject malformed frames inside a valid channel).
    pub fn seal_raw(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), ChannelError> {
        for chunk in plaintext.chunks(MAX_CHUNK) {
            let len = chunk.len() + TAG_LEN;
            out.extend_from_slice(&(len as u16).to_be_bytes());
            let start = out.len();
            out.resize(start + len, 0);
            let n = self.ts.write_message(chunk, &mut out[start..]).map_err(|e| ChannelError::Handshake(format!("encrypt: {e}")))?;
            debug_assert_eq!(n, len);
        }
        Ok(())
    }

    /// Takes received bytes; decrypts every complete wire message.
    pub fn push_wire(&mut self, bytes: &[u8]) -> Result<(), ChannelError> {
        self.wire.push(bytes);
        self.drain_wire()
    }

    fn drain_wire(&mut self) -> Result<(), ChannelError> {
        while let Some(msg) = self.wire.next_message()? {
            if self.scratch.len() < msg.len() {
                self.scratch.resize(msg.len(), 0);
            }
            let n = self.ts.read_message(&msg, &mut self.scratch).map_err(|_| ChannelError::Decrypt)?;
            self.frames.push(&self.scratch[..n]);
        }
        Ok(())
    }

    /// Takes received bytes and appends the plaintext of every complete wire
    /// message to `plain`, bypassing this channel's frame decoder (which
    /// would copy every byte once more): the caller takes frames where they
    /// lie with [`frame_at`](crate::control::wire::frame::frame_at). Whole
    /// messages are decrypted straight from `bytes`; only a message cut by
    /// the read is buffered. Plaintext the frame decoder still held (frames
    /// that came with the handshake) comes first.
    pub(crate) fn open_into(&mut self, mut bytes: &[u8], plain: &mut Plain) -> Result<(), ChannelError> {
        if self.frames.buffered() > 0 {
            let mut held = Vec::new();
            self.frames.take_into(&mut held);
            plain.extend(&held);
        }
        loop {
            while let Some(msg) = self.wire.next_message()? {
                self.open_one(&msg, plain)?;
            }
            if self.wire.buffered() == 0 || bytes.is_empty() {
                break;
            }
            let take = self.wire.missing().min(bytes.len());
            self.wire.push(&bytes[..take]);
            bytes = &bytes[take..];
        }
        while let [a, b, rest @ ..] = bytes {
            let len = u16::from_be_bytes([*a, *b]) as usize;
            if len == 0 {
                return Err(FrameError::EmptyWireMessage.into());
            }
            let Some(msg) = rest.get(..len) else { break };
            self.open_one(msg, plain)?;
            bytes = &rest[len..];
        }
        self.wire.push(bytes);
        Ok(())
    }

    fn open_one(&mut self, msg: &[u8], plain: &mut Plain) -> Result<(), ChannelError> {
        let out = plain.spare(msg.len());
        let n = self.ts.read_message(msg, out).map_err(|_| ChannelError::Decrypt)?;
        plain.end += n;
        Ok(())
    }

    /// The next complete frame payload, if any.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, ChannelError> {
        // Bytes that arrived with the last handshake message.
        if self.wire.buffered() > 0 {
            self.drain_wire()?;
        }
        Ok(self.frames.next_frame()?)
    }
}

/// Decrypted bytes waiting to be taken as frames: `buf[start..end]`. The
/// buffer is zeroed once, when it grows, not for every message decrypted
/// into it, and consumed frames only move the start; the few bytes of a
/// frame cut by a message boundary move to the front when room is needed.
#[derive(Default)]
pub(crate) struct Plain {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Plain {
    /// The bytes not yet consumed.
    pub(crate) fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Marks the first `n` bytes of [`data`](Self::data) as taken.
    pub(crate) fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
    }

    /// Appends `b`.
    pub(crate) fn extend(&mut self, b: &[u8]) {
        self.spare(b.len())[..b.len()].copy_from_slice(b);
        self.end += b.len();
    }

    /// At least `n` writable bytes after the data.
    fn spare(&mut self, n: usize) -> &mut [u8] {
        if self.buf.len() - self.end < n && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        if self.buf.len() - self.end < n {
            self.buf.resize(self.end + n, 0);
        }
        &mut self.buf[self.end..]
    }

    /// Hands over the whole buffer with the range its data occupies, keeping
    /// a copy of the data from `keep_from` on (a frame cut by the read) in a
    /// fresh buffer of `capacity` bytes.
    pub(crate) fn take(&mut self, keep_from: usize, capacity: usize) -> (Vec<u8>, std::ops::Range<usize>) {
        let tail = self.start + keep_from..self.end;
        let range = self.start..self.start + keep_from;
        let mut fresh = vec![0u8; capacity.max(tail.len())];
        fresh[..tail.len()].copy_from_slice(&self.buf[tail.clone()]);
        let old = std::mem::replace(&mut self.buf, fresh);
        (self.start, self.end) = (0, tail.len());
        (old, range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::wg::{generate_private_key, public_key_of};

    fn handshake(client: &PrivateKey, server: &PrivateKey, pinned: &Key) -> Result<(SecureChannel, SecureChannel, Key), ChannelError> {
        let (init, m1) = Initiator::start(client, pinned)?;
        let mut sw = WireDecoder::new();
        sw.push(&m1);
        let msg1 = sw.next_message()?.unwrap();
        let (schan, remote, m2) = respond(server, &msg1, sw, 1 << 20)?;
        let mut cw = WireDecoder::new();
        cw.push(&m2);
        let msg2 = cw.next_message()?.unwrap();
        let cchan = init.finish(&msg2, cw, 1 << 20)?;
        Ok((cchan, schan, remote))
    }

    #[test]
    fn handshake_authenticates_node_key_and_carries_frames() {
        let (c, s) = (generate_private_key(), generate_private_key());
        let (mut cc, mut sc, remote) = handshake(&c, &s, &public_key_of(&s)).unwrap();
        assert_eq!(remote, public_key_of(&c), "server learns the node's WireGuard public key");
        let big = vec![42u8; 200_000];
        let mut wire = Vec::new();
        cc.seal_frame(b"first", &mut wire).unwrap();
        cc.seal_frame(&big, &mut wire).unwrap();
        // Deliver in odd-sized pieces.
        let mut got = Vec::new();
        for piece in wire.chunks(999) {
            sc.push_wire(piece).unwrap();
            while let Some(f) = sc.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], b"first");
        assert_eq!(got[1], big);
        let mut back = Vec::new();
        sc.seal_frame(b"reply", &mut back).unwrap();
        cc.push_wire(&back).unwrap();
        assert_eq!(cc.next_frame().unwrap().unwrap(), b"reply");
    }

    #[test]
    fn open_into_reads_frames_in_place_however_the_stream_is_cut() {
        use crate::control::wire::frame::{FRAME_HEADER, frame_at};
        let (c, s) = (generate_private_key(), generate_private_key());
        let (mut cc, mut sc, _) = handshake(&c, &s, &public_key_of(&s)).unwrap();
        let frames: Vec<Vec<u8>> = (0..40u32).map(|i| vec![i as u8; (i as usize * 997) % 9000]).collect();
        let mut wire = Vec::new();
        // Frames that arrived before the switch to open_into stay first.
        cc.seal_frame(b"early", &mut wire).unwrap();
        sc.push_wire(&wire).unwrap();
        wire.clear();
        let mut plain_stream = Vec::new();
        for f in &frames {
            crate::control::wire::frame::append_frame(f, &mut plain_stream);
        }
        // Sealed as messages of up to 64 KiB: frames straddle messages.
        cc.seal_raw(&plain_stream, &mut wire).unwrap();
        for cut in [1usize, 2, 3, 1000, 65537, 200_000] {
            let (mut cc2, mut sc2, _) = handshake(&c, &s, &public_key_of(&s)).unwrap();
            let mut w = Vec::new();
            cc2.seal_raw(&plain_stream, &mut w).unwrap();
            let mut plain = Plain::default();
            let mut got = Vec::new();
            for piece in w.chunks(cut) {
                sc2.open_into(piece, &mut plain).unwrap();
                while let Some(len) = frame_at(plain.data(), 1 << 20).unwrap() {
                    got.push(plain.data()[FRAME_HEADER..FRAME_HEADER + len].to_vec());
                    plain.consume(FRAME_HEADER + len);
                }
            }
            assert_eq!(got, frames, "cut {cut}");
            assert!(plain.data().is_empty());
        }
        let mut plain = Plain::default();
        sc.open_into(&wire, &mut plain).unwrap();
        let len = frame_at(plain.data(), 1 << 20).unwrap().unwrap();
        assert_eq!(&plain.data()[FRAME_HEADER..FRAME_HEADER + len], b"early");
        // A zero-length wire message is refused, not skipped.
        assert!(matches!(sc.open_into(&[0, 0, 1], &mut plain), Err(ChannelError::Frame(FrameError::EmptyWireMessage))));
    }

    #[test]
    fn plain_take_keeps_the_cut_frame() {
        let mut p = Plain::default();
        p.extend(b"abcdef");
        p.consume(1);
        let (old, range) = p.take(3, 16);
        assert_eq!(&old[range], b"bcd");
        assert_eq!(p.data(), b"ef");
        p.consume(2);
        assert!(p.data().is_empty());
    }

    #[test]
    fn wrong_pinned_server_key_fails_on_the_server() {
        let (c, s, other) = (generate_private_key(), generate_private_key(), generate_private_key());
        let err = handshake(&c, &s, &public_key_of(&other)).err().expect("must fail");
        assert!(matches!(err, ChannelError::Handshake(_)), "{err}");
    }

    #[test]
    fn garbage_first_message_is_an_error_not_a_panic() {
        let s = generate_private_key();
        for len in [0usize, 1, 31, 32, 48, 95, 96, 200] {
            let junk = vec![0xA5u8; len];
            assert!(respond(&s, &junk, WireDecoder::new(), 1024).is_err());
        }
    }

    #[test]
    fn tampered_transport_message_is_refused() {
        let (c, s) = (generate_private_key(), generate_private_key());
        let (mut cc, mut sc, _) = handshake(&c, &s, &public_key_of(&s)).unwrap();
        let mut wire = Vec::new();
        cc.seal_frame(b"hello", &mut wire).unwrap();
        let last = wire.len() - 1;
        wire[last] ^= 1;
        assert!(matches!(sc.push_wire(&wire), Err(ChannelError::Decrypt)));
    }

    #[test]
    fn oversized_frame_inside_channel_is_refused() {
        let (c, s) = (generate_private_key(), generate_private_key());
        let (init, m1) = Initiator::start(&c, &public_key_of(&s)).unwrap();
        let mut sw = WireDecoder::new();
        sw.push(&m1);
        let msg1 = sw.next_message().unwrap().unwrap();
        let (mut sc, _, m2) = respond(&s, &msg1, sw, 1000).unwrap();
        let mut cw = WireDecoder::new();
        cw.push(&m2);
        let msg2 = cw.next_message().unwrap().unwrap();
        let mut cc = init.finish(&msg2, cw, 1 << 20).unwrap();
        let mut wire = Vec::new();
        cc.seal_frame(&[0u8; 1001], &mut wire).unwrap();
        sc.push_wire(&wire).unwrap();
        assert!(matches!(sc.next_frame(), Err(ChannelError::Frame(FrameError::TooLarge { len: 1001, max: 1000 }))));
    }
}
