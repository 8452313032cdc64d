//! asciicast v2 session recordings (`state_dir/recordings/<session>.cast`, 0600,
//! written by [`super::journal`]'s thread).
//!
//! [`CastEncoder`] turns output bytes into event lines and is pure (times are
//! passed in). The subtle part is UTF-8: the terminal receives a byte stream
//! cut at arbitrary points, but asciicast events carry JSON strings, so a
//! multi-byte character split across two reads must be held back and emitted
//! with the next chunk, or `asciinema cat` would print U+FFFD where the user
//! saw a character. Bytes that are not UTF-8 at all (binary output) cannot be
//! represented and become U+FFFD.
#![warn(missing_docs)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::SshError;
use super::journal::{Journal, RecHandle};

/// The asciicast v2 header line.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct CastHeader {
    pub version: u32,
    pub width: u32,
    pub height: u32,
    pub timestamp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub env: std::collections::BTreeMap<String, String>,
}

impl CastHeader {
    pub(crate) fn new(width: u32, height: u32, started: SystemTime) -> Self {
        CastHeader {
            version: 2,
            // asciinema refuses a 0x0 terminal; clients without a pty report none.
            width: if width == 0 { 80 } else { width },
            height: if height == 0 { 24 } else { height },
            timestamp: started.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            command: None,
            title: None,
            env: Default::default(),
        }
    }

    pub(crate) fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_else(|_| "{\"version\":2}".into());
        s.push('\n');
        s
    }
}

/// Encodes output chunks as asciicast event lines, carrying incomplete UTF-8
/// sequences over to the next chunk.
#[derive(Default, Debug)]
pub(crate) struct CastEncoder {
    pending: Vec<u8>,
}

/// Seconds with microsecond resolution, so the JSON number stays short.
fn secs(t: Duration) -> f64 {
    t.as_micros() as f64 / 1e6
}

/// Appends one event line (`[time,"code","data"]` and a newline) to `out`,
/// exactly as `serde_json` writes the tuple. Bulk output is mostly plain
/// text: copied as is, it costs the session a fraction of an escape pass,
/// and writing into the caller's buffer spares an allocation per read.
fn push_event(out: &mut Vec<u8>, t: Duration, code: &str, data: &str) {
    out.push(b'[');
    // The time is formatted by serde_json so every path writes the same numbers.
    if serde_json::to_writer(&mut *out, &secs(t)).is_err() {
        out.extend_from_slice(b"0.0");
    }
    out.extend_from_slice(b",\"");
    out.extend_from_slice(code.as_bytes());
    out.extend_from_slice(b"\",");
    out.reserve(data.len() + 4);
    out.push(b'"');
    if needs_escape(data.as_bytes()) {
        escape_into(out, data.as_bytes());
    } else {
        out.extend_from_slice(data.as_bytes());
    }
    out.push(b'"');
    out.extend_from_slice(b"]\n");
}

/// Whether JSON escapes `x`.
fn special(x: u8) -> bool {
    (x < 0x20) | (x == b'"') | (x == b'\\')
}

/// Appends `s` (valid UTF-8) JSON-escaped as serde_json escapes it: runs
/// without anything to escape are found 32 bytes at a time and copied whole.
/// Terminal output has a `\r\n` or an escape sequence every line, so this
/// is the common path, where serde_json's byte-at-a-time escaper cost the
/// session more than the rest of the recording.
fn escape_into(out: &mut Vec<u8>, s: &[u8]) {
    const BLOCK: usize = 32;
    let mut run = 0; // start of the bytes not yet copied
    let mut base = 0;
    while base < s.len() {
        let end = (base + BLOCK).min(s.len());
        // One bit per byte to escape: a compare and a movemask per block.
        let mut mask = 0u32;
        match <&[u8; BLOCK]>::try_from(&s[base..end]) {
            Ok(block) => {
                for (j, &x) in block.iter().enumerate() {
                    mask |= u32::from(special(x)) << j;
                }
            }
            Err(_) => {
                for (j, &x) in s[base..end].iter().enumerate() {
                    mask |= u32::from(special(x)) << j;
                }
            }
        }
        while mask != 0 {
            let i = base + mask.trailing_zeros() as usize;
            mask &= mask - 1;
            out.extend_from_slice(&s[run..i]);
            push_escape(out, s[i]);
            run = i + 1;
        }
        base = end;
    }
    out.extend_from_slice(&s[run..]);
}

/// Appends the escape serde_json writes for a byte [`special`] says needs one.
fn push_escape(out: &mut Vec<u8>, x: u8) {
    let short = match x {
        b'"' => b'"',
        b'\\' => b'\\',
        b'\n' => b'n',
        b'\r' => b'r',
        b'\t' => b't',
        0x08 => b'b',
        0x0c => b'f',
        _ => 0,
    };
    if short != 0 {
        out.extend_from_slice(&[b'\\', short]);
    } else {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[(x >> 4) as usize], HEX[(x & 15) as usize]]);
    }
}

#[cfg(test)]
fn event_line(t: Duration, code: &str, data: &str) -> String {
    let mut out = Vec::new();
    push_event(&mut out, t, code, data);
    String::from_utf8(out).unwrap()
}

/// Whether JSON needs any byte of `b` escaped (`"`, `\\`, control
/// characters). Branch-free per block, so the compiler vectorises it.
fn needs_escape(b: &[u8]) -> bool {
    b.chunks(64).any(|c| c.iter().fold(false, |acc, &x| acc | special(x)))
}

impl CastEncoder {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Appends an `"o"` event for `data` received at `t` since the start to
    /// `out`, or nothing when everything is held back (an incomplete character).
    pub(crate) fn output(&mut self, out: &mut Vec<u8>, t: Duration, data: &[u8]) {
        // Bulk output is whole characters nearly always: encode it straight
        // from the caller's buffer, without the two copies through `pending`.
        if self.pending.is_empty()
            && let Ok(text) = std::str::from_utf8(data)
        {
            if !text.is_empty() {
                push_event(out, t, "o", text);
            }
            return;
        }
        self.pending.extend_from_slice(data);
        let text = self.take_decodable(false);
        if !text.is_empty() {
            push_event(out, t, "o", &text);
        }
    }

    /// Appends a resize event to `out`.
    pub(crate) fn resize(&self, out: &mut Vec<u8>, t: Duration, cols: u32, rows: u32) {
        push_event(out, t, "r", &format!("{cols}x{rows}"));
    }

    /// Appends whatever is still held back (a truncated character at the very end).
    pub(crate) fn finish(&mut self, out: &mut Vec<u8>, t: Duration) {
        let text = self.take_decodable(true);
        if !text.is_empty() {
            push_event(out, t, "o", &text);
        }
    }

    /// Decodes the longest prefix of `pending`; invalid sequences become
    /// U+FFFD; an incomplete sequence at the end stays pending unless `flush`.
    fn take_decodable(&mut self, flush: bool) -> String {
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (good, bad) = rest.split_at(e.valid_up_to());
                    // `good` is valid UTF-8 by definition of valid_up_to.
                    out.push_str(std::str::from_utf8(good).unwrap_or_default());
                    match e.error_len() {
                        Some(n) => {
                            out.push('\u{FFFD}');
                            rest = &bad[n..];
                        }
                        None if flush => {
                            out.push('\u{FFFD}');
                            rest = &[];
                            break;
                        }
                        None => {
                            rest = bad;
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.to_vec();
        self.pending = keep;
        out
    }
}

/// Encoded output gathered before it is handed to the journal's thread: a
/// bulk session then costs one queue message, one wakeup of the writer and
/// one `write` per batch instead of per read (a read is at most 32 KiB).
pub(crate) const BATCH: usize = 256 * 1024;

/// A recording being written: encodes here into a batch, writes on the
/// journal's thread.
pub(crate) struct Recorder {
    handle: Arc<RecHandle>,
    enc: CastEncoder,
    /// Event lines not yet handed to the journal, in order.
    batch: Vec<u8>,
    start: Instant,
    finished: bool,
    /// `record = "required"`: the session ends when output cannot be recorded.
    pub required: bool,
}

impl Recorder {
    /// Creates `recordings/<id>.cast` (0600; the directory 0700) with its header.
    pub(crate) async fn create(journal: &Journal, id: &str, header: &CastHeader) -> Result<Recorder, SshError> {
        let handle = journal.open_recording(id, header.to_line()).await?;
        Ok(Recorder {
            handle: Arc::new(handle),
            enc: CastEncoder::new(),
            batch: Vec::new(),
            start: Instant::now(),
            finished: false,
            required: false,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        self.handle.path()
    }

    /// Where batches go (sent outside the recorder's lock).
    pub(crate) fn handle(&self) -> Arc<RecHandle> {
        self.handle.clone()
    }

    /// Output could not be recorded (disk error, or the shipping spool is full).
    pub(crate) fn failed(&self) -> bool {
        self.handle.failed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Encodes `data` into the batch; returns whether the batch is full.
    /// The caller hands it over with [`Recorder::take_batch`] while holding
    /// [`RecHandle::order`] (two pumps share a recorder), then
    /// [`RecHandle::send`]; a pump also does that on a timer, so a quiet
    /// session's output reaches the disk soon.
    pub(crate) fn encode_output(&mut self, data: &[u8]) -> bool {
        self.enc.output(&mut self.batch, self.start.elapsed(), data);
        self.batch.len() >= BATCH
    }

    /// Whatever the batch holds, if anything.
    pub(crate) fn take_batch(&mut self) -> Option<Vec<u8>> {
        if self.batch.is_empty() {
            return None;
        }
        // A full batch means bulk output: the next one starts at full size,
        // since growing by doubling would copy it four times.
        let next = if self.batch.len() >= BATCH { Vec::with_capacity(BATCH + 64 * 1024) } else { Vec::new() };
        Some(std::mem::replace(&mut self.batch, next))
    }

    /// `record = "required"` and output could not be recorded: the session
    /// must end without passing on more.
    pub(crate) fn lost(&self) -> bool {
        self.required && self.failed()
    }

    /// Whether encoded output waits in the batch.
    pub(crate) fn pending(&self) -> bool {
        !self.batch.is_empty()
    }

    pub(crate) fn resize(&mut self, cols: u32, rows: u32) {
        // Behind the output before it, in the same batch: lines stay in order.
        self.enc.resize(&mut self.batch, self.start.elapsed(), cols, rows);
        // A pump handing over an earlier batch holds the order: this one then
        // goes after it, with the pump's next hand-over.
        let handle = self.handle.clone();
        if let Ok(_order) = handle.order.try_lock()
            && let Some(b) = self.take_batch()
        {
            handle.send_sync(b);
        }
    }

    pub(crate) fn finish(&mut self) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        self.enc.finish(&mut self.batch, self.start.elapsed());
        if let Some(b) = self.take_batch() {
            self.handle.send_sync(b);
        }
        self.handle.close();
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::Strategy as _;

    fn data_of(line: &str) -> (f64, String, String) {
        serde_json::from_str(line).unwrap()
    }

    /// The line `output` appends, if any.
    fn out(e: &mut CastEncoder, t: Duration, data: &[u8]) -> Option<String> {
        let mut v = Vec::new();
        e.output(&mut v, t, data);
        (!v.is_empty()).then(|| String::from_utf8(v).unwrap())
    }

    fn fin(e: &mut CastEncoder, t: Duration) -> Option<String> {
        let mut v = Vec::new();
        e.finish(&mut v, t);
        (!v.is_empty()).then(|| String::from_utf8(v).unwrap())
    }

    #[test]
    fn utf8_split_across_chunks_is_carried_over() {
        let mut e = CastEncoder::new();
        let s = "héllo €uro 🎉!".as_bytes();
        let mut got = String::new();
        // Feed one byte at a time: every multi-byte char is split.
        for (i, b) in s.iter().enumerate() {
            if let Some(l) = out(&mut e, Duration::from_millis(i as u64), &[*b]) {
                got.push_str(&data_of(&l).2);
            }
        }
        assert!(fin(&mut e, Duration::from_secs(1)).is_none());
        assert_eq!(got, "héllo €uro 🎉!");
    }

    #[test]
    fn incomplete_char_alone_emits_nothing() {
        let mut e = CastEncoder::new();
        assert!(out(&mut e, Duration::ZERO, &[0xE2, 0x82]).is_none());
        let l = out(&mut e, Duration::from_millis(1500), &[0xAC, b'x']).unwrap();
        let (t, code, d) = data_of(&l);
        assert_eq!((t, code.as_str(), d.as_str()), (1.5, "o", "€x"));
    }

    #[test]
    fn invalid_bytes_become_replacement_and_do_not_stall() {
        let mut e = CastEncoder::new();
        let l = out(&mut e, Duration::ZERO, &[b'a', 0xFF, b'b', 0xC3]).unwrap();
        assert_eq!(data_of(&l).2, "a\u{FFFD}b");
        let l = fin(&mut e, Duration::ZERO).unwrap();
        assert_eq!(data_of(&l).2, "\u{FFFD}");
    }

    #[test]
    fn control_characters_round_trip_through_json() {
        let mut e = CastEncoder::new();
        let raw = "\x1b[1;31mred\x1b[0m\r\n\t\"q\"\\";
        let l = out(&mut e, Duration::from_micros(1_234_567), raw.as_bytes()).unwrap();
        let (t, _, d) = data_of(&l);
        assert_eq!(t, 1.234567);
        assert_eq!(d, raw);
    }

    #[test]
    fn plain_and_escaped_output_encode_alike() {
        // The fast path (nothing to escape) must write what serde_json writes.
        for (t, data) in [(0, "plain text, no escapes ü €"), (1_500_000, "x"), (2_000_000, ""), (7, "tab\there"), (9, "q\"\\")] {
            let t = Duration::from_micros(t);
            let want = format!("{}\n", serde_json::to_string(&(secs(t), "o", data)).unwrap());
            assert_eq!(event_line(t, "o", data), want);
        }
        let long = "y".repeat(100) + "\u{1b}" + &"z".repeat(100);
        assert!(needs_escape(long.as_bytes()));
        assert!(!needs_escape("y".repeat(1000).as_bytes()));
    }

    /// Characters JSON treats specially, or that a terminal stream mixes in.
    const TRICKY: &[char] =
        &['"', '\\', '/', '\u{0}', '\u{1b}', '\u{7f}', '\u{2028}', '\u{2029}', '\r', '\n', '\t', '\u{8}', '\u{c}', 'é', '€', '🎉', 'x'];

    proptest::proptest! {
        /// The batch encoder writes what serde_json writes for the tuple.
        #[test]
        fn push_event_matches_serde_json(
            micros in 0u64..10_000_000_000,
            picks in proptest::collection::vec((0usize..TRICKY.len(), proptest::char::any(), proptest::bool::ANY), 0..300),
        ) {
            let data: String = picks.iter().map(|&(i, c, tricky)| if tricky { TRICKY[i] } else { c }).collect();
            let t = Duration::from_micros(micros);
            let want = format!("{}\n", serde_json::to_string(&(secs(t), "o", &data)).unwrap());
            proptest::prop_assert_eq!(event_line(t, "o", &data), want);
        }

        /// Any byte stream, cut anywhere (invalid UTF-8 and characters split
        /// across reads included), encodes as its lossy decoding, one JSON
        /// line per event.
        #[test]
        fn stream_cut_anywhere_encodes_its_lossy_text(
            parts in proptest::collection::vec(proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::num::u8::ANY.prop_map(|b| vec![b]),
                    (0usize..TRICKY.len()).prop_map(|i| TRICKY[i].to_string().into_bytes()),
                ], 0..40), 0..20),
        ) {
            let mut e = CastEncoder::new();
            let mut batch = Vec::new();
            let mut whole = Vec::new();
            for (i, p) in parts.iter().enumerate() {
                let bytes: Vec<u8> = p.concat();
                whole.extend_from_slice(&bytes);
                e.output(&mut batch, Duration::from_millis(i as u64), &bytes);
            }
            e.finish(&mut batch, Duration::from_secs(9));
            let text = std::str::from_utf8(&batch).unwrap();
            let mut got = String::new();
            for l in text.lines() {
                let (_, code, d) = data_of(l);
                proptest::prop_assert_eq!(code, "o");
                proptest::prop_assert!(!d.is_empty());
                got.push_str(&d);
            }
            proptest::prop_assert_eq!(got, String::from_utf8_lossy(&whole).into_owned());
        }
    }

    /// What recording costs the node per 512 MiB of bulk output (encoding
    /// on the session's side plus the journal's writes), without the noise
    /// of a whole SSH session around it. A figure, not a check:
    /// `cargo test --release --lib recording_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn recording_cost_per_512_mib() {
        fn cpu() -> f64 {
            let mut u: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: `u` is a valid, writable rusage.
            unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
            let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            tv(u.ru_utime) + tv(u.ru_stime)
        }
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        for text in [&b"x"[..], b"line of terminal output\r\n"] {
            let read: Vec<u8> = text.iter().copied().cycle().take(32 * 1024).collect();
            let (c0, t0) = (cpu(), Instant::now());
            rt.block_on(async {
                let j = Journal::open(dir.path(), &dir.path().join("audit.jsonl"), &dir.path().join("rec")).unwrap();
                let id = format!("{:x}", text.len());
                let mut r = Recorder::create(&j, &id, &CastHeader::new(80, 24, SystemTime::now())).await.unwrap();
                for _ in 0..(512 * 1024 * 1024 / read.len()) {
                    if r.encode_output(&read) {
                        let b = r.take_batch().unwrap();
                        r.handle().send(b).await;
                    }
                }
                r.finish();
                j.flush().await;
            });
            let (c1, t1) = (cpu(), Instant::now());
            println!("512 MiB of {:?}: {:.2} CPU-s, {:.2} s", String::from_utf8_lossy(text), c1 - c0, (t1 - t0).as_secs_f64());
        }
    }

    #[test]
    fn batches_and_resizes_reach_the_file_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let text = rt.block_on(async {
            let j = Journal::open(dir.path(), &dir.path().join("audit.jsonl"), &dir.path().join("rec")).unwrap();
            let mut r = Recorder::create(&j, "s1", &CastHeader::new(80, 24, SystemTime::now())).await.unwrap();
            let handle = r.handle();
            let mut fulls = 0;
            for i in 0..20u8 {
                // 20 reads of 32 KiB: more than two full batches.
                if r.encode_output(&vec![b'a' + i; 32 * 1024]) {
                    fulls += 1;
                    let b = r.take_batch().unwrap();
                    handle.send(b).await;
                }
                if i == 10 {
                    // A pump is between taking a batch and queueing it: the
                    // resize must wait in the batch rather than overtake it.
                    let order = handle.order.lock().await;
                    r.resize(100, 40);
                    assert!(r.pending());
                    drop(order);
                }
            }
            assert_eq!(fulls, 2);
            r.resize(120, 50);
            assert!(!r.pending(), "with nobody holding the order, a resize goes at once");
            r.finish();
            j.flush().await;
            std::fs::read_to_string(r.path()).unwrap()
        });
        let events: Vec<(f64, String, String)> = text.lines().skip(1).map(data_of).collect();
        let want: Vec<String> = (0..20u8)
            .flat_map(|i| {
                let o = String::from_utf8(vec![b'a' + i; 32 * 1024]).unwrap();
                if i == 10 { vec![o, "100x40".into()] } else { vec![o] }
            })
            .chain(["120x50".to_string()])
            .collect();
        assert_eq!(events.iter().map(|e| e.2.clone()).collect::<Vec<_>>(), want);
        assert!(events.windows(2).all(|w| w[0].0 <= w[1].0), "times never go back");
    }

    #[test]
    fn header_and_resize() {
        let mut h = CastHeader::new(0, 0, UNIX_EPOCH + Duration::from_secs(42));
        h.command = Some("/bin/bash".into());
        let v: serde_json::Value = serde_json::from_str(&h.to_line()).unwrap();
        assert_eq!(v["version"], 2);
        assert_eq!(v["width"], 80);
        assert_eq!(v["height"], 24);
        assert_eq!(v["timestamp"], 42);
        assert_eq!(v["command"], "/bin/bash");
        let e = CastEncoder::new();
        let mut v = Vec::new();
        e.resize(&mut v, Duration::from_secs(2), 100, 40);
        assert_eq!(data_of(std::str::from_utf8(&v).unwrap()), (2.0, "r".into(), "100x40".into()));
    }

    #[test]
    fn recorder_writes_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let rdir = dir.path().join("recordings");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let p = rt.block_on(async {
            let j = Journal::open(dir.path(), &dir.path().join("audit.jsonl"), &rdir).unwrap();
            let mut r = Recorder::create(&j, "s1", &CastHeader::new(80, 24, SystemTime::now())).await.unwrap();
            assert!(!r.encode_output(b"hi\r\n"));
            let batch = r.take_batch().unwrap();
            r.handle().send(batch).await;
            r.resize(90, 30);
            let p = r.path().to_path_buf();
            drop(r);
            j.flush().await;
            p
        });
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&rdir).unwrap().permissions().mode() & 0o777, 0o700);
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 3);
    }
}
