//! Test certificates made with rcgen (included with `#[path]` by the TLS
//! and ACME tests).
#![allow(dead_code)]

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// A CA, and a server certificate it signs for `names` (IPs or DNS names).
/// Writes `DIR/PREFIX-ca.pem`, `-cert.pem`, `-key.pem`; returns the CA PEM.
pub fn make_certs(dir: &Path, prefix: &str, names: &[&str]) -> String {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, format!("{prefix} test CA"));
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    std::fs::write(dir.join(format!("{prefix}-ca.pem")), ca_cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{prefix}-cert.pem")), leaf_cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{prefix}-key.pem")), leaf_key.serialize_pem()).unwrap();
    ca_cert.pem()
}
