//! Disco (src/disco.rs) with fixed test keys: everything a stranger or a
//! peer can put in a datagram on the WireGuard socket or through the relay.
//!
//! - `Raw`: arbitrary datagrams into `classify` and `open`, once with only
//!   the real peer known and once with every sender "known" (reaches the
//!   Diffie-Hellman with attacker-chosen, possibly low-order, keys).
//! - `Plain`: arbitrary plaintexts sealed by the real peer with a valid tag
//!   (the post-decryption parser: `counter (8) | message`), sealed here from the documented wire
//!   format because `disco::seal` only takes a well-formed `Message`.
//! - `Mutate`: a real `seal`ed message with one byte flipped.
//!
//! Invariants: no panic; a decoded plaintext re-encodes to a prefix of itself
//! (trailing bytes are ignored by design); seal/open round-trips; any flipped
//! byte is refused; nothing opens as sent by an unknown or our own key.
#![no_main]

use std::sync::LazyLock;

use blake2::{Blake2s256, Digest};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use libfuzzer_sys::fuzz_target;
use tailgate::dataplane::disco::{self, DiscoKey, HEADER_LEN, MAGIC, Message};
use tailgate::key::{Key, PrivateKey};
use tailgate::dataplane::wg::public_key_of;

const OURS: Key = [0x11; 32];
const PEER: Key = [0x22; 32];
// Scalar multiplications dominate an execution; do these once.
static OURS_KEY: LazyLock<PrivateKey> = LazyLock::new(|| PrivateKey::from_bytes(OURS));
static PEER_KEY: LazyLock<PrivateKey> = LazyLock::new(|| PrivateKey::from_bytes(PEER));
static OURS_PUB: LazyLock<Key> = LazyLock::new(|| public_key_of(&OURS_KEY));
static PEER_PUB: LazyLock<Key> = LazyLock::new(|| public_key_of(&PEER_KEY));
static OURS_DISCO: LazyLock<DiscoKey> = LazyLock::new(|| DiscoKey::new(OURS_KEY.clone()));
static PEER_DISCO: LazyLock<DiscoKey> = LazyLock::new(|| DiscoKey::new(PEER_KEY.clone()));

/// Input layout: `mode (u8) | body`; mode % 3 = 0 `Raw`: body is the
/// datagram; 1 `Plain`: `nonce (24) | plaintext`; 2 `Mutate`: `at (u16 BE)
/// | xor (u8) | plaintext` (skipped unless the plaintext decodes).
enum Input<'a> {
    Raw(&'a [u8]),
    Plain { nonce: [u8; 24], plaintext: &'a [u8] },
    Mutate { msg: Message, at: u16, xor: u8 },
}

impl<'a> Input<'a> {
    fn parse(d: &'a [u8]) -> Option<Self> {
        let (&mode, body) = d.split_first()?;
        Some(match mode % 3 {
            0 => Input::Raw(body),
            1 => Input::Plain { nonce: body.get(..24)?.try_into().ok()?, plaintext: &body[24..] },
            _ => Input::Mutate {
                at: u16::from_be_bytes(body.get(..2)?.try_into().ok()?),
                xor: *body.get(2)?,
                msg: Message::decode(&body[3..])?,
            },
        })
    }
}

/// Seals raw `plaintext` from PEER to OURS exactly as the module docs
/// specify (BLAKE2s key over label, X25519, sender, receiver; header as AAD).
fn seal_raw(nonce: &[u8; 24], plaintext: &[u8]) -> Vec<u8> {
    let (ours_pub, peer_pub) = (*OURS_PUB, *PEER_PUB);
    let shared = x25519_dalek::StaticSecret::from(PEER).diffie_hellman(&x25519_dalek::PublicKey::from(ours_pub));
    let mut h = Blake2s256::new();
    h.update(b"tailgate-disco/2");
    h.update(shared.as_bytes());
    h.update(peer_pub);
    h.update(ours_pub);
    let key: [u8; 32] = h.finalize().into();
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&peer_pub);
    let aad_len = out.len();
    out.extend_from_slice(nonce);
    let ct =
        XChaCha20Poly1305::new((&key).into()).encrypt(XNonce::from_slice(nonce), Payload { msg: plaintext, aad: &out[..aad_len] }).unwrap();
    out.extend_from_slice(&ct);
    out
}

fn open(d: &[u8], any_sender: bool) -> Option<(Key, u64, Message)> {
    let peer_pub = *PEER_PUB;
    let r = disco::open(&OURS_DISCO, d, |k| any_sender || *k == peer_pub)?;
    assert_ne!(r.sender, *OURS_PUB, "opened a datagram claiming our own key");
    assert!(any_sender || r.sender == peer_pub, "opened a datagram from an unknown sender");
    Some((r.sender, r.counter, r.msg))
}

fn check_decode(plain: &[u8]) -> Option<Message> {
    let m = Message::decode(plain)?;
    let re = m.encode();
    assert!(plain.starts_with(&re), "{m:?} re-encodes to {re:?}, not a prefix of {plain:?}");
    assert_eq!(Message::decode(&re).as_ref(), Some(&m));
    Some(m)
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::parse(data) else { return };
    match input {
        Input::Raw(d) => {
            let kind = disco::classify(d);
            let a = open(d, false);
            let b = open(d, true);
            if a.is_some() || b.is_some() {
                assert_eq!(kind, disco::DatagramKind::Disco);
            }
            check_decode(d);
        }
        Input::Plain { nonce, plaintext } => {
            let d = seal_raw(&nonce, plaintext);
            // The sealed plaintext is `counter (u64 BE) | message`.
            let decoded = plaintext.get(8..).and_then(check_decode);
            let opened = open(&d, false).map(|(_, _, m)| m);
            assert_eq!(opened, decoded, "open disagrees with decode of the same plaintext");
        }
        Input::Mutate { msg, at, xor } => {
            let counter = u64::from(at) << 8 | u64::from(xor);
            let mut d = disco::seal(&PEER_DISCO, &OURS_PUB, counter, &msg);
            assert!(d.len() > HEADER_LEN);
            assert_eq!(open(&d, false), Some((*PEER_PUB, counter, msg)), "seal/open does not round-trip");
            let i = at as usize % d.len();
            if xor != 0 {
                d[i] ^= xor;
                assert_eq!(open(&d, true), None, "byte {i} flipped by {xor:#x} still opens");
            }
        }
    }
});
