//! Binary recording chunks: recording bytes travel as they are, not as
//! base64 inside JSON, so neither side pays to encode, escape or decode them.
//!
//! A frame payload (see [`super::frame`]) is JSON when it starts with `{`;
//! one that starts with [`RECORDING_CHUNK`] is
//! `[kind u8][flags u8][offset u64 BE]([raw length u32 BE])[session length u8][session][data]`,
//! where flag bit 0 is `fin`, bit 1 `gzip` and the other bits must be zero.
//! A node sends them only to a server that said it takes them
//! (`LoginOk.binary_chunks`); an older server gets the JSON
//! `recording_chunk` message instead.
//!
//! With `gzip` (sent only to a server whose `LoginOk.gzip_chunks` says it
//! takes them) the raw length follows the offset and `data` is one gzip
//! member that inflates to exactly that many recording bytes. Control
//! appends such members to the stored file as they are (concatenated gzip
//! members are one valid gzip file), so neither side copies, encrypts or
//! compresses the raw bytes again; terminal output is text and shrinks
//! several times. [`gzip_member_len`] checks a member before it is stored.
//!
//! The decoder sees bytes from the network: anything malformed is an
//! error value, never a panic.
#![warn(missing_docs)]

use super::proto::valid_session_id;

/// First payload byte of a binary recording chunk (JSON starts with `{`).
pub const RECORDING_CHUNK: u8 = 0x01;
const FIN: u8 = 0x01;
const GZIP: u8 = 0x02;
/// Most raw bytes one gzip chunk may stand for: bounds what control inflates
/// per chunk to check it (a member that inflates further is refused).
pub(crate) const MAX_RAW: u32 = 4 << 20;
/// Bytes before the session id: kind, flags, offset, session length.
const FIXED: usize = 1 + 1 + 8 + 1;
/// Longest session id ([`valid_session_id`]).
const MAX_SESSION: usize = 64;
/// Largest header: what a chunk costs on top of its data.
pub const MAX_HEADER: usize = FIXED + 4 + MAX_SESSION;

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
    /// The bytes, as the node's `.cast` file holds them, or (with
    /// `raw_len`) one gzip member of them.
    pub data: Vec<u8>,
    /// `Some(n)`: `data` is a gzip member of `n` raw recording bytes.
    pub raw_len: Option<u32>,
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
    /// A gzip chunk standing for more than [`MAX_RAW`] bytes.
    #[error("gzip recording chunk claims {0} raw bytes, more than the limit")]
    RawTooLarge(u32),
    /// A gzip member that is corrupt, or inflates to another length than it claims.
    #[error("gzip recording chunk is not one member of the length it claims: {0}")]
    BadGzip(String),
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
        out.push(if self.fin { FIN } else { 0 } | if self.raw_len.is_some() { GZIP } else { 0 });
        out.extend_from_slice(&self.offset.to_be_bytes());
        if let Some(n) = self.raw_len {
            out.extend_from_slice(&n.to_be_bytes());
        }
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
        if flags & !(FIN | GZIP) != 0 {
            return Err(ChunkError::Flags(flags));
        }
        let offset = u64::from_be_bytes(rest[1..9].try_into().map_err(|_| ChunkError::Short(n))?);
        let (raw_len, fixed) = match flags & GZIP != 0 {
            false => (None, FIXED),
            true => {
                let b = frame.get(FIXED - 1..FIXED + 3).ok_or(ChunkError::Short(n))?;
                let raw = u32::from_be_bytes(b.try_into().map_err(|_| ChunkError::Short(n))?);
                if raw > MAX_RAW {
                    return Err(ChunkError::RawTooLarge(raw));
                }
                (Some(raw), FIXED + 4)
            }
        };
        if n < fixed {
            return Err(ChunkError::Short(n));
        }
        let slen = frame[fixed - 1] as usize;
        let end = fixed + slen;
        if n < end {
            return Err(ChunkError::Short(n));
        }
        let session = std::str::from_utf8(&frame[fixed..end]).ok().filter(|s| valid_session_id(s)).ok_or(ChunkError::Session)?.to_string();
        if n - end > max {
            return Err(ChunkError::TooLarge { len: n - end, max });
        }
        // The data moves to the front in place: no second buffer per chunk.
        frame.drain(..end);
        Ok(BinChunk { session, offset, fin: flags & FIN != 0, data: frame, raw_len })
    }
}

/// Checks that `data` is exactly one gzip member (with trailing CRC and
/// length) that inflates to `raw_len` bytes, inflating at most one byte
/// more than that: what a node sends is never trusted to be well formed.
pub fn gzip_member_len(data: &[u8], raw_len: u32) -> Result<(), ChunkError> {
    use std::io::Read;
    let bad = |m: String| ChunkError::BadGzip(m);
    let mut rd = std::io::BufReader::with_capacity(64 * 1024, data);
    let mut dec = flate2::bufread::GzDecoder::new(&mut rd);
    let mut sink = [0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let want = (u64::from(raw_len) + 1 - total).min(sink.len() as u64) as usize;
        match dec.read(&mut sink[..want]) {
            Ok(0) => break,
            Ok(k) => total += k as u64,
            Err(e) => return Err(bad(e.to_string())),
        }
        if total > u64::from(raw_len) {
            return Err(bad(format!("inflates to more than {raw_len} bytes")));
        }
    }
    if dec.header().is_none() {
        return Err(bad("no gzip header".into()));
    }
    // The decoder stops after the member's trailer: nothing may follow.
    drop(dec);
    if total != u64::from(raw_len) || !std::io::BufRead::fill_buf(&mut rd).map_err(|e| bad(e.to_string()))?.is_empty() {
        return Err(bad(format!("{total} bytes, or data after the member")));
    }
    Ok(())
}

/// `raw` as one gzip member at the fastest level (what a node ships).
pub(crate) fn gzip_member(raw: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::with_capacity(raw.len() / 4 + 64), flate2::Compression::fast());
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(raw);
    enc.finish().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk() -> BinChunk {
        BinChunk { session: "0123abcd".into(), offset: 1 << 40, fin: true, data: b"[1.5,\"o\",\"x\"]\n".to_vec(), raw_len: None }
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
        f[1] = 0x05;
        assert_eq!(BinChunk::decode(f, 1024), Err(ChunkError::Flags(5)));
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
    fn gzip_chunks_roundtrip_and_are_checked() {
        let raw = b"[0.5,\"o\",\"hello hello hello hello\"]\n".repeat(100);
        let c = BinChunk { data: gzip_member(&raw), raw_len: Some(raw.len() as u32), fin: false, ..chunk() };
        assert!(c.data.len() < raw.len() / 10);
        let back = BinChunk::decode(c.encode(), 1024).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.raw_len, Some(raw.len() as u32));
        assert_eq!(gzip_member_len(&back.data, raw.len() as u32), Ok(()));
        // Another length than claimed, a cut member, trailing bytes, two members, garbage.
        assert!(gzip_member_len(&back.data, raw.len() as u32 - 1).is_err());
        assert!(gzip_member_len(&back.data, raw.len() as u32 + 1).is_err());
        assert!(gzip_member_len(&back.data[..back.data.len() - 1], raw.len() as u32).is_err());
        let mut trailing = back.data.clone();
        trailing.push(0);
        assert!(gzip_member_len(&trailing, raw.len() as u32).is_err());
        let two = [back.data.clone(), back.data.clone()].concat();
        assert!(gzip_member_len(&two, 2 * raw.len() as u32).is_err());
        assert!(gzip_member_len(b"not gzip at all", 3).is_err());
        assert!(gzip_member_len(&[], 0).is_err());
        // A bomb: a member far larger than it claims is refused after raw_len + 1 bytes.
        let bomb = gzip_member(&vec![b'x'; MAX_RAW as usize]);
        assert!(gzip_member_len(&bomb, 10).is_err());
        // A claim past MAX_RAW is refused before anything is inflated.
        let mut f = c.encode();
        f[FIXED - 1..FIXED + 3].copy_from_slice(&(MAX_RAW + 1).to_be_bytes());
        assert_eq!(BinChunk::decode(f, 1024), Err(ChunkError::RawTooLarge(MAX_RAW + 1)));
        // Cut inside the raw length or the session: short, never a panic.
        let f = c.encode();
        for cut in 0..FIXED + 4 + 8 {
            assert!(BinChunk::decode(f[..cut].to_vec(), 1024).is_err(), "cut at {cut}");
        }
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
            if round % 3 == 0 && bytes.len() > 1 {
                bytes[1] = GZIP | (bytes[1] & FIN);
            }
            if let Ok(c) = BinChunk::decode(bytes.clone(), 64) {
                if let Some(n) = c.raw_len {
                    let _ = gzip_member_len(&c.data, n);
                }
                assert_eq!(c.encode(), bytes, "what decodes re-encodes to the same bytes");
            }
        }
    }
}
