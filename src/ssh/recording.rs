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

fn event_line(t: Duration, code: &str, data: &str) -> String {
    if needs_escape(data.as_bytes()) {
        let mut s = serde_json::to_string(&(secs(t), code, data)).unwrap_or_default();
        s.push('\n');
        return s;
    }
    // Bulk output is mostly plain text: copied as is, it costs the session a
    // fraction of a byte-by-byte escape. The time is formatted by serde_json
    // so both paths write the same numbers.
    let time = serde_json::to_string(&secs(t)).unwrap_or_else(|_| "0.0".into());
    let mut s = String::with_capacity(data.len() + time.len() + code.len() + 10);
    for part in ["[", &time, ",\"", code, "\",\"", data, "\"]\n"] {
        s.push_str(part);
    }
    s
}

/// Whether JSON needs any byte of `b` escaped (`"`, `\\`, control
/// characters). Branch-free per block, so the compiler vectorises it.
fn needs_escape(b: &[u8]) -> bool {
    b.chunks(64).any(|c| c.iter().fold(false, |acc, &x| acc | (x < 0x20) | (x == b'"') | (x == b'\\')))
}

impl CastEncoder {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// An `"o"` event for `data` received at `t` since the start, or `None` when
    /// everything is held back (an incomplete character).
    pub(crate) fn output(&mut self, t: Duration, data: &[u8]) -> Option<String> {
        // Bulk output is whole characters nearly always: encode it straight
        // from the caller's buffer, without the two copies through `pending`.
        if self.pending.is_empty()
            && let Ok(text) = std::str::from_utf8(data)
        {
            return if text.is_empty() { None } else { Some(event_line(t, "o", text)) };
        }
        self.pending.extend_from_slice(data);
        let text = self.take_decodable(false);
        if text.is_empty() { None } else { Some(event_line(t, "o", &text)) }
    }

    /// A resize event.
    pub(crate) fn resize(&self, t: Duration, cols: u32, rows: u32) -> String {
        event_line(t, "r", &format!("{cols}x{rows}"))
    }

    /// Emits whatever is still held back (a truncated character at the very end).
    pub(crate) fn finish(&mut self, t: Duration) -> Option<String> {
        let text = self.take_decodable(true);
        if text.is_empty() { None } else { Some(event_line(t, "o", &text)) }
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

/// A recording being written: encodes here, writes on the journal's thread.
pub(crate) struct Recorder {
    handle: Arc<RecHandle>,
    enc: CastEncoder,
    start: Instant,
    finished: bool,
    /// `record = "required"`: the session ends when output cannot be recorded.
    pub required: bool,
}

impl Recorder {
    /// Creates `recordings/<id>.cast` (0600; the directory 0700) with its header.
    pub(crate) async fn create(journal: &Journal, id: &str, header: &CastHeader) -> Result<Recorder, SshError> {
        let handle = journal.open_recording(id, header.to_line()).await?;
        Ok(Recorder { handle: Arc::new(handle), enc: CastEncoder::new(), start: Instant::now(), finished: false, required: false })
    }

    pub(crate) fn path(&self) -> &Path {
        self.handle.path()
    }

    /// Where encoded lines go (sent outside the recorder's lock).
    pub(crate) fn handle(&self) -> Arc<RecHandle> {
        self.handle.clone()
    }

    /// Output could not be recorded (disk error, or the shipping spool is full).
    pub(crate) fn failed(&self) -> bool {
        self.handle.failed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The event line for `data`, to be queued with [`RecHandle::send`].
    pub(crate) fn encode_output(&mut self, data: &[u8]) -> Option<String> {
        self.enc.output(self.start.elapsed(), data)
    }

    pub(crate) fn resize(&mut self, cols: u32, rows: u32) {
        let line = self.enc.resize(self.start.elapsed(), cols, rows);
        self.handle.send_sync(line);
    }

    pub(crate) fn finish(&mut self) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        if let Some(line) = self.enc.finish(self.start.elapsed()) {
            self.handle.send_sync(line);
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

    fn data_of(line: &str) -> (f64, String, String) {
        serde_json::from_str(line).unwrap()
    }

    #[test]
    fn utf8_split_across_chunks_is_carried_over() {
        let mut e = CastEncoder::new();
        let s = "héllo €uro 🎉!".as_bytes();
        let mut got = String::new();
        // Feed one byte at a time: every multi-byte char is split.
        for (i, b) in s.iter().enumerate() {
            if let Some(l) = e.output(Duration::from_millis(i as u64), &[*b]) {
                got.push_str(&data_of(&l).2);
            }
        }
        assert!(e.finish(Duration::from_secs(1)).is_none());
        assert_eq!(got, "héllo €uro 🎉!");
    }

    #[test]
    fn incomplete_char_alone_emits_nothing() {
        let mut e = CastEncoder::new();
        assert!(e.output(Duration::ZERO, &[0xE2, 0x82]).is_none());
        let l = e.output(Duration::from_millis(1500), &[0xAC, b'x']).unwrap();
        let (t, code, d) = data_of(&l);
        assert_eq!((t, code.as_str(), d.as_str()), (1.5, "o", "€x"));
    }

    #[test]
    fn invalid_bytes_become_replacement_and_do_not_stall() {
        let mut e = CastEncoder::new();
        let l = e.output(Duration::ZERO, &[b'a', 0xFF, b'b', 0xC3]).unwrap();
        assert_eq!(data_of(&l).2, "a\u{FFFD}b");
        let l = e.finish(Duration::ZERO).unwrap();
        assert_eq!(data_of(&l).2, "\u{FFFD}");
    }

    #[test]
    fn control_characters_round_trip_through_json() {
        let mut e = CastEncoder::new();
        let raw = "\x1b[1;31mred\x1b[0m\r\n\t\"q\"\\";
        let l = e.output(Duration::from_micros(1_234_567), raw.as_bytes()).unwrap();
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
        assert_eq!(data_of(&e.resize(Duration::from_secs(2), 100, 40)), (2.0, "r".into(), "100x40".into()));
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
            let line = r.encode_output(b"hi\r\n").unwrap();
            r.handle().send(line).await;
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
