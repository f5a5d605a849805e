//! Any bytes as a run of fragments offered to the joiner: records separated
//! by `\0\0`, each one octet naming the signer then a fragment's plaintext.
//! The joiner never panics, and a message it completes for a signer is
//! exactly the slices that signer offered for that set, in order, within the limit.
#![no_main]

use std::collections::HashMap;
use std::sync::OnceLock;

use latssiam::fragment::{parse, Joiner, Offer};
use latssiam::Fingerprint;
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 4096;

fn db() -> &'static sled::Db {
    static DB: OnceLock<sled::Db> = OnceLock::new();
    DB.get_or_init(|| sled::Config::new().temporary(true).open().unwrap_or_else(|e| panic!("sled: {e}")))
}

fuzz_target!(|data: &[u8]| {
    let tree = db().open_tree("partials").unwrap_or_else(|e| panic!("{e}"));
    let _ = tree.clear();
    let joiner = Joiner::new(tree, LIMIT);
    // What each (signer, id, number) was first accepted with.
    let mut kept: HashMap<(u8, String, u32), Vec<u8>> = HashMap::new();
    for record in data.split(|&b| b == 0).filter(|r| !r.is_empty()) {
        let (signer, plaintext) = (record[0] % 3, &record[1..]);
        let Ok(Some(fragment)) = parse(plaintext) else { continue };
        let fp = Fingerprint::from_bytes([signer; 32]);
        match joiner.offer(&fp, &fragment, 0) {
            Ok(Offer::Complete(message)) => {
                assert!(message.len() <= LIMIT);
                kept.entry((signer, fragment.id.clone(), fragment.number)).or_insert_with(|| fragment.slice.to_vec());
                let mut expected = Vec::new();
                for n in 1..=fragment.total {
                    expected.extend_from_slice(&kept[&(signer, fragment.id.clone(), n)]);
                }
                assert_eq!(message, expected);
                let _ = joiner.finish(&fp, &fragment.id, 0);
                kept.retain(|(s, id, _), _| !(*s == signer && *id == fragment.id));
            }
            Ok(_) => {
                let slice = kept.entry((signer, fragment.id.clone(), fragment.number)).or_insert_with(|| fragment.slice.to_vec());
                assert_eq!(slice.as_slice(), fragment.slice, "a duplicate is the same octets");
            }
            Err(_) => {}
        }
    }
});
