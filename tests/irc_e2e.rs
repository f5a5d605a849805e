//! The IRC bridge end to end against real IRC servers: every test runs
//! twice, against Debian's `ngircd` (no IRCv3) and against Debian's InspIRCd
//! 3 with its IRCv3 modules (`tests/support/inspircd.conf`), each started
//! here on a loopback port, with IRC connections acting as people and the
//! gateway binary with LATSSIAM people fetching and sending with the client
//! commands.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::time::Duration;

use common::irc::{untagged, IrcPerson as Person, Ircd, Server};
use common::rig::Rig;
use common::{free_port, ok, wait_for};

/// What the tests watch the bot do, as a person in `#test` sees it.
trait BotWatch {
    fn wait_for_bot(&self);
    fn wait_said_by_bot(&self, n: usize, secs: u64, rig: &Rig) -> Vec<String>;
    fn said_by_bot(&self) -> Vec<String>;
}

impl BotWatch for Person {
    fn wait_for_bot(&self) {
        // The bot joining after us, or already there when we joined (in the names list).
        let names_bot = |l: &str| {
            let l = untagged(l);
            l.split(' ').nth(1) == Some("353")
                && l.rsplit_once(" :")
                    .is_some_and(|(_, n)| n.split(' ').any(|n| n.trim_start_matches(['@', '+']) == "gwbot"))
        };
        self.wait_heard(
            |l| (untagged(l).starts_with(":gwbot!") && l.contains("JOIN")) || names_bot(l),
            "the bot joining",
        );
    }

    /// Waits up to `secs` until the bot has said at least `n` lines in the channel; returns them all.
    fn wait_said_by_bot(&self, n: usize, secs: u64, rig: &Rig) -> Vec<String> {
        wait_for(Duration::from_secs(secs), || Some(self.said_by_bot()).filter(|p| p.len() >= n))
            .unwrap_or_else(|| panic!("the bot said fewer than {n} lines: {:#?}\n{}", self.lines(), rig.log()))
    }

    /// What the bot said in the channel, in order.
    fn said_by_bot(&self) -> Vec<String> {
        self.lines()
            .iter()
            .filter(|l| untagged(l).starts_with(":gwbot!") && l.contains(" PRIVMSG #test :"))
            .map(|l| l.split_once(" PRIVMSG #test :").unwrap().1.to_owned())
            .collect()
    }
}

/// Whether the person saw the bot leave the server.
fn bot_quit(person: &Person) -> bool {
    person.lines().iter().any(|l| l.starts_with(":gwbot!") && l.split(' ').nth(1) == Some("QUIT"))
}

/// Every test below, once per server.
macro_rules! on_both_servers {
    ($($name:ident),* $(,)?) => {
        mod ngircd {
            $( #[test] fn $name() { super::$name(super::Server::Ngircd) } )*
        }
        mod inspircd {
            $( #[test] fn $name() { super::$name(super::Server::Inspircd) } )*
        }
    };
}

on_both_servers!(
    channel_lines_reach_subscribers_and_their_answers_reach_the_channel,
    posts_wait_while_the_server_is_down_and_go_out_in_order,
    a_long_message_is_paced_and_cut_and_strangers_are_refused,
    contacts_subscribe_and_unsubscribe_by_message,
    a_flood_of_private_messages_is_limited_per_client_host_and_the_bot_stays,
    a_busy_window_becomes_several_digests_that_each_fit_and_none_is_dead_lettered,
    a_post_to_any_kind_of_channel_is_checked_like_a_hash_channel,
    a_sigkill_between_a_line_and_its_digest_loses_none_and_sends_none_twice,
    a_forty_line_post_is_five_lines_and_a_link_to_its_exact_text,
    replies_are_threaded_both_ways_where_the_server_has_ircv3,
    a_mentions_subscriber_gets_only_the_lines_that_name_them,
);

/// A gateway bridging `#test@irc.test` (subscriber alice@localhost, at most
/// 10 lines per post) to an IRC server of its own; returns them and the server's port.
fn irc_rig(server: Server, window: u64) -> (Rig, Ircd, u16) {
    irc_rig_with(server, window, 10)
}

fn irc_rig_with(server: Server, window: u64, max_lines: usize) -> (Rig, Ircd, u16) {
    let port = free_port();
    let rig = Rig::new(&format!(
        "[irc]\nserver = \"127.0.0.1\"\nport = {port}\nnick = \"gwbot\"\nburst = 4.0\nlines_per_second = 4.0\n\
         reconnect_min_secs = 1\nreconnect_max_secs = 2\nmax_lines = {max_lines}\n\
         [[irc.channels]]\nname = \"#test\"\nnetwork = \"irc.test\"\nsubscribers = [\"alice@localhost\"]\n\
         digest_window = {window}\n"
    ));
    let ircd = Ircd::start(server, rig.path(), port);
    (rig, ircd, port)
}

/// Carl in `#test`, once the bot is there too.
fn carl_with_the_bot(port: u16) -> Person {
    let carl = Person::connect(port, "carl", "#test");
    carl.wait_for_bot();
    carl
}

fn send_to_channel(rig: &Rig, who: &str, body: &str) {
    send_message(rig, who, "#test@irc.test", "to the channel", body);
}

fn send_message(rig: &Rig, who: &str, to: &str, subject: &str, body: &str) {
    send_with_header(rig, who, to, subject, "", body);
}

/// As [`send_message`], with more header fields (`fields`, each ending in CRLF).
fn send_with_header(rig: &Rig, who: &str, to: &str, subject: &str, fields: &str, body: &str) {
    let file = format!("{who}-{}.eml", free_port());
    let message = format!(
        "From: {who}@localhost\r\nTo: {to}\r\nSubject: {subject}\r\n{fields}Content-Type: text/plain; charset=utf-8\r\n\r\n{body}"
    );
    std::fs::write(rig.path().join(&file), message).unwrap();
    let gateway = rig.gateway_fp.clone();
    ok(
        rig.path(),
        &["send", "--identity", who, "--server", &rig.home, "--to", &gateway, "--sign", "--pins", "pins", &file],
    );
}

fn channel_lines_reach_subscribers_and_their_answers_reach_the_channel(server: Server) {
    let (rig, _ircd, port) = irc_rig(server, 2);
    rig.person("alice");
    rig.contact("alice", &["--allow-send"]);
    let mut carl = carl_with_the_bot(port);

    // IRC -> LATSSIAM, gathered into one digest over the 2 s window. One line is latin-1.
    carl.send("PRIVMSG #test :Grüß euch, \x0304bunt\x03 und \x02fett\x02\r\n");
    carl.send("PRIVMSG #test :\x01ACTION winkt\x01\r\n");
    carl.stream.write_all(b"PRIVMSG #test :caf\xe9 latin-1\r\n").unwrap();
    let (files, out) = rig.fetch("alice", 30);
    assert_eq!(files.len(), 1, "{out}\n{}", rig.log());
    let digest = std::fs::read_to_string(&files[0]).unwrap();
    assert!(digest.contains("From: \"#test\" <#test@irc.test>"), "{digest}");
    assert!(digest.contains("Subject: #test on irc.test: 3 lines"), "{digest}");
    assert!(digest.contains("] <carl> Grüß euch, bunt und fett\r\n"), "{digest}");
    assert!(digest.contains("] * carl winkt\r\n"), "{digest}");
    assert!(digest.contains("] <carl> café latin-1\r\n"), "{digest}");
    assert!(out.contains(&format!("signed by gateway@localhost {}", rig.gateway_fp)), "{out}");

    // LATSSIAM -> IRC: multi-line, non-ASCII, quoted lines and signature dropped,
    // CR/LF and CTCP in the body cannot inject anything.
    send_to_channel(&rig, "alice", "Hallo zusammen!\r\n> quoted, dropped\r\nZweite Zeile: ✓ 日本\r\nevil \x01ACTION x\x01 QUIT :bye\r\n-- \r\nAlice's signature\r\n");
    let posted = carl.wait_said_by_bot(3, 30, &rig);
    assert_eq!(posted, ["<alice> Hallo zusammen!", "<alice> Zweite Zeile: ✓ 日本", "<alice> evil ACTION x QUIT :bye"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(carl.said_by_bot().len(), 3, "the signature is not posted");
    assert!(!bot_quit(&carl), "the bot stays");
}

fn posts_wait_while_the_server_is_down_and_go_out_in_order(server: Server) {
    let (rig, ircd, port) = irc_rig(server, 0);
    rig.person("alice");
    rig.contact("alice", &["--allow-send"]);
    let carl = carl_with_the_bot(port);
    drop(carl);
    drop(ircd);
    for i in 1..=3 {
        send_to_channel(&rig, "alice", &format!("queued message {i}\r\n"));
    }
    // Wait until the gateway has taken all three from the home server.
    rig.wait_metric("latssiam_bridge_accept_taken_total", 3);
    let _ircd = Ircd::start(server, rig.path(), port);
    let carl = Person::connect(port, "carl", "#test");
    let posted = carl.wait_said_by_bot(3, 60, &rig);
    assert_eq!(posted, ["<alice> queued message 1", "<alice> queued message 2", "<alice> queued message 3"]);
}

fn a_long_message_is_paced_and_cut_and_strangers_are_refused(server: Server) {
    let (rig, _ircd, port) = irc_rig(server, 0);
    rig.person("alice");
    rig.person("mallory");
    rig.person("nobody");
    rig.contact("alice", &["--allow-send"]);
    rig.contact("mallory", &["--allow-send"]);
    let carl = carl_with_the_bot(port);

    // Not a subscriber, and not a contact: refused (52), nothing posted.
    send_to_channel(&rig, "mallory", "let me in\r\n");
    send_to_channel(&rig, "nobody", "me too\r\n");
    rig.wait_metric("latssiam_bridge_accept_refused_total", 2);
    assert_eq!(rig.log().matches("code=52").count(), 2, "{}", rig.log());

    // 200 lines: 9 posted, then one saying how many were cut; the bot is not flooded off.
    let body: String = (1..=200).map(|i| format!("line {i} {}\r\n", "x".repeat(40))).collect();
    send_to_channel(&rig, "alice", &body);
    let posted = carl.wait_said_by_bot(11, 60, &rig);
    assert_eq!(posted.len(), 11, "{posted:#?}");
    assert_eq!(posted[0], format!("<alice> line 1 {}", "x".repeat(40)));
    assert_eq!(posted[9], format!("<alice> line 10 {}", "x".repeat(40)));
    assert!(posted[10].starts_with("<alice> [190 more lines: gemini://gw.example.org:"), "{}", posted[10]);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(carl.said_by_bot().len(), 11, "nothing from mallory or the stranger");
    assert!(!bot_quit(&carl), "{:#?}", carl.lines());
    // One connection all along (the first attempt may come before ngircd listens).
    assert_eq!(rig.log().matches("Connected to IRC").count(), 1, "{}", rig.log());
}

fn contacts_subscribe_and_unsubscribe_by_message(server: Server) {
    let (rig, _ircd, port) = irc_rig(server, 0);
    rig.person("bob");
    rig.contact("bob", &[]);
    let mut carl = carl_with_the_bot(port);

    send_message(&rig, "bob", "gateway@localhost", "subscribe #test@irc.test", "");
    let (files, out) = rig.fetch("bob", 30);
    assert_eq!(files.len(), 1, "{out}\n{}", rig.log());
    let answer = std::fs::read_to_string(&files[0]).unwrap();
    assert!(answer.contains("bob@localhost is now subscribed to #test@irc.test"), "{answer}");

    carl.send("PRIVMSG #test :hello new subscriber\r\n");
    let (files, _) = rig.fetch("bob", 30);
    assert_eq!(files.len(), 2);
    let texts: String = files.iter().map(|f| std::fs::read_to_string(f).unwrap()).collect();
    assert!(texts.contains("] <carl> hello new subscriber"), "{texts}");

    send_message(&rig, "bob", "gateway@localhost", "unsubscribe #test@irc.test", "");
    let (files, _) = rig.fetch("bob", 30);
    let texts: String = files.iter().map(|f| std::fs::read_to_string(f).unwrap()).collect();
    assert!(texts.contains("bob@localhost is no longer subscribed to #test@irc.test"), "{texts}");
    carl.send("PRIVMSG #test :after bob left\r\n");
    std::thread::sleep(Duration::from_secs(2));
    let (after, out) = rig.fetch("bob", 1);
    assert_eq!(after.len(), files.len(), "nothing more for bob: {out}");
    // An unknown channel gets an explanation, not silence.
    send_message(&rig, "bob", "gateway@localhost", "subscribe #nope@irc.test", "");
    let (files, _) = rig.fetch("bob", 30);
    let texts: String = files.iter().map(|f| std::fs::read_to_string(f).unwrap()).collect();
    assert!(texts.contains("#nope@irc.test is not a channel this gateway bridges"), "{texts}");
}

/// The bot's notices to `person` so far.
fn notices_from_bot(person: &Person, nick: &str) -> Vec<String> {
    let marker = format!(" NOTICE {nick} :");
    person
        .lines()
        .iter()
        .filter(|l| l.starts_with(":gwbot!"))
        .filter_map(|l| l.split_once(&marker).map(|(_, t)| t.to_owned()))
        .collect()
}

fn a_flood_of_private_messages_is_limited_per_client_host_and_the_bot_stays(server: Server) {
    // irc.private_messages_per_minute = 5 (the default), per client host:
    // three nicks from one host (a flooder changing nick or ident) share it.
    let (rig, _ircd, port) = irc_rig(server, 0);
    rig.person("alice");
    rig.contact("alice", &["--allow-send"]);
    let mut carl = carl_with_the_bot(port);
    let mut flooders: Vec<Person> = (0..3).map(|i| Person::connect(port, &format!("flood{i}"), "#test")).collect();
    for (i, f) in flooders.iter_mut().enumerate() {
        let burst: String = (0..12).map(|n| format!("PRIVMSG gwbot :alice@localhost flood{i} says {n}\r\n")).collect();
        f.send(&burst);
    }
    // ngircd paces each flooder to about a line a second: 12 lines take about 12 s.
    let mut all = Vec::new();
    for (i, f) in flooders.iter().enumerate() {
        let nick = format!("flood{i}");
        let notices = wait_for(Duration::from_secs(60), || Some(notices_from_bot(f, &nick)).filter(|n| n.len() >= 12))
            .unwrap_or_else(|| panic!("{nick} heard {:#?}\n{}", f.lines(), rig.log()));
        all.extend(notices);
    }
    assert_eq!(all.iter().filter(|n| n.starts_with("relayed to alice@localhost")).count(), 5, "{all:#?}");
    assert_eq!(all.iter().filter(|n| n.starts_with("slow down")).count(), 31, "{all:#?}");
    // Alice gets 5 private messages, no more.
    let files = wait_for(Duration::from_secs(30), || {
        let (files, _) = rig.fetch("alice", 1);
        Some(files).filter(|f| f.len() >= 5)
    })
    .unwrap_or_else(|| panic!("{}", rig.log()));
    std::thread::sleep(Duration::from_secs(1));
    let (files_after, _) = rig.fetch("alice", 1);
    assert_eq!((files.len(), files_after.len()), (5, 5));
    // The bot answered the server's PINGs and the channel all along: still there, one connection.
    carl.send("PRIVMSG #test :after the flood\r\n");
    let (files, _) = rig.fetch("alice", 30);
    let texts: String = files.iter().map(|f| std::fs::read_to_string(f).unwrap()).collect();
    assert!(texts.contains("] <carl> after the flood"), "{texts}");
    assert!(!bot_quit(&carl), "{:#?}", carl.lines());
    assert_eq!(rig.log().matches("Connected to IRC").count(), 1, "{}", rig.log());
}

fn a_busy_window_becomes_several_digests_that_each_fit_and_none_is_dead_lettered(server: Server) {
    let (rig, _ircd, port) = irc_rig(server, 20);
    rig.person("alice");
    rig.contact("alice", &[]);
    let _carl = carl_with_the_bot(port);
    // 6 people, 8 lines of 400 characters each: about 20 KB in one window,
    // more than one LATSSIAM message holds.
    let mut people: Vec<Person> = (0..6).map(|i| Person::connect(port, &format!("busy{i}"), "#test")).collect();
    for (i, p) in people.iter_mut().enumerate() {
        let lines: String =
            (0..8).map(|n| format!("PRIVMSG #test :busy{i} line {n} {}\r\n", "y".repeat(400))).collect();
        p.send(&lines);
    }
    let files = wait_for(Duration::from_secs(60), || {
        let (files, _) = rig.fetch("alice", 1);
        let texts: String = files.iter().map(|f| std::fs::read_to_string(f).unwrap()).collect();
        (texts.matches(" line ").count() >= 48).then_some(files)
    })
    .unwrap_or_else(|| panic!("{}", rig.log()));
    assert!(files.len() >= 2, "one window, several digests: {}", files.len());
    for f in &files {
        assert!(std::fs::metadata(f).unwrap().len() <= 18_000, "{} fits a LATSSIAM message", f.display());
    }
    assert_eq!(rig.metric("latssiam_bridge_deliveries_total{channel=\"latssiam\",result=\"failed\"}"), 0);
}

fn a_post_to_any_kind_of_channel_is_checked_like_a_hash_channel(server: Server) {
    let (rig, _ircd, port) = irc_rig(server, 0);
    rig.person("mallory");
    rig.contact("mallory", &["--allow-send"]);
    // Carl first: the bot's JOIN must come after he is in the channel.
    let _carl = carl_with_the_bot(port);
    // InspIRCd has only # channels (CHANTYPES=#): there the watcher waits in #test.
    let watched = if server == Server::Ngircd { "+test" } else { "#test" };
    let mut mallory_irc = Person::connect(port, "watcher", watched);
    // Channels with the other prefixes are channels too: not bridged, so refused, never posted to as a nick.
    for target in ["+test@irc.test", "!test@irc.test", "&test@irc.test"] {
        send_message(&rig, "mallory", target, "hi", "let me in\r\n");
    }
    rig.wait_metric("latssiam_bridge_accept_refused_total", 3);
    assert_eq!(rig.log().matches("is not a bridged channel").count(), 3, "{}", rig.log());
    mallory_irc.send("PING :x\r\n");
    std::thread::sleep(Duration::from_secs(1));
    assert!(!mallory_irc.lines().iter().any(|l| l.starts_with(":gwbot!") && l.contains("PRIVMSG")), "nothing posted");
}

/// Every message `who` has fetched so far, as text.
fn fetched(rig: &Rig, who: &str, secs: u64) -> Vec<String> {
    let (files, _) = rig.fetch(who, secs);
    files.iter().map(|f| std::fs::read_to_string(f).unwrap()).collect()
}

/// Waits until `who` has a message containing `what`; returns it.
fn wait_message(rig: &Rig, who: &str, what: &str) -> String {
    wait_for(Duration::from_secs(60), || fetched(rig, who, 1).into_iter().find(|m| m.contains(what)))
        .unwrap_or_else(|| panic!("{who} never got {what:?}: {:#?}\n{}", fetched(rig, who, 1), rig.log()))
}

/// A header field of `message`.
fn field<'a>(message: &'a str, name: &str) -> Option<&'a str> {
    message.split("\r\n\r\n").next()?.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
}

fn a_sigkill_between_a_line_and_its_digest_loses_none_and_sends_none_twice(server: Server) {
    let (mut rig, _ircd, port) = irc_rig(server, 8);
    rig.person("alice");
    rig.contact("alice", &[]);
    let mut carl = carl_with_the_bot(port);
    for i in 1..=3 {
        carl.send(&format!("PRIVMSG #test :before the crash {i}\r\n"));
    }
    rig.wait_metric("latssiam_bridge_irc_lines_heard_total", 3);
    // Heard, not yet in a digest (the window is 8 s): the gateway dies.
    assert_eq!(rig.metric("latssiam_bridge_irc_digests_queued_total"), 0);
    drop(rig.gateway.take());
    carl.send("PRIVMSG #test :while the bridge is away\r\n");
    rig.start();
    let digest = wait_message(&rig, "alice", "before the crash 3");
    for i in 1..=3 {
        assert_eq!(digest.matches(&format!("<carl> before the crash {i}\r\n")).count(), 1, "{digest}");
    }
    assert!(digest.contains("*** The bridge was away from "), "the digest says when: {digest}");
    assert!(!digest.contains("while the bridge is away"), "{digest}");
    // Once, and only once: nothing else comes with these lines.
    carl.send("PRIVMSG #test :after the restart\r\n");
    wait_message(&rig, "alice", "after the restart");
    let all = fetched(&rig, "alice", 1).concat();
    for i in 1..=3 {
        assert_eq!(all.matches(&format!("before the crash {i}\r\n")).count(), 1, "{all}");
    }
}

/// What a Gemini client gets for `url` from 127.0.0.1:`port` (TLS, the capsule's own certificate).
fn gemini_get(url: &str, port: u16) -> Vec<u8> {
    let script = "import socket,ssl,sys\n\
        c=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT);c.check_hostname=False;c.verify_mode=ssl.CERT_NONE\n\
        s=c.wrap_socket(socket.create_connection(('127.0.0.1',int(sys.argv[2]))),server_hostname='gw.example.org')\n\
        s.sendall((sys.argv[1]+'\\r\\n').encode())\n\
        d=b''\n\
        while True:\n  b=s.recv(65536)\n  if not b: break\n  d+=b\n\
        sys.stdout.buffer.write(d)\n";
    let out = std::process::Command::new("python3").args(["-c", script, url, &port.to_string()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn a_forty_line_post_is_five_lines_and_a_link_to_its_exact_text(server: Server) {
    let (rig, _ircd, port) = irc_rig_with(server, 0, 5);
    rig.person("alice");
    rig.contact("alice", &["--allow-send"]);
    let carl = carl_with_the_bot(port);
    let text: String = (1..=40).map(|i| format!("Zeile {i}: <b>not html</b> ✓\r\n")).collect();
    send_to_channel(&rig, "alice", &text);
    let posted = carl.wait_said_by_bot(6, 60, &rig);
    assert_eq!(posted.len(), 6, "{posted:#?}");
    for (i, p) in posted[..5].iter().enumerate() {
        assert_eq!(*p, format!("<alice> Zeile {}: <b>not html</b> ✓", i + 1));
    }
    let link = posted[5].strip_prefix("<alice> [35 more lines: ").and_then(|l| l.strip_suffix(']')).unwrap();
    let url = link.split(' ').next().unwrap();
    let gemini_port: u16 = url.split(':').nth(2).unwrap().split('/').next().unwrap().parse().unwrap();
    let token = url.rsplit('/').next().unwrap();
    assert_eq!(token.len(), 48, "an unguessable token: {url}");
    let got = gemini_get(url, gemini_port);
    let expected = format!("20 text/plain; charset=utf-8\r\n{text}");
    assert_eq!(String::from_utf8_lossy(&got).replace("\r\n", "\n"), expected.replace("\r\n", "\n"));
    // Another token is not found; nothing of the text is in the log.
    let wrong = url.replace(token, &"0".repeat(48));
    assert_eq!(gemini_get(&wrong, gemini_port), b"51 Not found\r\n");
    assert!(!rig.log().contains("Zeile 6"), "{}", rig.log());
}

fn replies_are_threaded_both_ways_where_the_server_has_ircv3(server: Server) {
    let (rig, _ircd, port) = irc_rig(server, 1);
    rig.person("alice");
    rig.contact("alice", &["--allow-send"]);
    let mut carl = Person::connect_with(port, "carl", "#test", &["message-tags", "echo-message", "server-time"]);
    carl.wait_for_bot();
    let ircv3 = server == Server::Inspircd;

    // IRC -> LATSSIAM: carl asks; the digest carries his line (at the server's time).
    carl.send("PRIVMSG #test :who has the minutes?\r\n");
    let digest = wait_message(&rig, "alice", "who has the minutes?");
    let digest_id = field(&digest, "Message-ID").unwrap().to_owned();
    let line = digest.lines().find(|l| l.contains("<carl> who has the minutes?")).unwrap().to_owned();
    if ircv3 {
        let echo = carl.wait_heard(|l| l.contains("PRIVMSG #test :who has the minutes?"), "the echo");
        let time = echo.split("time=").nth(1).unwrap();
        assert!(line.starts_with(&format!("[{}]", &time[11..19])), "the server's time: {line} / {echo}");
    }

    // LATSSIAM -> IRC: alice answers the digest, quoting carl's line: posted as a reply to it.
    send_with_header(
        &rig,
        "alice",
        "#test@irc.test",
        "Re: #test",
        &format!("In-Reply-To: {digest_id}\r\nReferences: {digest_id}\r\nMessage-ID: <answer1@localhost>\r\n"),
        &format!("{line}\r\n> unrelated\r\nI have them.\r\n").replacen('[', "> [", 1),
    );
    let answer = carl.wait_heard(|l| l.contains("PRIVMSG #test :<alice> I have them."), "alice's answer");
    if ircv3 {
        let asked = carl.wait_heard(|l| l.contains("PRIVMSG #test :who has the minutes?"), "the echo");
        let msgid = asked.split("msgid=").nth(1).unwrap().split([';', ' ']).next().unwrap();
        assert!(answer.contains(&format!("+draft/reply={msgid}")), "{answer}\n{asked}");
    } else {
        assert!(!answer.starts_with('@'), "no tags where the server has none: {answer}");
    }

    // IRC -> LATSSIAM: carl replies to alice's line; the digest answers her message.
    let reply_tag = if ircv3 {
        let msgid = answer.split("msgid=").nth(1).unwrap().split([';', ' ']).next().unwrap();
        format!("@+draft/reply={msgid} ")
    } else {
        String::new()
    };
    std::thread::sleep(Duration::from_millis(500)); // the echo of alice's line noted
    carl.send(&format!("{reply_tag}PRIVMSG #test :thanks!\r\n"));
    let thanks = wait_message(&rig, "alice", "thanks!");
    if ircv3 {
        assert_eq!(field(&thanks, "In-Reply-To"), Some("<answer1@localhost>"), "{thanks}");
        assert!(thanks.contains("<carl> (re alice) thanks!"), "{thanks}");
    } else {
        assert_eq!(field(&thanks, "In-Reply-To"), Some(digest_id.as_str()), "chained to the last digest: {thanks}");
    }
}

fn a_mentions_subscriber_gets_only_the_lines_that_name_them(server: Server) {
    let (rig, _ircd, port) = irc_rig(server, 2);
    rig.person("alice");
    rig.contact("alice", &[]);
    rig.person("bob");
    rig.contact("bob", &[]);
    let mut carl = carl_with_the_bot(port);
    send_message(&rig, "bob", "gateway@localhost", "subscribe mentions #test@irc.test", "");
    let answer = wait_message(&rig, "bob", "is now subscribed");
    assert!(answer.contains("(only the lines that name them)"), "{answer}");
    carl.send("PRIVMSG #test :good morning all\r\n");
    carl.send("PRIVMSG #test :bob: can you look at this?\r\n");
    carl.send("PRIVMSG #test :and alice too\r\n");
    let bobs = wait_message(&rig, "bob", "can you look");
    assert!(bobs.contains("] (@) <carl> bob: can you look at this?\r\n"), "{bobs}");
    assert!(!bobs.contains("good morning") && !bobs.contains("alice too"), "only his: {bobs}");
    assert!(field(&bobs, "Subject").unwrap().ends_with("1 line, 1 names you"), "{bobs}");
    // alice, subscribed to everything, gets every line; the one naming her is marked for her.
    let alices = wait_message(&rig, "alice", "can you look");
    assert!(alices.contains("] <carl> good morning all\r\n"), "{alices}");
    assert!(alices.contains("] <carl> bob: can you look at this?\r\n"), "{alices}");
    assert!(alices.contains("] (@) <carl> and alice too\r\n"), "{alices}");
}
