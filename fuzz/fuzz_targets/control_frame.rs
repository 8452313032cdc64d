//! Control-stream framing (src/control/frame.rs), both layers, as a peer on
//! the other end of a TCP connection can drive them: the `[u16 len]` wire
//! reader below Noise and the `[version][u32 len]` frame decoder above it,
//! fed the same bytes in an arbitrary chunking.
//!
//! Invariants: no panic; the chunking never changes the outcome (same
//! messages, same error); what was decoded re-encodes to exactly the bytes
//! consumed; the frame decoder never yields a frame above its limit. Each
//! frame that is not JSON goes through the binary recording-chunk decoder
//! (src/control/wire/chunk.rs) as the server does: no panic, and what it
//! accepts re-encodes to the same frame with at most `max` data bytes; a
//! gzip chunk's member goes through the check control runs before storing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tailgate::control::wire::chunk::{BinChunk, gzip_member_len};
use tailgate::control::wire::frame::{FrameDecoder, FrameError, WireDecoder, encode_frame, encode_wire};

/// Input layout (simple, so seeds can be written by hand):
/// `max (u16 BE) | n (u8) | n chunk sizes (u8 each, cycled; 0 = an empty
/// push) | stream`. `max` is the frame limit, small so it is reachable.
struct Input<'a> {
    max: u16,
    cuts: &'a [u8],
    stream: &'a [u8],
}

impl<'a> Input<'a> {
    fn parse(d: &'a [u8]) -> Option<Self> {
        let max = u16::from_be_bytes(d.get(..2)?.try_into().ok()?);
        let n = *d.get(2)? as usize;
        let cuts = d.get(3..3 + n)?;
        Some(Input { max, cuts, stream: &d[3 + n..] })
    }
}

/// Pushes `stream` in chunks, draining after each push; returns what came
/// out and the first error (after which the connection would be closed).
fn drain<T>(
    stream: &[u8],
    cuts: &[u8],
    mut push: impl FnMut(&[u8]),
    mut next: impl FnMut() -> Result<Option<T>, FrameError>,
) -> (Vec<T>, Option<FrameError>) {
    let mut out = Vec::new();
    let mut rest = stream;
    for i in 0.. {
        let cut = if cuts.is_empty() { rest.len() } else { cuts[i % cuts.len()] as usize };
        if cut == 0 {
            // A read that brought nothing new; the chunk after it still advances.
            push(&[]);
        }
        let (chunk, tail) = rest.split_at(cut.max(1).min(rest.len()));
        push(chunk);
        rest = tail;
        loop {
            match next() {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
        if rest.is_empty() {
            break;
        }
    }
    (out, None)
}

fn frames(stream: &[u8], cuts: &[u8], max: usize) -> (Vec<Vec<u8>>, Option<FrameError>, usize) {
    let d = std::cell::RefCell::new(FrameDecoder::new(max));
    let (f, e) = drain(stream, cuts, |b| d.borrow_mut().push(b), || d.borrow_mut().next_frame());
    let left = d.borrow().buffered();
    (f, e, left)
}

fn wire(stream: &[u8], cuts: &[u8]) -> (Vec<Vec<u8>>, Option<FrameError>, usize) {
    let d = std::cell::RefCell::new(WireDecoder::new());
    let (m, e) = drain(stream, cuts, |b| d.borrow_mut().push(b), || d.borrow_mut().next_message().map(|o| o.map(|m| m.to_vec())));
    let left = d.borrow().buffered();
    (m, e, left)
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::parse(data) else { return };
    let max = input.max as usize;
    let stream = input.stream;

    let (chunked, err, left) = frames(stream, input.cuts, max);
    let (whole, whole_err, whole_left) = frames(stream, &[], max);
    assert_eq!(chunked, whole, "frames depend on the chunking");
    assert_eq!(err, whole_err, "errors depend on the chunking");
    let mut re = Vec::new();
    for f in &chunked {
        assert!(f.len() <= max, "frame of {} bytes passed a {max}-byte limit", f.len());
        re.extend_from_slice(&encode_frame(f));
        if f.first().is_some_and(|&b| b != b'{') {
            if let Ok(c) = BinChunk::decode(f.clone(), max) {
                assert!(c.data.len() <= max);
                assert_eq!(&c.encode(), f, "a binary chunk does not re-encode to its frame");
                // A gzip chunk's member is checked as control checks it: never a panic.
                if let Some(n) = c.raw_len {
                    let _ = gzip_member_len(&c.data, n);
                }
            }
        }
    }
    assert_eq!(&stream[..re.len()], &re[..], "frames do not re-encode to the consumed bytes");
    if err.is_none() {
        assert_eq!(re.len() + left, stream.len());
        assert_eq!(left, whole_left);
    }

    let (chunked, err, left) = wire(stream, input.cuts);
    let (whole, whole_err, _) = wire(stream, &[]);
    assert_eq!(chunked, whole, "wire messages depend on the chunking");
    assert_eq!(err, whole_err, "wire errors depend on the chunking");
    let mut re = Vec::new();
    for m in &chunked {
        encode_wire(m, &mut re);
    }
    assert_eq!(&stream[..re.len()], &re[..], "wire messages do not re-encode to the consumed bytes");
    if err.is_none() {
        assert_eq!(re.len() + left, stream.len());
    }
});
