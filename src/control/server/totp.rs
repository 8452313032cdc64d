//! TOTP (RFC 6238) for SSH `check` rules: secrets, codes, the enrolment URI
//! and its QR code. The arithmetic is `totp-rs`'s; this module fixes the
//! parameters authenticator apps and `oathtool --totp -b SECRET` agree on
//! (SHA-1, 6 digits, 30 s steps) and the skew we accept (one step each way).

#![warn(missing_docs)]

use totp_rs::{Algorithm, Builder, Secret, Totp};

/// Seconds per code.
pub(crate) const STEP: u64 = 30;
/// Digits per code.
pub(crate) const DIGITS: u8 = 6;
/// Steps accepted either side of now (clock drift, a code typed at the edge).
pub(crate) const SKEW: u16 = 1;
/// Name shown in authenticator apps.
pub(crate) const ISSUER: &str = "tailgate";

#[derive(Debug, thiserror::Error)]
pub(crate) enum TotpError {
    #[error("stored TOTP secret is not valid base32")]
    BadSecret,
    #[error("TOTP: {0}")]
    Totp(String),
}

/// A fresh 160-bit secret (RFC 4226's recommended length), base32 without padding.
pub(crate) fn new_secret() -> String {
    let bytes: [u8; 20] = rand::random();
    Secret::from(bytes.to_vec()).to_base32()
}

fn totp(secret_b32: &str, digits: u8) -> Result<Totp, TotpError> {
    let secret = Secret::try_from_base32(secret_b32).map_err(|_| TotpError::BadSecret)?;
    Builder::new()
        .with_algorithm(Algorithm::SHA1)
        .with_digits(digits)
        .with_step_duration(STEP)
        .with_skew(SKEW)
        .with_secret(secret)
        .build()
        .map_err(|e| TotpError::Totp(e.to_string()))
}

/// The code for Unix time `now`.
pub(crate) fn code_at(secret_b32: &str, now: u64) -> Result<String, TotpError> {
    Ok(totp(secret_b32, DIGITS)?.generate(now).to_string())
}

/// The time step (`now / 30`) whose code `code` is, within the skew; `None`
/// for a wrong or malformed code. Only plain 6-digit codes are considered.
pub(crate) fn verify(secret_b32: &str, code: &str, now: u64) -> Result<Option<u64>, TotpError> {
    let code = code.trim();
    if code.len() != DIGITS as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    Ok(totp(secret_b32, DIGITS)?.check(code, now))
}

/// `otpauth://totp/tailgate:USER?secret=...` (Google's key-URI format, which
/// every authenticator app reads).
pub(crate) fn otpauth_uri(user: &str, secret_b32: &str) -> String {
    let label = format!("{ISSUER}:{user}");
    format!("otpauth://totp/{}?secret={secret_b32}&issuer={ISSUER}&algorithm=SHA1&digits={DIGITS}&period={STEP}", percent_encode(&label))
}

/// Percent-encodes everything but RFC 3986 unreserved characters and ':'/'@'
/// (allowed in a path segment and kept readable in apps).
fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The URI as a QR code drawn with Unicode half blocks (two modules per
/// character cell), dark on light, with the quiet zone scanners need.
pub(crate) fn qr_text(uri: &str) -> Result<String, TotpError> {
    let code = qrcode::QrCode::new(uri.as_bytes()).map_err(|e| TotpError::Totp(format!("QR code: {e}")))?;
    Ok(code
        .render::<qrcode::render::unicode::Dense1x2>()
        .dark_color(qrcode::render::unicode::Dense1x2::Light)
        .light_color(qrcode::render::unicode::Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B, SHA-1 rows: seed "12345678901234567890", 8 digits.
    #[test]
    fn rfc6238_sha1_vectors() {
        let seed = Secret::from(b"12345678901234567890".to_vec()).to_base32();
        let t = totp(&seed, 8).unwrap();
        for (time, want) in [
            (59u64, "94287082"),
            (1111111109, "07081804"),
            (1111111111, "14050471"),
            (1234567890, "89005924"),
            (2000000000, "69279037"),
            (20000000000, "65353130"),
        ] {
            assert_eq!(t.generate(time).to_string(), want, "T = {time}");
        }
        // The 6-digit code is the low 6 digits of the same truncation.
        assert_eq!(code_at(&seed, 59).unwrap(), "287082");
    }

    #[test]
    fn verify_accepts_one_step_of_skew_and_returns_the_step() {
        let s = new_secret();
        assert_eq!(s.len(), 32);
        let now = 1_700_000_000;
        let step = now / STEP;
        assert_eq!(verify(&s, &code_at(&s, now).unwrap(), now).unwrap(), Some(step));
        assert_eq!(verify(&s, &code_at(&s, now - STEP).unwrap(), now).unwrap(), Some(step - 1));
        assert_eq!(verify(&s, &code_at(&s, now + STEP).unwrap(), now).unwrap(), Some(step + 1));
        assert_eq!(verify(&s, &code_at(&s, now - 2 * STEP).unwrap(), now).unwrap(), None);
        assert_eq!(verify(&s, &format!(" {} ", code_at(&s, now).unwrap()), now).unwrap(), Some(step));
        for junk in ["", "12345", "1234567", "abcdef", "12 456", "١٢٣٤٥٦"] {
            assert_eq!(verify(&s, junk, now).unwrap(), None, "{junk:?}");
        }
        assert!(verify("not base32!", "123456", now).is_err());
    }

    #[test]
    fn uri_and_qr() {
        let u = otpauth_uri("alice@example.com", "JBSWY3DPEHPK3PXP");
        assert_eq!(
            u,
            "otpauth://totp/tailgate:alice@example.com?secret=JBSWY3DPEHPK3PXP&issuer=tailgate&algorithm=SHA1&digits=6&period=30"
        );
        assert!(otpauth_uri("a b/c", "X").starts_with("otpauth://totp/tailgate:a%20b%2Fc?"));
        let q = qr_text(&u).unwrap();
        assert!(q.lines().count() > 15 && q.contains('▀'));
    }
}
