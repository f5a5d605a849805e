//! Any DER as an ENCRYPTED MESSAGE or SIGNATURE: `open` and `verify` return a
//! typed error or a result, never panic.
#![no_main]

use std::sync::OnceLock;

use latssiam::{crypto, Address, Identity};
use libfuzzer_sys::fuzz_target;

fn identities() -> &'static [Identity; 2] {
    static IDS: OnceLock<[Identity; 2]> = OnceLock::new();
    IDS.get_or_init(|| {
        let a: Address = "fuzz@example.org".parse().unwrap();
        [Identity::generate(&a, None, false).unwrap(), Identity::generate(&a, None, true).unwrap()]
    })
}

fuzz_target!(|data: &[u8]| {
    for id in identities() {
        let _ = crypto::open(data, id);
    }
    let _ = crypto::verify(data, b"content");
});
