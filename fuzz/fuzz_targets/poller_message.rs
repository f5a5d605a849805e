//! Any plaintext a LATSSIAM contact could send (what `crypto::open` returned),
//! through the poller's checks: `inspect` decides what to send out, or which
//! code to refuse the message with, and never panics. A refusal is an answer
//! to `ACCEPT`, so by PROFILE.md section 4 its code is `32` or `52`.
#![no_main]

use std::sync::OnceLock;

use latssiam::wire::Code;
use latssiam_bridge::gateway::poller::{inspect, Policy};
use latssiam_bridge::gateway::store::Contact;
use libfuzzer_sys::fuzz_target;

fn contact() -> &'static Contact {
    static CONTACT: OnceLock<Contact> = OnceLock::new();
    CONTACT.get_or_init(|| Contact {
        address: "alice@example.org".into(),
        cert: vec![],
        email: Some("alice@corp.example".into()),
        allow_send: true,
        server: None,
        gone: false,
    })
}

fuzz_target!(|data: &[u8]| {
    match inspect(data, contact(), &Policy::default()) {
        Ok(_outbound) => {}
        Err((code, why)) => {
            assert!(
                matches!(code, Code::MessageRefused | Code::SignatureRequired),
                "refused with {code} ({why}): not an answer to ACCEPT"
            );
        }
    }
});
