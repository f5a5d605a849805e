//! Any bytes as a Gemini request line: `parse_request` never panics, and a
//! request it accepts is one the capsule can use as it is.
#![no_main]

use latssiam::gemini::{parse_request, MAX_URL};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = parse_request(data) else { return };
    let host = req.host();
    assert!(!host.is_empty());
    assert_eq!(host, host.to_ascii_lowercase());
    assert!(!host.chars().any(|c| matches!(c, '/' | '@' | ' ') || c.is_control()), "{host:?}");
    let path = req.path();
    assert!(path.starts_with('/'), "{path:?}");
    assert!(!path.bytes().any(|b| matches!(b, 0 | b'\r' | b'\n')), "{path:?}");
    assert!(!path.split('/').any(|s| s == ".."), "{path:?}");
    let canonical = format!("gemini://{host}:{}{path}", req.port());
    assert!(canonical.len() <= MAX_URL, "{} octets", canonical.len());
    // The canonical form is a request that parses to the same thing.
    assert_eq!(parse_request(format!("{canonical}\r\n").as_bytes()).as_ref(), Ok(&req));
});
