//! Any bytes from an IRC server through the bot's real session
//! (`bridge_irc::run_session` over an in-memory stream: its line reader,
//! `handle`, registration, CTCP, private messages and the posts it sends),
//! and any text through the public text handling of bridge-irc (`format`).
//! Time is paused and auto-advances, so the bot's pacing and ping timers run
//! at once; the session ends when the input does.
//!
//! Invariants (documented in bridges/irc/src/format.rs and lib.rs):
//! - every line the bot writes is one IRC line: CRLF-terminated, no other
//!   CR, LF or NUL, at most 512 octets, parsed by irc-proto, and a PRIVMSG
//!   or NOTICE has one target (no space, no comma);
//! - every event the bot hands the gateway has clean text: no CR, LF or
//!   other control character but TAB, no mIRC formatting;
//! - `decode`: UTF-8 stays as is; anything else is latin-1, one char per octet;
//! - `strip_formatting`: no mIRC code survives, the rest is kept in order,
//!   stripping twice changes nothing;
//! - `sanitize`: no CR, LF, NUL or `\x01`, nothing else changes;
//! - `split_to_fit`: pieces within the budget (at least 4), on char
//!   boundaries, losing nothing but spaces at the cuts.
#![no_main]

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use bridge_irc::format::{decode, sanitize, split_to_fit, strip_formatting};
use bridge_irc::{run_session, Event, IrcConfig, IrcSink};
use irc_proto::{Command, Message};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

const FORMATTING: [char; 9] = ['\x02', '\x03', '\x04', '\x0f', '\x11', '\x16', '\x1d', '\x1e', '\x1f'];

fn check_decode(bytes: &[u8]) -> String {
    let s = decode(bytes);
    match std::str::from_utf8(bytes) {
        Ok(u) => assert_eq!(s, u),
        Err(_) => {
            assert_eq!(s.chars().count(), bytes.len());
            assert!(s.chars().zip(bytes).all(|(c, &b)| u32::from(c) == u32::from(b)));
        }
    }
    s
}

fn is_subsequence(small: &str, big: &str) -> bool {
    let mut it = big.chars();
    small.chars().all(|c| it.any(|d| d == c))
}

fn check_strip(s: &str) -> String {
    let out = strip_formatting(s);
    assert!(!out.contains(FORMATTING), "formatting left in {out:?}");
    assert!(is_subsequence(&out, s));
    assert_eq!(strip_formatting(&out), out, "stripping is not idempotent");
    out
}

fn check_sanitize(s: &str) -> String {
    let out = sanitize(s);
    assert!(!out.contains(['\r', '\n', '\0', '\x01']), "unsafe char left in {out:?}");
    assert_eq!(out.chars().count(), s.chars().filter(|&c| c != '\x01').count());
    assert_eq!(sanitize(&out), out);
    out
}

fn check_split(text: &str, budget: usize) -> Vec<String> {
    let pieces = split_to_fit(text, budget);
    assert!(!pieces.is_empty());
    let limit = budget.max(4);
    for p in &pieces {
        assert!(p.len() <= limit, "piece of {} octets over budget {limit}", p.len());
        assert!(!p.is_empty() || text.is_empty(), "empty piece of a non-empty text");
    }
    let squeeze = |s: &str| s.replace(' ', "");
    assert_eq!(squeeze(&pieces.concat()), squeeze(text), "split lost or changed text");
    pieces
}

fn clean(s: &str) {
    assert!(!s.chars().any(|c| c.is_control() && c != '\t'), "control character handed to the gateway: {s:?}");
    assert!(!s.contains(FORMATTING), "formatting handed to the gateway: {s:?}");
}

/// The gateway's side: checks every event, and answers a private message
/// with the worst reply there is, the sender's own text.
struct FuzzSink;

impl IrcSink for FuzzSink {
    fn event(&self, event: Event) -> impl Future<Output = Option<String>> + Send {
        let reply = match event {
            Event::Channel { channel, nick, text, .. } => {
                [channel, nick, text].iter().for_each(|s| clean(s));
                None
            }
            Event::Private { nick, userhost, text } => {
                clean(&nick);
                clean(&userhost);
                clean(&text);
                Some(format!("{nick}: {text}"))
            }
            _ => None,
        };
        async move { reply }
    }
}

fn check_written(out: &[u8]) {
    for line in out.split_inclusive(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r\n").unwrap_or_else(|| panic!("a line without CRLF: {line:?}"));
        assert!(!line.contains(&b'\r') && !line.contains(&0), "CR or NUL inside a line: {line:?}");
        assert!(line.len() + 2 <= 512, "a line of {} octets", line.len() + 2);
        let text = std::str::from_utf8(line).unwrap_or_else(|_| panic!("the bot wrote non-UTF-8: {line:?}"));
        let parsed: Message = text.parse().unwrap_or_else(|e| panic!("{text:?} does not parse: {e}"));
        if let Command::PRIVMSG(target, _) | Command::NOTICE(target, _) = &parsed.command {
            assert!(!target.is_empty() && !target.contains([' ', ',']), "not one target: {target:?}");
        }
    }
}

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().expect("runtime")
    })
}

fn config() -> &'static IrcConfig {
    static CONFIG: OnceLock<IrcConfig> = OnceLock::new();
    CONFIG.get_or_init(|| IrcConfig {
        server: "irc.example.net".into(),
        port: 6667,
        tls: false,
        tls_fingerprint: None,
        nick: "latssiam".into(),
        alt_nicks: vec!["latssiam2".into()],
        sasl: Some(("latssiam".into(), "secret".into())),
        nickserv_password: None,
        channels: vec![("#latssiam".into(), None)],
        burst: 4.0,
        lines_per_second: 2.0,
        ping_interval: Duration::from_secs(120),
        reconnect_min: Duration::from_secs(1),
        reconnect_max: Duration::from_secs(10),
        timeout: Duration::from_secs(5),
    })
}

fuzz_target!(|data: &[u8]| {
    // The input is what the server sends; its text is also a post to relay.
    let text = check_decode(data);
    let post_lines: Vec<String> = text.lines().take(50).map(str::to_owned).collect();
    runtime().block_on(async {
        let (bot_end, server_end) = tokio::io::duplex(1 << 16);
        let (mut from_bot, mut to_bot) = tokio::io::split(server_end);
        let shutdown = CancellationToken::new();
        let write = async move {
            let _ = to_bot.write_all(data).await;
            let _ = to_bot.shutdown().await;
        };
        let read = async move {
            let mut out = Vec::new();
            let _ = from_bot.read_to_end(&mut out).await;
            out
        };
        let posts = vec![("#latssiam".to_owned(), post_lines)];
        let session = async {
            let _ = run_session(config(), &FuzzSink, bot_end, posts, &shutdown).await;
        };
        let ((), out, ()) = tokio::join!(write, read, session);
        check_written(&out);
    });
    for line in text.lines() {
        check_strip(line);
        check_sanitize(line);
    }
    check_split(&text, usize::from(data.last().copied().unwrap_or(0)));
});
