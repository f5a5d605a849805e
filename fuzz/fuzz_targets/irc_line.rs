//! Any bytes from an IRC server, and any text to relay to IRC, through the
//! public text handling of bridge-irc (`format`) and irc-proto, the way the
//! bot uses them. What the bot does with a parsed line lives in its private
//! `Session::handle`/`incoming`/`queue_post`; this target mirrors those few
//! lines (marked MIRROR) until they are reachable from outside.
//!
//! Invariants (documented in bridges/irc/src/format.rs and lib.rs):
//! - `decode`: UTF-8 stays as is; anything else is latin-1, one char per octet;
//! - `strip_formatting`: no mIRC code survives, the rest is kept in order,
//!   stripping twice changes nothing;
//! - `sanitize`: no CR, LF, NUL or `\x01`, nothing else changes;
//! - `split_to_fit`: pieces within the budget (at least 4), on char
//!   boundaries, losing nothing but spaces at the cuts;
//! - a relayed line is one IRC line: `PRIVMSG target :piece` with no CR, LF
//!   or NUL, within 512 octets with the prefix others see, and it parses back
//!   to the same target and text.
#![no_main]

use bridge_irc::format::{decode, defang, sanitize, split_to_fit, strip_formatting};
use irc_proto::{Command, Message, Prefix, Response};
use libfuzzer_sys::fuzz_target;

/// MIRROR of bridge_irc's `MAX_READ`.
const MAX_READ: usize = 8192;
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

/// MIRROR of `Session::queue_post`: the PRIVMSG lines for one relayed line.
fn relay(target: &str, prefix_len: usize, line: &str) {
    let overhead = 1 + prefix_len + 9 + target.len() + 2 + 2;
    let budget = 512usize.saturating_sub(overhead).max(16);
    let line = check_sanitize(line);
    for piece in check_split(&line, budget) {
        let text = if piece.is_empty() { " ".to_owned() } else { piece };
        let out = format!("PRIVMSG {target} :{text}");
        assert!(!out.contains(['\r', '\n', '\0']), "relayed line {out:?} is not one line");
        // What others receive: ":" prefix " PRIVMSG " target " :" text CRLF.
        if overhead + 16 <= 512 {
            assert!(overhead + text.len() <= 512, "relayed line over 512 octets with the prefix");
        }
        let parsed: Message = out.parse().expect("a relayed line parses");
        assert_eq!(parsed.command, Command::PRIVMSG(target.to_owned(), text), "relayed line parsed differently");
    }
}

/// MIRROR of the parts of `Session::handle` and `incoming` that turn what
/// others said into text for the gateway, or a line back to IRC.
fn incoming(line: &str, nick: &str) {
    let Ok(message) = line.parse::<Message>() else { return };
    let from = match &message.prefix {
        Some(Prefix::Nickname(n, _, _)) => n.clone(),
        Some(Prefix::ServerName(s)) => s.clone(),
        None => String::new(),
    };
    let (target, text, notice) = match message.command {
        Command::PRIVMSG(t, x) => (t, x, false),
        Command::NOTICE(t, x) => (t, x, true),
        Command::PING(a, b) => {
            // The PONG goes back verbatim: only the server chose its argument.
            let out = Message::from(Command::PONG(a, b)).to_string();
            assert!(!out.trim_end_matches(['\r', '\n']).contains('\n'), "PONG split into two lines: {out:?}");
            return;
        }
        Command::Response(Response::RPL_USERHOST, args) => {
            if let Some(entry) = args.last().and_then(|a| a.split_whitespace().next()) {
                if let Some((n, rest)) = entry.split_once('=') {
                    let prefix_len = n.trim_end_matches('*').len() + 1 + rest.trim_start_matches(['+', '-']).len();
                    relay("#bridge", prefix_len, line);
                }
            }
            return;
        }
        _ => return,
    };
    let (kind_text, private_ok) = match text.strip_prefix('\x01') {
        Some(ctcp) => match ctcp.trim_end_matches('\x01').strip_prefix("ACTION ") {
            Some(action) => (action.to_owned(), false),
            None => return,
        },
        None => (text.clone(), !notice),
    };
    let body = check_strip(&kind_text);
    if !target.starts_with(['#', '&', '+', '!']) && target.eq_ignore_ascii_case(nick) && private_ok {
        // The gateway's answer to a private message goes back as a NOTICE:
        // here the worst answer, the sender's own text.
        let reply = check_sanitize(&body);
        if !from.contains(['\r', '\n', '\0', ' ']) && !from.is_empty() {
            let out = Message::from(Command::NOTICE(from.clone(), reply)).to_string();
            let one = out.strip_suffix("\r\n").expect("irc-proto ends lines with CRLF");
            assert!(!one.contains(['\r', '\n', '\0']), "NOTICE reply {out:?} is not one line");
        }
    }
    // What the gateway relays onwards (e.g. to another channel), attributed.
    relay("#bridge", from.len() + 20, &format!("<{}> {body}", defang(&from)));
}

fuzz_target!(|data: &[u8]| {
    // MIRROR of the bot's read loop: lines up to LF, at most MAX_READ octets
    // kept, decoded, CR/LF trimmed.
    for raw in data.split_inclusive(|&b| b == b'\n') {
        let kept = &raw[..raw.len().min(MAX_READ)];
        let line = check_decode(kept);
        let line = line.trim_end_matches(['\r', '\n']);
        incoming(line, "latssiam");
        check_strip(line);
    }
    // The whole input as text to relay, with a prefix length from its first octet.
    let text = check_decode(data);
    let prefix_len = data.first().map_or(30, |&b| usize::from(b) * 2);
    relay("#latssiam", prefix_len, &text);
    check_split(&text, usize::from(data.last().copied().unwrap_or(0)));
});
