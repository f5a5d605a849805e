//! The IRC bridge end to end against a real IRC server: Debian's `ngircd`,
//! started here on a loopback port with a generated configuration, a second
//! IRC connection acting as a person, and the gateway binary with LATSSIAM
//! people fetching and sending with the client commands.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::time::Duration;

use common::irc::{IrcPerson as Person, Ngircd};
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
        self.wait_heard(|l| l.starts_with(":gwbot!") && l.contains("JOIN"), "the bot joining");
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
            .filter(|l| l.starts_with(":gwbot!") && l.contains(" PRIVMSG #test :"))
            .map(|l| l.split_once(" PRIVMSG #test :").unwrap().1.to_owned())
            .collect()
    }
}

/// Whether the person saw the bot leave the server.
fn bot_quit(person: &Person) -> bool {
    person.lines().iter().any(|l| l.starts_with(":gwbot!") && l.split(' ').nth(1) == Some("QUIT"))
}

/// A gateway bridging `#test@irc.test` (subscriber alice@localhost, at most
/// 10 lines per post) to an ngircd of its own; returns them and ngircd's port.
fn irc_rig(window: u64) -> (Rig, Ngircd, u16) {
    let port = free_port();
    let rig = Rig::new(&format!(
        "[irc]\nserver = \"127.0.0.1\"\nport = {port}\nnick = \"gwbot\"\nburst = 4.0\nlines_per_second = 4.0\n\
         reconnect_min_secs = 1\nreconnect_max_secs = 2\nmax_lines = 10\n\
         [[irc.channels]]\nname = \"#test\"\nnetwork = \"irc.test\"\nsubscribers = [\"alice@localhost\"]\n\
         digest_window = {window}\n"
    ));
    let ircd = Ngircd::start(rig.path(), port);
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
    let file = format!("{who}-{}.eml", free_port());
    let message = format!(
        "From: {who}@localhost\r\nTo: {to}\r\nSubject: {subject}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}"
    );
    std::fs::write(rig.path().join(&file), message).unwrap();
    let gateway = rig.gateway_fp.clone();
    ok(
        rig.path(),
        &["send", "--identity", who, "--server", &rig.home, "--to", &gateway, "--sign", "--pins", "pins", &file],
    );
}

#[test]
fn channel_lines_reach_subscribers_and_their_answers_reach_the_channel() {
    let (rig, _ircd, port) = irc_rig(2);
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

#[test]
fn posts_wait_while_the_server_is_down_and_go_out_in_order() {
    let (rig, ircd, port) = irc_rig(0);
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
    let _ircd = Ngircd::start(rig.path(), port);
    let carl = Person::connect(port, "carl", "#test");
    let posted = carl.wait_said_by_bot(3, 60, &rig);
    assert_eq!(posted, ["<alice> queued message 1", "<alice> queued message 2", "<alice> queued message 3"]);
}

#[test]
fn a_long_message_is_paced_and_cut_and_strangers_are_refused() {
    let (rig, _ircd, port) = irc_rig(0);
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
    let posted = carl.wait_said_by_bot(10, 60, &rig);
    assert_eq!(posted.len(), 10, "{posted:#?}");
    assert_eq!(posted[0], format!("<alice> line 1 {}", "x".repeat(40)));
    assert_eq!(posted[8], format!("<alice> line 9 {}", "x".repeat(40)));
    assert_eq!(posted[9], "<alice> [191 more lines cut]");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(carl.said_by_bot().len(), 10, "nothing from mallory or the stranger");
    assert!(!bot_quit(&carl), "{:#?}", carl.lines());
    // One connection all along (the first attempt may come before ngircd listens).
    assert_eq!(rig.log().matches("Connected to IRC").count(), 1, "{}", rig.log());
}

#[test]
fn contacts_subscribe_and_unsubscribe_by_message() {
    let (rig, _ircd, port) = irc_rig(0);
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

#[test]
fn a_flood_of_private_messages_is_limited_per_client_host_and_the_bot_stays() {
    // irc.private_messages_per_minute = 5 (the default), per client host:
    // three nicks from one host (a flooder changing nick or ident) share it.
    let (rig, _ircd, port) = irc_rig(0);
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

#[test]
fn a_busy_window_becomes_several_digests_that_each_fit_and_none_is_dead_lettered() {
    let (rig, _ircd, port) = irc_rig(20);
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

#[test]
fn a_post_to_any_kind_of_channel_is_checked_like_a_hash_channel() {
    let (rig, _ircd, port) = irc_rig(0);
    rig.person("mallory");
    rig.contact("mallory", &["--allow-send"]);
    // Carl first: the bot's JOIN must come after he is in the channel.
    let _carl = carl_with_the_bot(port);
    let mut mallory_irc = Person::connect(port, "watcher", "+test");
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
