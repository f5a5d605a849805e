//! CMS interoperability with the real `openssl` binary, both directions, for
//! P-256 and RSA identities (PROFILE.md section 7).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use latssiam::crypto::{self, CryptoError};
use latssiam::{Address, Fingerprint, Identity};

fn openssl(dir: &Path, args: &[&str]) -> std::process::Output {
    let out = Command::new("openssl").current_dir(dir).args(args).output().expect("run openssl");
    out
}

fn openssl_ok(dir: &Path, args: &[&str]) {
    let out = openssl(dir, args);
    assert!(out.status.success(), "openssl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A message of `n` octets, with a header and non-ASCII text.
fn message(n: usize) -> Vec<u8> {
    let mut m =
        "From: a@example.org\r\nTo: b@example.org\r\nSubject: Grüße\r\n\r\nHallo, Wörld!\r\n".as_bytes().to_vec();
    while m.len() < n {
        m.push(b'a' + (m.len() % 26) as u8);
    }
    m
}

struct Party {
    dir: tempfile::TempDir,
    id: Identity,
}

impl Party {
    /// An identity made by this library.
    fn ours(rsa: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let addr: Address = "alice@example.org".parse().unwrap();
        let id = Identity::generate(&addr, Some("Alice"), rsa).unwrap();
        id.save(dir.path()).unwrap();
        Self { dir, id }
    }

    /// An identity made by `openssl req`, its key as OpenSSL writes it.
    fn openssls(rsa: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = if rsa { "rsa:2048" } else { "ec" };
        let mut args = vec!["req", "-x509", "-newkey", key, "-nodes", "-keyout", "key.pem", "-out", "cert.pem"];
        if !rsa {
            args.extend(["-pkeyopt", "ec_paramgen_curve:P-256"]);
        }
        args.extend([
            "-days",
            "2",
            "-subj",
            "/CN=Bob/UID=bob",
            "-addext",
            "subjectAltName=DNS:example.net,email:bob@example.net",
        ]);
        openssl_ok(dir.path(), &args);
        let id = Identity::load(dir.path()).unwrap();
        Self { dir, id }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn seal_opened_by_openssl(rsa: bool) {
    let bob = Party::ours(rsa);
    let msg = message(4096);
    let der = crypto::seal(&msg, bob.id.cert_der()).unwrap();
    std::fs::write(bob.path("msg.der"), &der).unwrap();
    openssl_ok(
        bob.dir.path(),
        &[
            "cms", "-decrypt", "-binary", "-inform", "DER", "-in", "msg.der", "-recip", "cert.pem", "-inkey",
            "key.pem", "-out", "plain",
        ],
    );
    assert_eq!(std::fs::read(bob.path("plain")).unwrap(), msg);
}

#[test]
fn openssl_decrypts_what_seal_makes_p256() {
    seal_opened_by_openssl(false);
}

#[test]
fn openssl_decrypts_what_seal_makes_rsa() {
    seal_opened_by_openssl(true);
}

fn openssl_sealed_opened(rsa: bool, keyopts: &[&str]) {
    let bob = Party::openssls(rsa);
    let msg = message(5000);
    std::fs::write(bob.path("plain"), &msg).unwrap();
    let mut args = vec!["cms", "-encrypt", "-binary", "-aes-256-gcm", "-recip", "cert.pem"];
    for k in keyopts {
        args.extend(["-keyopt", k]);
    }
    args.extend(["-outform", "DER", "-in", "plain", "-out", "msg.der"]);
    openssl_ok(bob.dir.path(), &args);
    let der = std::fs::read(bob.path("msg.der")).unwrap();
    assert_eq!(crypto::open(&der, &bob.id).unwrap(), msg);
}

#[test]
fn open_takes_openssl_p256_sha256_kdf() {
    openssl_sealed_opened(false, &["ecdh_kdf_md:sha256"]);
}

#[test]
fn open_takes_openssl_p256_default_sha1_kdf() {
    openssl_sealed_opened(false, &[]);
}

#[test]
fn open_takes_openssl_rsa_oaep_sha256() {
    openssl_sealed_opened(true, &["rsa_padding_mode:oaep", "rsa_oaep_md:sha256"]);
}

#[test]
fn open_takes_openssl_rsa_default_pkcs1() {
    openssl_sealed_opened(true, &[]);
}

#[test]
fn open_takes_openssl_subject_key_id_recipient() {
    let bob = Party::openssls(false);
    let msg = message(100);
    std::fs::write(bob.path("plain"), &msg).unwrap();
    openssl_ok(
        bob.dir.path(),
        &[
            "cms",
            "-encrypt",
            "-binary",
            "-aes-256-gcm",
            "-keyid",
            "-recip",
            "cert.pem",
            "-outform",
            "DER",
            "-in",
            "plain",
            "-out",
            "msg.der",
        ],
    );
    let der = std::fs::read(bob.path("msg.der")).unwrap();
    assert_eq!(crypto::open(&der, &bob.id).unwrap(), msg);
}

fn signature_verified_by_openssl(rsa: bool) {
    let alice = Party::ours(rsa);
    let content = message(4096);
    let sig = crypto::sign(&content, &alice.id).unwrap();
    std::fs::write(alice.path("content"), &content).unwrap();
    std::fs::write(alice.path("sig.der"), &sig).unwrap();
    let verify = |content_file: &str| {
        openssl(
            alice.dir.path(),
            &[
                "cms",
                "-verify",
                "-binary",
                "-noverify",
                "-inform",
                "DER",
                "-in",
                "sig.der",
                "-content",
                content_file,
                "-out",
                "/dev/null",
            ],
        )
    };
    let ok = verify("content");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let mut other = content.clone();
    other[0] ^= 1;
    std::fs::write(alice.path("other"), &other).unwrap();
    assert!(!verify("other").status.success(), "openssl accepted a signature over other bytes");
}

#[test]
fn openssl_verifies_what_sign_makes_p256() {
    signature_verified_by_openssl(false);
}

#[test]
fn openssl_verifies_what_sign_makes_rsa() {
    signature_verified_by_openssl(true);
}

fn openssl_signature_verified(rsa: bool) {
    let bob = Party::openssls(rsa);
    let content = message(3000);
    std::fs::write(bob.path("content"), &content).unwrap();
    openssl_ok(
        bob.dir.path(),
        &[
            "cms", "-sign", "-binary", "-signer", "cert.pem", "-inkey", "key.pem", "-outform", "DER", "-in", "content",
            "-out", "sig.der",
        ],
    );
    let sig = std::fs::read(bob.path("sig.der")).unwrap();
    let signer = crypto::verify(&sig, &content).unwrap();
    assert_eq!(Fingerprint::of(&signer), bob.id.fingerprint());
    let mut other = content.clone();
    other.push(b'!');
    assert!(matches!(crypto::verify(&sig, &other), Err(CryptoError::BadSignature)));
}

#[test]
fn verify_takes_openssl_signature_p256() {
    openssl_signature_verified(false);
}

#[test]
fn verify_takes_openssl_signature_rsa() {
    openssl_signature_verified(true);
}

#[test]
fn openssl_identities_map_to_addresses() {
    let bob = Party::openssls(false);
    assert_eq!(bob.id.address().map(ToString::to_string).as_deref(), Some("bob@example.net"));
    assert_eq!(bob.id.info().display_name.as_deref(), Some("Bob"));
    // Our certificate's fingerprint is what `openssl x509 -fingerprint -sha256` prints.
    let alice = Party::ours(false);
    let out = openssl(alice.dir.path(), &["x509", "-in", "cert.pem", "-noout", "-fingerprint", "-sha256"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let hex: String = text.split('=').nth(1).unwrap().trim().replace(':', "").to_lowercase();
    assert_eq!(hex, alice.id.fingerprint().to_string());
}

#[test]
fn legacy_key_encodings_load() {
    for (rsa, conv) in [
        (false, vec!["ec", "-in", "key.pem", "-out", "legacy.pem"]),
        (true, vec!["rsa", "-traditional", "-in", "key.pem", "-out", "legacy.pem"]),
    ] {
        let bob = Party::openssls(rsa);
        openssl_ok(bob.dir.path(), &conv);
        let legacy = std::fs::read_to_string(bob.path("legacy.pem")).unwrap();
        assert!(legacy.contains(if rsa { "RSA PRIVATE KEY" } else { "EC PRIVATE KEY" }), "{legacy}");
        let cert = std::fs::read(bob.path("cert.pem")).unwrap();
        let id = Identity::from_pem(&cert, legacy.as_bytes()).unwrap();
        let msg = message(64);
        assert_eq!(crypto::open(&crypto::seal(&msg, id.cert_der()).unwrap(), &id).unwrap(), msg);
    }
}
