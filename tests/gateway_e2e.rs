//! The email gateway end to end, with real peers on loopback: the built
//! `latssiam-bridge` binary (gateway with its embedded home server, client
//! commands, a separate reference server), Python's `smtplib` as the sending
//! MTA and `aiosmtpd` as the smarthost (tests/support/*.py).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::rig::{http_get, support, Rig};
use common::{eml_files, ok, run, wait_for, Process, SyncTrace, BIN};

const UTF8_MESSAGE: &str = "From: Jürgen <juergen@remote.example>\r\nTo: alice@example.org\r\n\
Subject: Grüße aus Köln ✉\r\nMessage-ID: <e2l-1@remote.example>\r\nMIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
Hallo Alice, schöne Grüße! Ça va ? 日本語も。\r\n.leading dot stays\r\n";

#[test]
fn email_reaches_a_latssiam_contact_signed_by_the_gateway() {
    let rig = Rig::new("");
    rig.person("alice");
    rig.contact("alice", &["--email", "alice@example.org"]);
    let reply = rig.smtp_send("juergen@remote.example", "alice@example.org", UTF8_MESSAGE.as_bytes());
    assert!(reply.starts_with("accepted 250 2.0.0 Ok: queued as "), "{reply}");

    let (files, out) = rig.fetch("alice", 30);
    assert_eq!(files.len(), 1, "{out}");
    assert!(out.contains(&format!("signed by gateway@localhost {}", rig.gateway_fp)), "{out}");
    let got = std::fs::read(&files[0]).unwrap();
    let got = String::from_utf8(got).unwrap();
    assert!(got.starts_with("Received: from client.example (127.0.0.1)\r\n\tby gw.example.org with ESMTP"), "{got}");
    assert!(got.ends_with(UTF8_MESSAGE), "the message must arrive octet for octet:\n{got}");
    let queue_id = reply.rsplit(' ').next().unwrap();
    assert!(got.contains(&format!(" id {queue_id}\r\n")), "Received: names the queue id {queue_id}: {got}");
    // Then the mailbox is empty.
    let (_, out) = rig.fetch("alice", 0);
    assert!(out.starts_with("33"), "{out}");
    assert_eq!(rig.metric("latssiam_bridge_smtp_accepted_total"), 1);
    assert!(rig.http_get("/healthz").starts_with("HTTP/1.1 200"));
}

#[test]
fn latssiam_people_write_to_email_and_learn_of_failures() {
    let rig = Rig::new("");
    rig.person("alice");
    rig.contact("alice", &["--email", "alice@example.org", "--allow-send"]);
    let message = "From: alice@example.org\r\nTo: Xavier <xavier@remote.example>\r\nCc: yves@other.example\r\n\
Bcc: secret@third.example\r\nSubject: Réponse\r\n\r\nMerci !\r\n";
    std::fs::write(rig.path().join("reply.eml"), message).unwrap();
    let to = rig.gateway_fp.clone();
    ok(
        rig.path(),
        &["send", "--identity", "alice", "--server", &rig.home, "--to", &to, "--sign", "--pins", "pins", "reply.eml"],
    );
    let relayed = rig.wait_relayed(3);
    let mut rcpts: Vec<String> = relayed.iter().map(|r| r["rcpt_tos"][0].as_str().unwrap().to_owned()).collect();
    rcpts.sort();
    assert_eq!(rcpts, ["secret@third.example", "xavier@remote.example", "yves@other.example"]);
    for r in &relayed {
        assert_eq!(r["mail_from"], "alice@example.org", "envelope sender is the alias");
        let data = r["data"].as_str().unwrap();
        assert!(data.starts_with("Received: from alice@localhost"), "{data}");
        assert!(data.contains("Subject: Réponse") && data.contains("Merci !"), "{data}");
        assert!(!data.contains("secret@third.example"), "Bcc must not be relayed: {data}");
    }

    // A permanent smarthost refusal comes back to Alice as a LATSSIAM notice from the gateway.
    let bounce = "From: alice@example.org\r\nTo: reject-me@remote.example\r\nSubject: doomed\r\n\r\nhello\r\n";
    std::fs::write(rig.path().join("doomed.eml"), bounce).unwrap();
    ok(
        rig.path(),
        &["send", "--identity", "alice", "--server", &rig.home, "--to", &to, "--sign", "--pins", "pins", "doomed.eml"],
    );
    let (files, out) = rig.fetch("alice", 30);
    assert_eq!(files.len(), 1, "{out}\n{}", rig.log());
    assert!(out.contains(&format!("signed by gateway@localhost {}", rig.gateway_fp)), "{out}");
    let notice = std::fs::read_to_string(&files[0]).unwrap();
    assert!(notice.contains("could not be delivered to <reject-me@remote.example>"), "{notice}");
    assert!(notice.contains("550"), "{notice}");
    assert!(notice.contains("Subject: doomed"), "the notice quotes the header: {notice}");
}

/// SENDs to the gateway's mailbox on the home server as `who`, with a chosen signature.
fn send_raw(rig: &Rig, who: &str, signature: Option<Vec<u8>>, message: Vec<u8>) -> latssiam::wire::Code {
    let identity = Arc::new(latssiam::Identity::load(&rig.path().join(who)).unwrap());
    let gateway_cert = std::fs::read(rig.path().join("gw/identity/cert.pem")).unwrap();
    let gateway_cert = latssiam::identity::certificate_from_pem_or_der(&gateway_cert).unwrap();
    let sealed = latssiam::crypto::seal(&message, &gateway_cert).unwrap();
    let signature =
        signature.map(|s| if s.is_empty() { latssiam::crypto::sign(&sealed, &identity).unwrap() } else { s });
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let addr = format!("127.0.0.1:{}", rig.home_port).parse().unwrap();
        let pins = latssiam::tls::MemoryPins::default();
        let mut c = latssiam::client::Client::connect(addr, "localhost", Some(identity), &pins).await.unwrap();
        let fp = rig.gateway_fp.parse().unwrap();
        let status = c.send(fp, &sealed, signature.as_deref()).await.unwrap();
        c.quit().await;
        status.code()
    })
}

#[test]
fn refusals() {
    let rig = Rig::new("");
    rig.person("alice");
    rig.person("carol");
    rig.person("mallory");
    rig.contact("alice", &["--email", "alice@example.org", "--allow-send"]);
    rig.contact("carol", &[]);

    // SMTP: unknown local user, relaying, oversize.
    let m = b"Subject: x\r\n\r\nx\r\n";
    let r = rig.smtp_send("a@remote.example", "nobody@example.org", m);
    assert!(r.starts_with("refused 550 5.1.1"), "{r}");
    let r = rig.smtp_send("a@remote.example", "someone@elsewhere.example", m);
    assert!(r.starts_with("refused 550 5.7.1"), "{r}");
    // Over smtp.max_message_size (10,240,000 octets by default): 552 after the dot, nothing queued.
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    for _ in 0..(10_300_000 / 80) {
        big.extend_from_slice(&[b'y'; 78]);
        big.extend_from_slice(b"\r\n");
    }
    let r = rig.smtp_send("a@remote.example", "alice@example.org", &big);
    assert!(r.starts_with("refused 552 5.3.4"), "{r}");
    let mut loop_mail = Vec::new();
    for i in 0..31 {
        loop_mail.extend_from_slice(format!("Received: from hop{i}.example\r\n").as_bytes());
    }
    loop_mail.extend_from_slice(b"Subject: loop\r\n\r\nround and round\r\n");
    let r = rig.smtp_send("a@remote.example", "alice@example.org", &loop_mail);
    assert!(r.starts_with("refused 554 5.4.6"), "{r}");

    // LATSSIAM: a contact not allowed to send, a stranger, a bad signature, no signature.
    let out_mail = b"To: x@remote.example\r\nSubject: relay me\r\n\r\nplease\r\n".to_vec();
    use latssiam::wire::Code;
    assert_eq!(send_raw(&rig, "carol", Some(Vec::new()), out_mail.clone()), Code::MessageAccepted);
    assert_eq!(send_raw(&rig, "mallory", Some(Vec::new()), out_mail.clone()), Code::MessageAccepted);
    assert_eq!(send_raw(&rig, "alice", None, out_mail.clone()), Code::MessageAccepted);
    // A bad signature is already refused with 52 by the home server (it checks that the
    // signature verifies and is the TLS client's), so it never reaches the gateway.
    let alice = latssiam::Identity::load(&rig.path().join("alice")).unwrap();
    let forged = latssiam::crypto::sign(b"some other bytes", &alice).unwrap();
    assert_eq!(send_raw(&rig, "alice", Some(forged), out_mail), Code::MessageRefused);
    assert_eq!(rig.wait_metric("latssiam_bridge_accept_refused_total", 3), 3, "{}", rig.log());
    let log = rig.log();
    assert_eq!(log.matches("code=52").count(), 2, "carol and mallory: {log}");
    assert_eq!(log.matches("code=32").count(), 1, "unsigned: {log}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(rig.relayed().is_empty(), "nothing may be relayed: {:?}", rig.relayed());
    assert_eq!(rig.metric("latssiam_bridge_accept_taken_total"), 0);
}

#[test]
fn a_server_that_is_down_gets_the_message_once_it_is_back() {
    let (rig, mut srv, bob_server) = Rig::with_bobhost("bob@example.org");
    srv.signal("TERM");

    let r = rig.smtp_send("a@remote.example", "bob@example.org", b"Subject: patience\r\n\r\nwait for it\r\n");
    assert!(r.starts_with("accepted 250"), "{r}");
    // The job is deferred, and the operator sees why (through the running gateway).
    let listing = wait_for(Duration::from_secs(30), || {
        let l = rig.cli(&["queue", "list"]);
        l.contains("* ").then_some(l)
    })
    .unwrap_or_else(|| panic!("never deferred: {}", rig.cli(&["queue", "list"])));
    assert!(listing.contains("bobhost") && listing.contains("cannot connect"), "{listing}");
    assert!(rig.metric("latssiam_bridge_deliveries_total{channel=\"latssiam\",result=\"deferred\"}") >= 1);

    let port = bob_server.rsplit_once(':').unwrap().1.parse().unwrap();
    let _srv = common::rig::bob_server(rig.path(), port);
    let files = wait_for(Duration::from_secs(30), || {
        let out = ok(
            rig.path(),
            &["fetch", "--identity", "bob", "--server", &bob_server, "--out-dir", "bob-inbox", "--pins", "pins"],
        );
        let f = eml_files(&rig.path().join("bob-inbox"));
        (!f.is_empty() && out.contains("signed by gateway@localhost")).then_some(f)
    })
    .unwrap_or_else(|| panic!("never delivered: {}", rig.log()));
    assert!(std::fs::read_to_string(&files[0]).unwrap().contains("wait for it"));
    assert!(rig.cli(&["queue", "list"]).contains("-- 0 jobs"));
}

/// The `delivered=` count of the gateway's log line for the `n`th mail it took from SMTP.
fn delivered_in_session(rig: &Rig, n: usize) -> Option<String> {
    let log = rig.log();
    let line = log.lines().filter(|l| l.contains("Queued mail from SMTP.")).nth(n)?;
    Some(line.split_whitespace().find_map(|w| w.strip_prefix("delivered="))?.to_owned())
}

/// Mail for a contact on another server goes out while the SMTP client
/// waits once a session to that server is open: `250` comes after that
/// server's `31`, and nothing is queued, so a gateway killed right after
/// the `250` has nothing left to lose. A session that went stale (the
/// server restarted) sends the message down the queue, as before, and
/// pauses deliveries during sessions to that server for a minute.
#[test]
fn mail_for_another_server_goes_out_during_the_smtp_session_once_a_session_is_open() {
    let (mut rig, mut srv, bob_server) = Rig::with_bobhost("bob@example.org");
    let fetch_bob = |rig: &Rig| -> Vec<String> {
        ok(
            rig.path(),
            &["fetch", "--identity", "bob", "--server", &bob_server, "--out-dir", "bob-inbox", "--pins", "pins"],
        );
        eml_files(&rig.path().join("bob-inbox")).iter().map(|f| std::fs::read_to_string(f).unwrap()).collect()
    };
    let copies = |texts: &[String], word: &str| texts.iter().filter(|t| t.contains(word)).count();
    let ok_metric = "latssiam_bridge_deliveries_total{channel=\"latssiam\",result=\"ok\"}";
    // No session to bobhost yet: the first is queued, and the worker's
    // delivery leaves its session open in the pool.
    let r = rig.smtp_send("a@remote.example", "bob@example.org", b"Subject: one\r\n\r\nfirst\r\n");
    assert!(r.starts_with("accepted 250"), "{r}");
    rig.wait_metric(ok_metric, 1);
    assert_eq!(delivered_in_session(&rig, 0).as_deref(), Some("0"), "{}", rig.log());

    let r = rig.smtp_send("a@remote.example", "bob@example.org", b"Subject: two\r\n\r\nsecond\r\n");
    assert!(r.starts_with("accepted 250"), "{r}");
    rig.gateway.as_mut().unwrap().signal("KILL");
    assert_eq!(delivered_in_session(&rig, 1).as_deref(), Some("1"), "{}", rig.log());
    assert_eq!(copies(&fetch_bob(&rig), "second"), 1, "at bob's server, with the gateway dead");
    // (The first may come again after the restart: its job's removal need
    // not have reached the disk before the kill.)
    rig.start();

    // A third opens a session again; then bob's server restarts, which
    // leaves that session stale: the fourth is queued and still arrives,
    // and the fifth is queued too (the destination is paused).
    let r = rig.smtp_send("a@remote.example", "bob@example.org", b"Subject: three\r\n\r\nthird\r\n");
    assert!(r.starts_with("accepted 250"), "{r}");
    wait_for(Duration::from_secs(30), || (fetch_bob(&rig).iter().any(|t| t.contains("third"))).then_some(()))
        .unwrap_or_else(|| panic!("the third never arrived: {}", rig.log()));
    srv.signal("TERM");
    let port = bob_server.rsplit_once(':').unwrap().1.parse().unwrap();
    let _srv = common::rig::bob_server(rig.path(), port);
    let r = rig.smtp_send("a@remote.example", "bob@example.org", b"Subject: four\r\n\r\nfourth\r\n");
    assert!(r.starts_with("accepted 250"), "{r}");
    assert_eq!(delivered_in_session(&rig, 3).as_deref(), Some("0"), "{}", rig.log());
    assert!(rig.log().contains("Not delivered during the SMTP session; queued."), "{}", rig.log());
    wait_for(Duration::from_secs(30), || (fetch_bob(&rig).iter().any(|t| t.contains("fourth"))).then_some(()))
        .unwrap_or_else(|| panic!("the fourth never arrived: {}", rig.log()));
    let r = rig.smtp_send("a@remote.example", "bob@example.org", b"Subject: five\r\n\r\nfifth\r\n");
    assert!(r.starts_with("accepted 250"), "{r}");
    assert_eq!(delivered_in_session(&rig, 4).as_deref(), Some("0"), "paused: {}", rig.log());
    wait_for(Duration::from_secs(30), || (fetch_bob(&rig).iter().any(|t| t.contains("fifth"))).then_some(()))
        .unwrap_or_else(|| panic!("the fifth never arrived: {}", rig.log()));
    assert_eq!(copies(&fetch_bob(&rig), "second"), 1, "the second was never queued");
}

#[test]
fn a_gone_mailbox_bounces_to_the_original_sender() {
    let rig = Rig::new("");
    rig.person("dave");
    rig.contact("dave", &["--email", "dave@example.org"]);
    let out = ok(rig.path(), &["deregister", "--identity", "dave", "--server", &rig.home, "--pins", "pins"]);
    assert!(out.starts_with("10 "), "{out}");
    let original = "From: erin@remote.example\r\nTo: dave@example.org\r\nSubject: are you there?\r\nMessage-ID: <gone-1@remote.example>\r\n\r\nhello\r\n";
    let r = rig.smtp_send("erin@remote.example", "dave@example.org", original.as_bytes());
    assert!(r.starts_with("accepted 250"), "{r}");
    let relayed = rig.wait_relayed(1);
    let dsn = &relayed[0];
    assert_eq!(dsn["mail_from"], "<>", "a bounce comes from the null sender");
    assert_eq!(dsn["rcpt_tos"][0], "erin@remote.example");
    let data = dsn["data"].as_str().unwrap();
    assert!(data.contains("report-type=delivery-status"), "{data}");
    assert!(data.contains("Final-Recipient: rfc822; dave@example.org"), "{data}");
    assert!(data.contains("Action: failed") && data.contains("Status: 5.1.1"), "{data}");
    assert!(data.contains("Diagnostic-Code: x-latssiam; 38"), "{data}");
    assert!(data.contains("Message-ID: <gone-1@remote.example>"), "{data}");
    let dead = rig.cli(&["queue", "list"]);
    assert!(dead.contains("! "), "the failed job is a dead letter: {dead}");
    // From now on mail to dave is refused before it is accepted (no backscatter).
    let r = rig.smtp_send("frank@remote.example", "dave@example.org", b"Subject: again\r\n\r\nx\r\n");
    assert!(r.starts_with("refused 550 5.1.1"), "{r}");
    // A bounce is never bounced: mail from <> to a gone mailbox dead-letters quietly.
    rig.person("gina");
    rig.contact("gina", &["--email", "gina@example.org"]);
    ok(rig.path(), &["deregister", "--identity", "gina", "--server", &rig.home, "--pins", "pins"]);
    let r = rig.smtp_send("", "gina@example.org", b"Subject: from the void\r\n\r\nx\r\n");
    assert!(r.starts_with("accepted 250"), "{r}");
    wait_for(Duration::from_secs(20), || rig.cli(&["queue", "list"]).contains("gina@example.org").then_some(()));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(rig.relayed().len(), 1);
}

/// `250` for mail to someone on the embedded home server says it is in
/// their mailbox on disk, as a `SEND`'s `31` does: the home server's log,
/// which holds the message's record, is fdatasynced before the reply. (This
/// holds whether the gateway syncs the log alone, as it does, or flushes its
/// whole database; that sled needs no flush rests on the replay of the log
/// at start: `sigkill_loses_nothing_that_got_250` here, and the store's own
/// `the_log_brings_a_sled_that_lags_up_to_date_at_open`.)
#[test]
fn mail_for_the_embedded_home_server_is_fdatasynced_in_its_log_before_250() {
    let rig = Rig::new("");
    rig.person("alice");
    rig.contact("alice", &["--email", "alice@example.org"]);
    let pid = rig.gateway.as_ref().unwrap().child.id();
    let Some(trace) = SyncTrace::attach(pid, &rig.path().join("syscalls")) else { return };
    let reply = rig.smtp_send("juergen@remote.example", "alice@example.org", UTF8_MESSAGE.as_bytes());
    let calls = trace.calls();
    assert!(reply.starts_with("accepted 250"), "{reply}");
    assert!(
        calls.synced("/home-bodies/", ".log"),
        "the home server's log is not fdatasynced before 250:\n{}",
        calls.text
    );
    let (files, _) = rig.fetch("alice", 5);
    assert_eq!(files.len(), 1, "{}", rig.log());
}

#[test]
fn sigkill_loses_nothing_that_got_250() {
    // 200 messages from one origin: its daily share is not what this is about.
    let mut rig = Rig::new("[gateway]\nmax_per_origin_per_day = 0\n");
    rig.person("alice");
    rig.contact("alice", &["--email", "alice@example.org"]);
    let mut flood = Command::new("python3")
        .args([
            &support("smtp_flood.py"),
            "127.0.0.1",
            &rig.smtp_port.to_string(),
            "flood@remote.example",
            "alice@example.org",
            "200",
            "8",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut acked = BTreeSet::new();
    let mut lines = BufReader::new(flood.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(n) = line.strip_prefix("ok ") {
            acked.insert(n.parse::<u32>().unwrap());
        }
        if acked.len() == 60 {
            rig.gateway.as_mut().unwrap().signal("KILL");
            break;
        }
    }
    // Sessions that got their 250 just before the kill still report it.
    for line in lines {
        if let Some(n) = line.unwrap().strip_prefix("ok ") {
            acked.insert(n.parse::<u32>().unwrap());
        }
    }
    flood.wait().unwrap();
    assert!(acked.len() < 200, "the kill came too late to test anything");
    rig.start();

    let mut seen: BTreeMap<u32, usize> = BTreeMap::new();
    // Every message fetched, counted from fetch's one line per message (each
    // fetch acknowledges what it took, so none is counted twice).
    let mut fetched = 0;
    let complete = wait_for(Duration::from_secs(90), || {
        let (files, out) = rig.fetch("alice", 2);
        fetched += out.lines().filter(|l| l.contains(" signed by ") || l.contains(" unsigned")).count();
        seen.clear();
        for f in files {
            let text = std::fs::read_to_string(f).unwrap();
            if let Some(n) = text.split("Subject: flood ").nth(1).and_then(|r| r.split("\r\n").next()) {
                *seen.entry(n.parse().unwrap()).or_default() += 1;
            }
        }
        acked.iter().all(|n| seen.contains_key(n)).then_some(())
    });
    let lost: Vec<_> = acked.iter().filter(|n| !seen.contains_key(n)).collect();
    assert!(complete.is_some() && lost.is_empty(), "lost after 250: {lost:?}\n{}", rig.log());
    // fetch names files by content, so a message delivered twice shows as one file; count what the
    // gateway's own metric says was delivered against what was acknowledged.
    let delivered = rig.metric("latssiam_bridge_deliveries_total{channel=\"latssiam\",result=\"ok\"}");
    eprintln!(
        "crash test: {} acknowledged with 250 before/around the kill, {} distinct and {fetched} in all fetched, {} delivered after the restart",
        acked.len(),
        seen.len(),
        delivered
    );
    // Mail for the embedded home server is stored once, before its 250; a
    // copy can come only from a queued job the worker delivered again after
    // the restart (its completion was not yet durable at the kill).
    let twice = fetched.saturating_sub(seen.len());
    assert!(
        u64::try_from(twice).unwrap() <= delivered,
        "{twice} messages stored twice, but only {delivered} deliveries after the restart could have repeated one"
    );
}

#[test]
fn run_with_no_config_starts_and_answers_healthz() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Process::start(dir.path(), BIN, &["run"], &[("LATSSIAM_LOG", "warn")]);
    assert!(
        gw.first_line.contains("smtp 127.0.0.1:2525") && gw.first_line.contains("http 127.0.0.1:9925"),
        "{}",
        gw.first_line
    );
    let health = http_get(9925, "/healthz");
    assert!(health.starts_with("HTTP/1.1 200 OK") && health.ends_with("ok\n"), "{health}");
    assert!(http_get(9925, "/nope").starts_with("HTTP/1.1 404"));
    assert!(dir.path().join("latssiam-data/gateway/identity/cert.pem").is_file());
    // A second gateway on the same data dir is refused with a clear message.
    let out = run(dir.path(), &["run"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another gateway"), "{err}");
}

/// A raw SMTP session for the protocol's edges: sends `input` and returns everything the server said.
fn raw_smtp(port: u16, input: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(input).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn smtp_listener_speaks_esmtp_with_starttls_and_keeps_its_limits() {
    // 101 RCPTs of one person from one domain: the listener's limit is tested
    // here, not the origin's daily share (tests/hostile.rs).
    let rig = Rig::new("[gateway]\nmax_per_origin_per_day = 0\n");
    rig.person("alice");
    rig.contact("alice", &["--email", "alice@example.org"]);

    // swaks: EHLO capabilities, STARTTLS, pipelining, delivery.
    let out = Command::new("swaks")
        .args(["--server", &format!("127.0.0.1:{}", rig.smtp_port), "--from", "s@remote.example"])
        .args(["--to", "alice@example.org", "--tls", "--pipeline", "--body", "sent by swaks"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for ext in ["SIZE 10240000", "8BITMIME", "PIPELINING", "SMTPUTF8", "ENHANCEDSTATUSCODES", "STARTTLS"] {
        assert!(text.contains(ext), "EHLO lacks {ext}: {text}");
    }
    assert!(text.contains("250 2.0.0 Ok: queued as"), "{text}");
    let (files, _) = rig.fetch("alice", 30);
    assert!(std::fs::read_to_string(&files[0]).unwrap().contains("with ESMTPS"), "STARTTLS is noted in Received:");

    // smtplib over STARTTLS too.
    let file = rig.path().join("tls.eml");
    std::fs::write(&file, "Subject: tls\r\n\r\nover tls\r\n").unwrap();
    let out = Command::new("python3")
        .args([&support("smtp_send.py"), "127.0.0.1", &rig.smtp_port.to_string(), "s@remote.example"])
        .args(["alice@example.org", file.to_str().unwrap(), "--starttls"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("accepted 250"));

    // Sequence, syntax, line length and recipient limits.
    let long = format!("NOOP {}\r\n", "x".repeat(1100));
    let mut input = format!("MAIL FROM:<a@remote.example>\r\nEHLO c.example\r\n{long}RCPT TO:<alice@example.org>\r\n");
    input.push_str("MAIL FROM:<a@remote.example>\r\nMAIL FROM:<b@remote.example>\r\nFROB\r\nRSET\r\nMAIL FROM:<x@remote.example> SIZE=99999999\r\nMAIL FROM:<x@remote.example>\r\n");
    for _ in 0..101 {
        input.push_str("RCPT TO:<alice@example.org>\r\n");
    }
    input.push_str("QUIT\r\n");
    let said = raw_smtp(rig.smtp_port, input.as_bytes());
    let codes: Vec<&str> = said.lines().map(|l| &l[..l.len().min(9)]).collect();
    assert!(said.starts_with("220 "), "{said}");
    assert!(said.contains("503 5.5.1 Send EHLO or HELO first"), "{said}");
    assert!(said.contains("500 5.5.2 Line too long"), "{said}");
    assert!(said.contains("503 5.5.1 Need MAIL before RCPT"), "{said}");
    assert!(said.contains("503 5.5.1 Nested MAIL command"), "{said}");
    assert!(said.contains("500 5.5.1 Command not recognized"), "{said}");
    assert!(said.contains("552 5.3.4"), "SIZE= over the limit: {said}");
    assert_eq!(codes.iter().filter(|c| c.starts_with("250 2.1.5")).count(), 100, "{said}");
    assert!(said.contains("452 4.5.3"), "the 101st recipient: {said}");
    assert!(said.trim_end().ends_with("221 2.0.0 Bye"), "{said}");

    // A text line over 1000 octets is accepted as Postfix accepts it, and arrives intact.
    let mut input =
        String::from("EHLO c.example\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n");
    let line = "z".repeat(5000);
    input.push_str(&format!("Subject: long\r\n\r\n{line}\r\n.\r\nQUIT\r\n"));
    let said = raw_smtp(rig.smtp_port, input.as_bytes());
    assert!(said.contains("354 ") && said.contains("250 2.0.0 Ok: queued"), "{said}");
    let (files, out) = rig.fetch("alice", 30);
    assert_eq!(files.len(), 3, "the swaks, smtplib and long messages: {out}");
    let long = files.iter().map(|f| std::fs::read_to_string(f).unwrap()).find(|m| m.contains("Subject: long"));
    assert!(long.is_some_and(|m| m.ends_with(&format!("Subject: long\r\n\r\n{line}\r\n"))), "{out}");
}

#[test]
fn oversize_mail_can_lose_its_attachments_instead() {
    // Settings through the environment, which overrides the file.
    let rig = Rig::with_env(
        "",
        &[("LATSSIAM_BRIDGE__SMTP__OVERSIZE", "strip-attachments"), ("LATSSIAM_BRIDGE__GATEWAY__LOG_FORMAT", "json")],
    );
    rig.person("alice");
    rig.contact("alice", &["--email", "alice@example.org"]);
    let mut m =
        String::from("From: a@remote.example\r\nTo: alice@example.org\r\nSubject: photos\r\nMIME-Version: 1.0\r\n");
    m.push_str(
        "Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n",
    );
    m.push_str("--XX\r\nContent-Type: image/jpeg\r\nContent-Disposition: attachment; filename=holiday.jpg\r\n");
    m.push_str("Content-Transfer-Encoding: base64\r\n\r\n");
    for _ in 0..400 {
        m.push_str(&"QUJD".repeat(19));
        m.push_str("\r\n");
    }
    m.push_str("--XX--\r\n");
    let r = rig.smtp_send("a@remote.example", "alice@example.org", m.as_bytes());
    assert!(r.starts_with("accepted 250"), "{r}");
    let (files, _) = rig.fetch("alice", 30);
    let got = std::fs::read_to_string(&files[0]).unwrap();
    assert!(got.contains("See attached.") && got.contains("holiday.jpg (22800 octets)"), "{got}");
    assert!(!got.contains("QUJD"), "the attachment itself is gone");
    let log = rig.log();
    assert!(log.lines().next().is_some_and(|l| l.starts_with('{')), "JSON logs: {log}");
}

#[test]
fn contacts_by_fingerprint_through_verify_and_removal_while_running() {
    let rig = Rig::new("");
    let fp = rig.person("frank");
    let out =
        rig.cli(&["contacts", "add", "--fingerprint", &fp, "--server", &rig.home, "--email", "frank@example.org"]);
    assert!(out.starts_with("added frank@localhost"), "{out}");
    let list = rig.cli(&["contacts", "list"]);
    assert!(list.contains("frank@localhost") && list.contains("frank@example.org") && list.contains(&fp), "{list}");
    let r = rig.smtp_send("a@remote.example", "frank@example.org", b"Subject: hi\r\n\r\nhi\r\n");
    assert!(r.starts_with("accepted 250"), "{r}");
    assert!(rig.cli(&["contacts", "remove", "frank@example.org"]).starts_with("removed"));
    let r = rig.smtp_send("a@remote.example", "frank@example.org", b"Subject: hi\r\n\r\nhi\r\n");
    assert!(r.starts_with("refused 550 5.1.1"), "{r}");
    // A bad certificate file is one clear line, exit 1.
    std::fs::write(rig.path().join("junk.pem"), "not a certificate").unwrap();
    let out = run(rig.path(), &["contacts", "add", "--cert", "junk.pem", "--config", rig.config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
}

#[test]
fn the_home_server_keeps_its_mailboxes_in_the_gateway_database_across_restarts() {
    let mut rig = Rig::new("");
    rig.person("alice");
    rig.contact("alice", &["--email", "alice@example.org"]);
    rig.gateway.as_mut().unwrap().signal("TERM");
    // The mailboxes live in the gateway's database, not in a database of their own in home/.
    assert!(!rig.path().join("gw/home/conf").exists());
    // An operator who points the server commands at home/ makes an empty
    // database there; the gateway still serves the mailboxes it has.
    let listing = ok(rig.path(), &["server", "mailboxes", "--data-dir", "gw/home"]);
    assert!(!listing.contains("alice"), "{listing}");
    assert!(rig.path().join("gw/home/conf").exists());
    rig.start();
    let r = rig.smtp_send("b@remote.example", "alice@example.org", b"Subject: still\r\n\r\nthere\r\n");
    assert!(r.starts_with("accepted 250"), "{r}");
    let (files, _) = rig.fetch("alice", 10);
    assert_eq!(files.len(), 1, "{}", rig.log());
}

#[test]
fn local_delivery_goes_through_the_home_servers_checks_and_the_network_path_stays() {
    // In-process (the default): a full mailbox (36) is refused as SEND would
    // be, and the message waits in the queue like any deferred delivery.
    let rig = Rig::new("[home]\nmax_unread_per_sender = 1\n");
    rig.person("alice");
    rig.contact("alice", &["--email", "alice@example.org"]);
    for n in 1..=2 {
        let m = format!("Subject: local {n}\r\n\r\nlocal {n}\r\n");
        let r = rig.smtp_send("b@remote.example", "alice@example.org", m.as_bytes());
        assert!(r.starts_with("accepted 250"), "{r}");
    }
    let listing = wait_for(Duration::from_secs(20), || Some(rig.cli(&["queue", "list"])).filter(|l| l.contains("36 ")))
        .unwrap_or_else(|| panic!("{}\n{}", rig.cli(&["queue", "list"]), rig.log()));
    assert_eq!(listing.matches("alice@example.org").count(), 1, "{listing}");
    assert_eq!(rig.metric("latssiam_bridge_deliveries_total{channel=\"latssiam\",result=\"ok\"}"), 1);
    // Once she has read the first, the second arrives.
    let (files, _) = rig.fetch("alice", 1);
    assert_eq!(files.len(), 1);
    rig.cli(&["queue", "retry", "--all"]);
    let (files, _) = rig.fetch("alice", 20);
    assert_eq!(files.len(), 2, "{}", rig.log());
    let texts: String = files.iter().map(|f| std::fs::read_to_string(f).unwrap()).collect();
    assert!(texts.contains("local 1") && texts.contains("local 2"), "{texts}");

    // With home.local_delivery = false the same goes over TLS on loopback.
    let rig = Rig::new("[home]\nlocal_delivery = false\n");
    rig.person("alice");
    rig.contact("alice", &["--email", "alice@example.org"]);
    let r = rig.smtp_send("b@remote.example", "alice@example.org", b"Subject: wire\r\n\r\nover the wire\r\n");
    assert!(r.starts_with("accepted 250"), "{r}");
    let (files, out) = rig.fetch("alice", 20);
    assert_eq!(files.len(), 1, "{out}\n{}", rig.log());
    assert!(out.contains(&format!("signed by gateway@localhost {}", rig.gateway_fp)), "{out}");
    assert!(rig.log().contains("Delivered."), "the worker delivered it: {}", rig.log());
}
