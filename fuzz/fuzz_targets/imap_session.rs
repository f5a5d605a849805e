//! Any bytes from an IMAP client, through `local`'s whole session over an
//! in-memory stream, logged in or not (the first byte says), on a store
//! with a few messages (a multipart one among them): the session ends
//! (time is paused and auto-advances, so its timeouts fire at once), never
//! panics, and every line the client receives ends with CRLF.
#![no_main]

use std::sync::{Arc, OnceLock};

use latssiam_bridge::local::imap::{fuzz_session, Shared, MAX_IDLE};
use latssiam_bridge::local::store::{Flags, Store};
use latssiam_bridge::local::Access;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct World {
    _dir: tempfile::TempDir,
    shared: Arc<Shared>,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let store = Arc::new(Store::open(dir.path()).expect("a store"));
        let multipart = b"From: A <a@b.c>\r\nTo: d@e.f, G: h@i.j;\r\nSubject: =?utf-8?q?x?=\r\nContent-Type: multipart/mixed; boundary=z\r\n\r\n--z\r\nContent-Type: text/plain\r\n\r\nhello\r\n--z\r\nContent-Type: message/rfc822\r\n\r\nSubject: in\r\n\r\nbody\r\n--z--\r\n";
        for m in [&b"Subject: one\r\n\r\nfirst\r\n"[..], multipart, b"no header at all"] {
            store.append("INBOX", m, Flags::default(), None).expect("a message");
        }
        let access = Arc::new(Access::with_password("me", "secret").expect("access"));
        let shared = Arc::new(Shared {
            store,
            access,
            idle: Arc::new(tokio::sync::Semaphore::new(MAX_IDLE)),
            max_message: 64 * 1024,
            plaintext_ok: true,
        });
        World { _dir: dir, shared }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, input)) = data.split_first() else { return };
    let shared = Arc::clone(&world().shared);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().expect("tokio");
    rt.block_on(async move {
        let (mut client, mut server) = tokio::io::duplex(1 << 20);
        let session = tokio::spawn(async move { fuzz_session(&mut server, shared, first & 1 == 1).await });
        let _ = client.write_all(input).await;
        let _ = client.shutdown().await;
        let mut out = Vec::new();
        let _ = client.read_to_end(&mut out).await;
        let _ = session.await.expect("the session does not panic");
        if !out.is_empty() {
            assert!(out.ends_with(b"\r\n"), "every response ends with CRLF");
        }
    });
});
