//! Any bytes from an SMTP client, through the listener's whole session over an
//! in-memory stream: the session ends (time is paused and auto-advances, so
//! its timeouts fire at once when it waits), never panics, and
//! - every message handed to the sink has CRLF line ends only (no bare LF, no
//!   bare CR) and ends with CRLF unless empty, has at least one recipient,
//!   all of them ones the sink accepted, and fits `read_limit`;
//! - every reply line the client receives is `NNN` + space or hyphen + text,
//!   ending with CRLF, with no other CR or LF.
#![no_main]

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::Duration;

use bridge_smtp::listener::run_session;
use bridge_smtp::{Envelope, ListenerConfig, Reply, Sink};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

const SIZE_LIMIT: usize = 18_000;

fn accepted(to: &str) -> bool {
    to.to_ascii_lowercase().ends_with("@example.org")
}

struct FuzzSink;

impl Sink for FuzzSink {
    fn recipient(&self, _from: &str, to: &str) -> impl Future<Output = Result<(), Reply>> + Send {
        let r = if accepted(to) { Ok(()) } else { Err(Reply::new(550, [5, 1, 1], "no such user")) };
        async move { r }
    }

    fn message(&self, envelope: Envelope, data: Vec<u8>) -> impl Future<Output = Reply> + Send {
        check_message(&envelope, &data);
        async { Reply::new(250, [2, 0, 0], "ok") }
    }
}

fn check_message(envelope: &Envelope, data: &[u8]) {
    assert!(!envelope.recipients.is_empty(), "DATA accepted with no recipients");
    for r in &envelope.recipients {
        assert!(accepted(r), "recipient {r:?} reached the message though the sink refused it");
    }
    assert!(data.len() <= SIZE_LIMIT, "message of {} octets over read_limit", data.len());
    for (i, &b) in data.iter().enumerate() {
        match b {
            b'\n' => assert!(i > 0 && data[i - 1] == b'\r', "bare LF at {i} in message data"),
            b'\r' => assert!(data.get(i + 1) == Some(&b'\n'), "bare CR at {i} in message data"),
            _ => {}
        }
    }
    if !data.is_empty() {
        assert!(data.ends_with(b"\r\n"), "message data does not end with CRLF");
    }
}

fn check_replies(out: &[u8]) {
    if out.is_empty() {
        return;
    }
    assert!(out.ends_with(b"\r\n"), "reply output does not end with CRLF");
    // Every line, the last included, ends with CRLF: split after each LF.
    for line in out[..out.len() - 1].split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or_else(|| panic!("reply line without CRLF: {line:?}"));
        assert!(!line.contains(&b'\r'), "bare CR in reply {line:?}");
        assert!(
            line.len() >= 4 && line[..3].iter().all(u8::is_ascii_digit) && matches!(line[3], b' ' | b'-'),
            "malformed reply line {line:?}"
        );
    }
}

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().expect("runtime")
    })
}

fn config() -> &'static ListenerConfig {
    static CONFIG: OnceLock<ListenerConfig> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let mut c = ListenerConfig::new("fuzz.example", SIZE_LIMIT);
        c.command_timeout = Duration::from_secs(1);
        c.data_timeout = Duration::from_secs(1);
        c.max_recipients = 5;
        c
    })
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let (client, server) = tokio::io::duplex(4096);
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let peer = SocketAddr::from((Ipv4Addr::new(192, 0, 2, 1), 40025));
        let shutdown = CancellationToken::new();
        let write = async move {
            // The session may hang up first (QUIT, too many errors): a broken pipe is fine.
            let _ = to_server.write_all(data).await;
            let _ = to_server.shutdown().await;
        };
        let read = async move {
            let mut out = Vec::new();
            let _ = from_server.read_to_end(&mut out).await;
            out
        };
        let session = async {
            let _ = run_session(server, peer, config(), &FuzzSink, None, &shutdown).await;
        };
        let ((), out, ()) = tokio::join!(write, read, session);
        check_replies(&out);
    });
});
