//! The HTTP request head parser (src/control/http.rs) that every control and
//! relay connection meets first, before any authentication, and the
//! response-head parser a node runs on the server's answer.
//!
//! Invariants: no panic; a parsed head ends in CRLFCRLF within the limit;
//! parsing is prefix-stable (the head alone parses the same); re-encoding a
//! parsed head canonically parses back to the same head.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tailgate::control::wire::http::{MAX_HEAD, parse_request, parse_response};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((head, n))) = parse_request(data) {
        assert!(n <= data.len() && n <= MAX_HEAD, "head of {n} bytes");
        assert!(data[..n].ends_with(b"\r\n\r\n"));
        assert_eq!(parse_request(&data[..n]), Ok(Some((head.clone(), n))), "not prefix-stable");
        let mut canon = format!("{} {} {}\r\n", head.method, head.path, head.version);
        for (k, v) in &head.headers {
            assert_eq!(k, &k.to_ascii_lowercase());
            canon.push_str(&format!("{k}: {v}\r\n"));
        }
        canon.push_str("\r\n");
        // ": " can make the canonical form longer than the original, so a
        // head near the limit may not fit any more: skip those.
        if canon.len() <= MAX_HEAD {
            let (again, m) = parse_request(canon.as_bytes()).expect("canonical head refused").expect("canonical head incomplete");
            assert_eq!(again, head, "canonical re-encoding changes the head");
            assert_eq!(m, canon.len());
        }
        let _ = head.upgrade();
    }
    if let Ok(Some((_code, _reason, n))) = parse_response(data) {
        assert!(n <= data.len());
        assert!(data[..n].ends_with(b"\r\n\r\n"));
    }
});
