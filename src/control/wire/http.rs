//! Just enough HTTP/1.1 for the upgrade, sans-IO: parse a request head,
//! build the few responses we send. Bodies are never read.
#![warn(missing_docs)]

/// Largest request head we accept.
pub const MAX_HEAD: usize = 8 * 1024;

/// A parsed request line and headers (what arrives before the upgrade).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Uppercase ASCII method (`GET`).
    pub method: String,
    /// Request target, starting with `/` (query included).
    pub path: String,
    /// `HTTP/1.1` or `HTTP/1.0`.
    pub version: String,
    /// Header names lowercased, values trimmed, in order.
    pub headers: Vec<(String, String)>,
}

impl RequestHead {
    /// The first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The `Upgrade` token, lowercased, if the request asks for one
    /// (`Connection: upgrade` is not required: some proxies drop it).
    pub fn upgrade(&self) -> Option<String> {
        self.header("upgrade").map(|v| v.trim().to_ascii_lowercase())
    }
}

/// Why a request or response head was refused; the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// No end of head within [`MAX_HEAD`] bytes.
    #[error("request head larger than {MAX_HEAD} bytes")]
    TooLarge,
    /// Not HTTP/1.x as we speak it; the text says which part.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
}

/// Parses a request head from the start of `buf`. `Ok(None)` = need more
/// bytes; `Ok(Some((head, n)))` = the head took `n` bytes (anything after
/// belongs to the upgraded protocol).
pub fn parse_request(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HttpError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err(HttpError::TooLarge);
        }
        return Ok(None);
    };
    if end + 4 > MAX_HEAD {
        return Err(HttpError::TooLarge);
    }
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| HttpError::Malformed("not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().ok_or(HttpError::Malformed("empty"))?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(path), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(HttpError::Malformed("bad request line"));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(HttpError::Malformed("bad method"));
    }
    if !path.starts_with('/') {
        return Err(HttpError::Malformed("bad path"));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(HttpError::Malformed("not HTTP/1.x"));
    }
    let mut headers = Vec::new();
    for line in lines {
        let (k, v) = line.split_once(':').ok_or(HttpError::Malformed("header without ':'"))?;
        if k.is_empty() || k.contains(' ') {
            return Err(HttpError::Malformed("bad header name"));
        }
        headers.push((k.to_ascii_lowercase(), v.trim().to_string()));
    }
    Ok(Some((RequestHead { method: method.into(), path: path.into(), version: version.into(), headers }, end + 4)))
}

/// A complete non-upgrade response that closes the connection.
pub fn simple_response(status: u16, reason: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A redirect (the browser's way to the identity provider). A location
/// with a line break would split the head, so it is refused.
pub(crate) fn redirect(location: &str) -> Vec<u8> {
    if location.contains(['\r', '\n']) {
        return simple_response(500, "Internal Server Error", "bad redirect\n");
    }
    format!("HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").into_bytes()
}

/// The server's `101` accepting the upgrade to `token`.
pub(crate) fn switching_protocols(token: &str) -> Vec<u8> {
    format!("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {token}\r\n\r\n").into_bytes()
}

/// The upgrade request a node sends.
pub fn upgrade_request(host: &str, path: &str, token: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: {token}\r\nUser-Agent: tailgate/{}\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    )
    .into_bytes()
}

/// Parses a response status line + headers (the node reading the 101).
/// Returns (status, bytes used).
pub fn parse_response(buf: &[u8]) -> Result<Option<(u16, String, usize)>, HttpError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err(HttpError::TooLarge);
        }
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&buf[..end]);
    let line = text.split("\r\n").next().unwrap_or("");
    let mut parts = line.splitn(3, ' ');
    let (Some(v), Some(code)) = (parts.next(), parts.next()) else {
        return Err(HttpError::Malformed("bad status line"));
    };
    if !v.starts_with("HTTP/1.") {
        return Err(HttpError::Malformed("not an HTTP response"));
    }
    let code = code.parse().map_err(|_| HttpError::Malformed("bad status code"))?;
    Ok(Some((code, parts.next().unwrap_or("").to_string(), end + 4)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_upgrade_request_and_keeps_trailing_bytes() {
        let mut req = upgrade_request("h:1", "/tailgate/control", "tailgate-control");
        let head_len = req.len();
        req.extend_from_slice(b"\x00\x20noise");
        let (head, n) = parse_request(&req).unwrap().unwrap();
        assert_eq!(n, head_len);
        assert_eq!(head.method, "GET");
        assert_eq!(head.path, "/tailgate/control");
        assert_eq!(head.upgrade().as_deref(), Some("tailgate-control"));
        assert_eq!(head.header("HOST"), Some("h:1"));
    }

    #[test]
    fn incomplete_garbage_and_huge_heads() {
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap(), None);
        assert!(parse_request(b"\x16\x03\x01\x02\x00\r\n\r\n").is_err());
        assert!(parse_request(b"GET / HTTP/1.1 extra\r\n\r\n").is_err());
        assert!(parse_request(b"GET / HTTP/1.1\r\nno colon\r\n\r\n").is_err());
        assert_eq!(parse_request(&vec![b'a'; MAX_HEAD + 1]), Err(HttpError::TooLarge));
    }

    #[test]
    fn a_redirect_cannot_split_the_head() {
        let r = String::from_utf8(redirect("http://idp/auth?x=1")).unwrap();
        assert!(r.starts_with("HTTP/1.1 302 Found\r\nLocation: http://idp/auth?x=1\r\n"), "{r}");
        let r = String::from_utf8(redirect("http://idp/\r\nSet-Cookie: x=1")).unwrap();
        assert!(r.starts_with("HTTP/1.1 500") && !r.contains("Set-Cookie"), "{r}");
    }

    #[test]
    fn parses_101() {
        let r = switching_protocols("tailgate-control");
        let (code, _, n) = parse_response(&r).unwrap().unwrap();
        assert_eq!((code, n), (101, r.len()));
        let (code, reason, _) = parse_response(&simple_response(404, "Not Found", "no")).unwrap().unwrap();
        assert_eq!((code, reason.as_str()), (404, "Not Found"));
    }
}
