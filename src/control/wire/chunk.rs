//! Binary recording chunks: recording bytes travel as they are, not as
//! base64 inside JSON, so neither side pays to encode, escape or decode them.
//!
//! A frame payload (see [`super::frame`]) is JSON when it starts with `{`;
//! one that starts with [`RECORDING_CHUNK`] is
//! `[kind u8][flags u8][offset u64 BE][session length u8][session][data]`,
//! where flag bit 0 is `fin` and the other bits must be zero. A node sends
//! them only to a server that said it takes them (`LoginOk.binary_chunks`);
//! an older server gets the JSON `recording_chunk` message instead.
//!
//! The decoder sees bytes from the network: anything malformed is an
//! error value, never a panic.
#![warn(missing_docs)]

use super::proto::valid_session_id;

/// First payload byte of a binary recording chunk (JSON starts with `{`).
pub const RECORDING_CHUNK: u8 = 0x01;
const FIN: u8 = 0x01;
/// Bytes before the session id: kind, flags, offset, session length.
const FIXED: usize = 1 + 1 + 8 + 1;
/// Longest session id ([`valid_session_id`]).
const MAX_SESSION: usize = 64;
/// Largest header: what a chunk costs on top of its data.
pub const MAX_HEADER: usize = FIXED + MAX_SESSION;

/// Recording bytes of `session` starting at `offset`; `fin`: the recording
/// is complete after them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BinChunk {
    /// Session id (hex, 8..=64 characters).
    pub session: String,
    /// Byte offset of `data` in the recording file.
    pub offset: u64,
    /// The recording is complete after these bytes.
    pub fin: bool,
    /// The bytes, as the node's `.cast` file holds them.
    pub data: Vec<u8>,
}

/// Why a binary frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// Fewer bytes than the header says.
    #[error("binary frame too short ({0} bytes)")]
    Short(usize),
    /// A first byte this build does not know.
    #[error("unknown binary frame kind {0:#04x}")]
    UnknownKind(u8),
    /// Flag bits this build does not know.
    #[error("unknown flags {0:#04x} in a recording chunk")]
    Flags(u8),
    /// Not a session id (hex, 8..=64 characters).
    #[error("recording chunk with an invalid session id")]
    Session,
    /// More data than `max` bytes.
    #[error("recording chunk of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Data bytes in the frame.
        len: usize,
        /// The limit.
        max: usize,
    },
}

impl BinChunk {
    /// The frame payload.
    pub fn encode(&self) -> Vec<u8> {
        debug_assert!(valid_session_id(&self.session));
        let mut out = Vec::with_capacity(FIXED + self.session.len() + self.data.len());
        out.push(RECORDING_CHUNK);
        out.push(if self.fin { FIN } else { 0 });
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.push(self.session.len() as u8);
        out.extend_from_slice(self.session.as_bytes());
        out.extend_from_slice(&self.data);
        out
    }

    /// Parses a frame payload that starts with a byte other than `{`;
    /// `max`: the most data bytes accepted.
    pub fn decode(mut frame: Vec<u8>, max: usize) -> Result<BinChunk, ChunkError> {
        let n = frame.len();
        let (&kind, rest) = frame.split_first().ok_or(ChunkError::Short(0))?;
        if kind != RECORDING_CHUNK {
            return Err(ChunkError::UnknownKind(kind));
        }
        if n < FIXED {
            return Err(ChunkError::Short(n));
        }
        let flags = rest[0];
        if flags & !FIN != 0 {
            return Err(ChunkError::Flags(flags));
        }
        let offset = u64::from_be_bytes(rest[1..9].try_into().map_err(|_| ChunkError::Short(n))?);
        let slen = rest[9] as usize;
        let end = FIXED + slen;
        if n < end {
            return Err(ChunkError::Short(n));
        }
        let session = std::str::from_utf8(&frame[FIXED..end]).ok().filter(|s| valid_session_id(s)).ok_or(ChunkError::Session)?.to_string();
        if n - end > max {
            return Err(ChunkError::TooLarge { len: n - end, max });
        }
        // The data moves to the front in place: no second buffer per chunk.
        frame.drain(..end);
        Ok(BinChunk { session, offset, fin: flags & FIN != 0, data: frame })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk() -> BinChunk {
        BinChunk { session: "0123abcd".into(), offset: 1 << 40, fin: true, data: b"[1.5,\"o\",\"x\"]\n".to_vec() }
    }

    #[test]
    fn roundtrips() {
        let c = chunk();
        assert_eq!(BinChunk::decode(c.encode(), 1024), Ok(c.clone()));
        let empty = BinChunk { data: Vec::new(), fin: false, ..c };
        assert_eq!(BinChunk::decode(empty.encode(), 0), Ok(empty));
    }

    #[test]
    fn malformed_frames_are_errors() {
        let good = chunk().encode();
        // Every truncation inside the header is "short" (or a bad session).
        for cut in 0..FIXED + 8 {
            let e = BinChunk::decode(good[..cut].to_vec(), 1024).unwrap_err();
            assert!(matches!(e, ChunkError::Short(_)), "cut at {cut}: {e:?}");
        }
        let mut f = good.clone();
        f[0] = 0x02;
        assert_eq!(BinChunk::decode(f, 1024), Err(ChunkError::UnknownKind(2)));
        assert_eq!(BinChunk::decode(b"{\"type\":\"keep_alive\"}".to_vec(), 1024), Err(ChunkError::UnknownKind(b'{')));
        let mut f = good.clone();
        f[1] = 0x03;
        assert_eq!(BinChunk::decode(f, 1024), Err(ChunkError::Flags(3)));
        // A session id that is not hex, or too short: never a file name.
        let mut f = good.clone();
        f[FIXED] = b'/';
        assert_eq!(BinChunk::decode(f, 1024), Err(ChunkError::Session));
        let mut f = good.clone();
        f[FIXED - 1] = 4;
        assert_eq!(BinChunk::decode(f, 1024), Err(ChunkError::Session));
        // A session length past the end of the frame.
        let mut f = good[..FIXED + 8].to_vec();
        f[FIXED - 1] = 200;
        assert_eq!(BinChunk::decode(f, 1024), Err(ChunkError::Short(FIXED + 8)));
        // More data than allowed.
        let big = BinChunk { data: vec![b'x'; 2000], ..chunk() };
        assert_eq!(BinChunk::decode(big.encode(), 1999), Err(ChunkError::TooLarge { len: 2000, max: 1999 }));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 0x9e37_79b9u32;
        for round in 0..2000 {
            let mut bytes = Vec::new();
            for _ in 0..(round % 120) {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                bytes.push((seed >> 16) as u8);
            }
            if round % 2 == 0 && !bytes.is_empty() {
                bytes[0] = RECORDING_CHUNK;
            }
            if let Ok(c) = BinChunk::decode(bytes.clone(), 64) {
                assert_eq!(c.encode(), bytes, "what decodes re-encodes to the same bytes");
            }
        }
    }
}
