//! Any plaintext a LATSSIAM contact could send (what `crypto::open` returned),
//! through the poller's handling: `inspect` (parse, From check, recipients)
//! decides what to send out or which code to refuse the message with; then,
//! for what passes, `irc_posts` decides what goes to IRC (channel, subscriber
//! check, nick, service) and the lines to post. Neither panics. A refusal is
//! an answer to `ACCEPT`, so by PROFILE.md section 4 its code is `32` or `52`;
//! a post goes to a bridged channel the sender subscribes to or to one valid
//! nick, with at most `irc.max_lines` lines (their text is made one IRC
//! line's worth by the bot's `format::sanitize` when posted).
#![no_main]

use std::sync::OnceLock;

use latssiam::wire::Code;
use latssiam_bridge::gateway::config::{IrcChannel, IrcSettings, Settings};
use latssiam_bridge::gateway::irc::irc_posts;
use latssiam_bridge::gateway::poller::{inspect, Policy};
use latssiam_bridge::gateway::contacts::Contact;
use libfuzzer_sys::fuzz_target;

fn contact() -> &'static Contact {
    static CONTACT: OnceLock<Contact> = OnceLock::new();
    CONTACT.get_or_init(|| Contact {
        address: "alice@example.org".into(),
        cert: vec![],
        email: Some("alice@corp.example".into()),
        allow_send: true,
        server: None,
        gone: false,
        discoverable: false,
    })
}

/// The default IRC settings with two channels on irc.test: `#open`, which
/// alice subscribes to, and `#closed`, which she does not.
fn irc() -> &'static IrcSettings {
    static IRC: OnceLock<IrcSettings> = OnceLock::new();
    IRC.get_or_init(|| {
        let mut irc = Settings::load(None).map(|s| s.irc).unwrap_or_else(|e| panic!("default settings: {e}"));
        irc.server = "127.0.0.1".into();
        let channel = |name: &str, subscribers: &[&str]| IrcChannel {
            name: name.into(),
            key: String::new(),
            network: "irc.test".into(),
            subscribers: subscribers.iter().map(|s| (*s).to_owned()).collect(),
            digest_window: 0,
            relay_joins: false,
        };
        irc.channels = vec![channel("#open", &["alice@example.org"]), channel("#closed", &["bob@example.org"])];
        irc
    })
}

fuzz_target!(|data: &[u8]| {
    let outbound = match inspect(data, contact(), &Policy::default()) {
        Ok(o) => o,
        Err((code, why)) => {
            assert!(
                matches!(code, Code::MessageRefused | Code::SignatureRequired),
                "refused with {code} ({why}): not an answer to ACCEPT"
            );
            return;
        }
    };
    // As the poller does: the message that goes out is parsed again for its text.
    let Some(message) = mail_parser::MessageParser::default().parse(&outbound.message) else { return };
    let subscribers = |c: &IrcChannel| Ok(c.subscribers.clone());
    let Ok(posts) = irc_posts(irc(), contact(), &outbound.recipients, &message, subscribers) else {
        unreachable!("the subscribers above cannot fail")
    };
    let Ok(posts) = posts else { return };
    for post in posts {
        let target = post.target.to_ascii_lowercase();
        assert_ne!(target, "#closed", "posted to a channel alice does not subscribe to");
        // A target is a bridged channel or one nick: never a list, a command, or another channel.
        let channel = irc().channels.iter().any(|c| c.name.eq_ignore_ascii_case(&target));
        assert!(channel || !target.starts_with(['#', '&', '+', '!']), "posted to an unbridged channel {target:?}");
        assert!(!target.contains([' ', ',', '\r', '\n', '\0', ':']), "a target that is more than one: {target:?}");
        assert!(post.lines.len() <= irc().max_lines.max(1), "{} lines", post.lines.len());
    }
});
