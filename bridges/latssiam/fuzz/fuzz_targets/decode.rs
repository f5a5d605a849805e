//! Any bytes from a peer: the decoder returns frames or a typed error, never
//! panics, and every frame it returns re-encodes to bytes that decode to it.
#![no_main]

use latssiam::wire::{decode_all, encode_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (frames, _err) = decode_all(data);
    for frame in frames {
        if let Ok(bytes) = encode_frame(&frame) {
            let (again, err) = decode_all(&bytes);
            assert!(err.is_none());
            assert_eq!(again, vec![frame]);
        }
    }
});
