//! `cargo bench -p latssiam --bench store`: what storing a `SEND` costs the
//! server's mailbox store, in octets written and CPU per message.
//!
//! Messages of the size the relay pair sends (a 4 KiB mail sealed to a P-256
//! certificate, with its signature) go into one mailbox, `BATCH` (default 1,
//! then 4) at a time, each batch made durable with one commit (an fdatasync
//! of the store's log), as the server's group commit does for the sessions
//! waiting on it. Printed per message:
//! - octets handed to write(2) by the process (`wchar` of `/proc/self/io`),
//!   against the octets of the message itself: the store's write
//!   amplification;
//! - octets that reached the block device (`write_bytes`);
//! - CPU (user + system, all threads: the flusher's fsync included).
//!
//! Linux only (`/proc`); deterministic in octets, noisy in CPU.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use latssiam::server::store::Store;
use latssiam::{crypto, Address, Identity};

const MESSAGES: u64 = 3000;

/// `(wchar, write_bytes)` of this process so far.
fn written() -> Option<(u64, u64)> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    let field = |name: &str| io.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse::<u64>().ok());
    Some((field("wchar:")?, field("write_bytes:")?))
}

/// User + system CPU of this process so far, in microseconds.
fn cpu_us() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // Linux reports these in USER_HZ, 100 on every architecture it runs on.
    Some(ticks * 10_000)
}

fn main() {
    let bob = Identity::generate(&"bob@example.org".parse::<Address>().unwrap(), None, false).unwrap();
    let alice = Identity::generate(&"alice@example.org".parse::<Address>().unwrap(), None, false).unwrap();
    let message = crypto::seal(&[b'm'; 4096], bob.cert_der()).unwrap();
    let signature = crypto::sign(&message, &alice).unwrap();
    let size = message.len() + signature.len();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    for batch in [1u64, 4] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (owner, sender) = (bob.fingerprint(), alice.fingerprint());
        let (Some((w0, b0)), Some(c0)) = (written(), cpu_us()) else {
            println!("store: /proc/self/io or /proc/self/stat cannot be read here; nothing measured");
            return;
        };
        for _ in 0..MESSAGES / batch {
            for _ in 0..batch {
                store.insert_message(&owner, &sender, Some(&signature), &message).unwrap();
            }
            runtime.block_on(store.commit()).unwrap();
        }
        let ((w1, b1), c1) = (written().unwrap(), cpu_us().unwrap());
        let n = MESSAGES / batch * batch;
        println!(
            "store, {size}-octet messages (sealed 4 KiB + signature), {batch} per flush: {} octets written per message \
             ({:.1}x the message), {} reached the disk; {} us CPU per message",
            (w1 - w0) / n,
            (w1 - w0) as f64 / (n * size as u64) as f64,
            (b1 - b0) / n,
            (c1 - c0) / n
        );
    }
}
