//! `cargo bench -p latssiam`: codec decode throughput and CMS operation rates
//! on one core. A bench binary rather than criterion keeps the dependency tree
//! small; each figure is the mean over a fixed wall-clock window after a warm-up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use latssiam::wire::{encode_frame, Block, Frame, FrameCodec, Label, MAX_BLOCK_DER};
use latssiam::{crypto, Address, Identity};
use tokio_util::codec::Decoder;

const WINDOW: Duration = Duration::from_secs(2);

/// Runs `f` repeatedly for the window; returns iterations per second.
fn rate(mut f: impl FnMut()) -> f64 {
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_millis(300) {
        f();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < WINDOW {
        f();
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    // Largest block the profile allows: 400 lines of 64 base64 characters.
    let body = MAX_BLOCK_DER - 4;
    let mut der = vec![0x30, 0x82, (body >> 8) as u8, body as u8];
    der.extend((0..body).map(|i| (i * 7) as u8));
    let wire = encode_frame(&Frame::Block(Block::new(Label::EncryptedMessage, der))).unwrap();
    let per_sec = rate(|| {
        let mut buf = BytesMut::from(&wire[..]);
        let frame = FrameCodec::new().decode(&mut buf).unwrap();
        black_box(frame);
    });
    println!(
        "codec decode, 400-line ENCRYPTED MESSAGE block ({} octets armoured): {:.0} MB/s",
        wire.len(),
        per_sec * wire.len() as f64 / 1e6
    );

    for (kind, rsa) in [("P-256", false), ("RSA-2048", true)] {
        let alice = Identity::generate(&"alice@example.org".parse::<Address>().unwrap(), None, rsa).unwrap();
        let bob = Identity::generate(&"bob@example.org".parse::<Address>().unwrap(), None, rsa).unwrap();
        let plaintext = vec![b'm'; 4096];
        let seal_sign = rate(|| {
            let m = crypto::seal(&plaintext, bob.cert_der()).unwrap();
            black_box(crypto::sign(&m, &alice).unwrap());
        });
        let m = crypto::seal(&plaintext, bob.cert_der()).unwrap();
        let s = crypto::sign(&m, &alice).unwrap();
        let verify_open = rate(|| {
            black_box(crypto::verify(&s, &m).unwrap());
            black_box(crypto::open(&m, &bob).unwrap());
        });
        // What the server does with each SEND's blocks before it stores them.
        let per_send = rate(|| {
            crypto::check_message_structure(&m).unwrap();
            black_box(crypto::verify(&s, &m).unwrap());
        });
        println!("{kind}: seal+sign of 4 KiB: {seal_sign:.0} ops/s; verify+open: {verify_open:.0} ops/s (one core)");
        println!("{kind}: a SEND's checks (structure + verify): {per_send:.0} ops/s, {:.1} us each", 1e6 / per_send);
    }
}
