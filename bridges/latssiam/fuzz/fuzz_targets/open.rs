//! Any DER as an ENCRYPTED MESSAGE or SIGNATURE: `open` and `verify` return a
//! typed error or a result, never panic.
//!
//! The identities are fixed (keys/, compiled in) so that the seed corpus
//! (corpus/open, made by make-corpus.sh with `openssl cms` and the CLI) holds
//! messages that really decrypt to them and signatures over the content
//! verified here: the fuzzer starts past key agreement, key unwrapping and
//! AES-GCM instead of at the first DER tag.
#![no_main]

use std::sync::OnceLock;

use latssiam::{crypto, Identity};
use libfuzzer_sys::fuzz_target;

/// What every signature in the corpus is made over.
const SIGNED_CONTENT: &[u8] = b"content";

fn identities() -> &'static [Identity; 2] {
    static IDS: OnceLock<[Identity; 2]> = OnceLock::new();
    IDS.get_or_init(|| {
        let load = |cert: &[u8], key: &[u8]| Identity::from_pem(cert, key).expect("fixed fuzz identity");
        [
            load(include_bytes!("../keys/p256/cert.pem"), include_bytes!("../keys/p256/key.pem")),
            load(include_bytes!("../keys/rsa/cert.pem"), include_bytes!("../keys/rsa/key.pem")),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let structure_ok = crypto::check_message_structure(data).is_ok();
    for id in identities() {
        if crypto::open(data, id).is_ok() {
            // What opens is an AuthEnvelopedData: the server-side check agrees.
            assert!(structure_ok, "open succeeded on a message check_message_structure refuses");
        }
    }
    // The signer's certificate is not checked against anything but the
    // signature, so it may be one that x509-parser (CertInfo) refuses, e.g.
    // with a mangled signatureValue of its own: not asserted here.
    let _ = crypto::verify(data, SIGNED_CONTENT);
});
