//! Malformed or hostile CMS input is refused with a typed error, never a panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use latssiam::crypto::{self, CryptoError};
use latssiam::{Address, Fingerprint, Identity};
use proptest::prelude::*;

fn id(addr: &str, rsa: bool) -> Identity {
    Identity::generate(&addr.parse::<Address>().unwrap(), None, rsa).unwrap()
}

fn both() -> [Identity; 2] {
    [id("bob@example.org", false), id("rob@example.org", true)]
}

#[test]
fn round_trips_p256_and_rsa() {
    for bob in both() {
        let msg = b"Subject: hi\r\n\r\nhello".to_vec();
        assert_eq!(crypto::open(&crypto::seal(&msg, bob.cert_der()).unwrap(), &bob).unwrap(), msg);
        assert_eq!(crypto::open(&crypto::seal(b"", bob.cert_der()).unwrap(), &bob).unwrap(), b"");
        let sig = crypto::sign(&msg, &bob).unwrap();
        assert_eq!(Fingerprint::of(&crypto::verify(&sig, &msg).unwrap()), bob.fingerprint());
    }
}

#[test]
fn a_tampered_ciphertext_is_refused() {
    for bob in both() {
        let msg = vec![7u8; 1000];
        let der = crypto::seal(&msg, bob.cert_der()).unwrap();
        // Flip one octet inside the encrypted content (it sits before the 16-octet MAC at the end).
        let mut bad = der.clone();
        let i = der.len() - 18 - 500;
        bad[i] ^= 0x01;
        assert!(matches!(crypto::open(&bad, &bob), Err(CryptoError::Decrypt)));
        // Flip one octet of the MAC.
        let mut bad = der.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x80;
        assert!(matches!(crypto::open(&bad, &bob), Err(CryptoError::Decrypt)));
    }
}

#[test]
fn a_truncated_message_is_malformed() {
    for bob in both() {
        let der = crypto::seal(b"hello", bob.cert_der()).unwrap();
        for cut in [1, 10, der.len() / 2, der.len() - 1] {
            assert!(matches!(crypto::open(&der[..cut], &bob), Err(CryptoError::Malformed(_))), "cut at {cut}");
        }
        let sig = crypto::sign(b"hello", &bob).unwrap();
        assert!(matches!(crypto::verify(&sig[..sig.len() - 3], b"hello"), Err(CryptoError::Malformed(_))));
    }
}

#[test]
fn a_message_for_someone_else_is_not_for_us() {
    let alice = id("alice@example.org", false);
    let [bob, rob] = both();
    let der = crypto::seal(b"for alice", alice.cert_der()).unwrap();
    assert!(matches!(crypto::open(&der, &bob), Err(CryptoError::NotForRecipient)));
    assert!(matches!(crypto::open(&der, &rob), Err(CryptoError::NotForRecipient)));
    let der = crypto::seal(b"for rob", rob.cert_der()).unwrap();
    assert!(matches!(crypto::open(&der, &alice), Err(CryptoError::NotForRecipient)));
}

#[test]
fn a_signature_over_other_bytes_is_refused() {
    for bob in both() {
        let sig = crypto::sign(b"the message", &bob).unwrap();
        assert!(matches!(crypto::verify(&sig, b"another message"), Err(CryptoError::BadSignature)));
    }
}

#[test]
fn a_signature_with_a_swapped_certificate_is_refused() {
    // Mallory signs, then splices Alice's certificate in place of his own:
    // the signer named in the SignerInfo is no longer included.
    let mallory = id("mally@example.org", false);
    let sig = crypto::sign(b"m", &mallory).unwrap();
    let m = mallory.cert_der().as_ref();
    // Same-length certificates keep every DER length in the SignedData right.
    let alice = (0..200)
        .map(|_| id("alice@example.org", false))
        .find(|a| a.cert_der().len() == m.len())
        .expect("a certificate of the same length");
    let pos = sig.windows(m.len()).position(|w| w == m).unwrap();
    let mut forged = sig[..pos].to_vec();
    forged.extend_from_slice(alice.cert_der());
    forged.extend_from_slice(&sig[pos + m.len()..]);
    assert!(matches!(crypto::verify(&forged, b"m"), Err(CryptoError::SignerNotFound)));
}

#[test]
fn the_wrong_structure_is_refused() {
    let bob = id("bob@example.org", false);
    let sig = crypto::sign(b"x", &bob).unwrap();
    let msg = crypto::seal(b"x", bob.cert_der()).unwrap();
    assert!(matches!(crypto::open(&sig, &bob), Err(CryptoError::Unsupported(_))));
    assert!(matches!(crypto::verify(&msg, b"x"), Err(CryptoError::Malformed(_))));
    assert!(matches!(crypto::seal(b"x", b"not a certificate"), Err(CryptoError::BadCertificate(_))));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn corrupted_messages_never_panic(pos in any::<prop::sample::Index>(), xor in 1u8..=255) {
        thread_local! {
            static BOB: Identity = id("bob@example.org", false);
        }
        BOB.with(|bob| {
            let der = crypto::seal(b"some plaintext", bob.cert_der()).unwrap();
            let mut bad = der.clone();
            let i = pos.index(bad.len());
            bad[i] ^= xor;
            // Any error is fine; a panic or a silently different plaintext is not.
            if let Ok(p) = crypto::open(&bad, bob) {
                assert_eq!(p, b"some plaintext");
            }
            let sig = crypto::sign(b"data", bob).unwrap();
            let mut bad = sig.clone();
            let i = pos.index(bad.len());
            bad[i] ^= xor;
            let _ = crypto::verify(&bad, b"data");
        });
    }
}
