//! Real mail, whole (PROFILE section 8): messages far larger than one
//! LATSSIAM block go SMTP -> gateway -> LATSSIAM as `message/partial`
//! fragments and come out of `fetch --maildir` octet for octet; the other way
//! the poller joins a contact's fragments and relays one mail. Real peers:
//! the built binary (gateway, reference server, client), smtplib as the
//! sending MTA, aiosmtpd as the smarthost, `openssl cms` for one fragment.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use common::mail::{real_mail, relayable};
use common::rig::Rig;
use common::{ok, run, wait_for};

/// The files in a Maildir's new/.
fn maildir_new(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(dir.join("new")).map(|r| r.map(|e| e.unwrap().path()).collect()).unwrap_or_default();
    v.sort();
    v
}

fn fetch_maildir(dir: &Path, who: &str, server: &str, maildir: &str, deadline: u64) -> String {
    ok(
        dir,
        &[
            "fetch",
            "--identity",
            who,
            "--server",
            server,
            "--deadline",
            &deadline.to_string(),
            "--maildir",
            maildir,
            "--pins",
            "pins",
        ],
    )
}

/// Fetches into `maildir` until it holds `n` messages.
fn wait_maildir(dir: &Path, who: &str, server: &str, maildir: &str, n: usize) -> Vec<PathBuf> {
    wait_for(Duration::from_secs(120), || {
        fetch_maildir(dir, who, server, maildir, 2);
        Some(maildir_new(&dir.join(maildir))).filter(|f| f.len() >= n)
    })
    .unwrap_or_else(|| panic!("{who} never got {n} messages in {maildir}"))
}

#[test]
fn nine_megabytes_with_attachments_arrive_whole_remote_and_local() {
    let (rig, _srv, bob_server) = Rig::with_bobhost("bob@example.org");
    rig.person("alice");
    rig.contact("alice", &["--email", "alice@example.org"]);

    // EHLO announces the limit; SIZE= above it is refused before DATA.
    let said = raw_ehlo_size(rig.smtp_port);
    assert!(said.contains("250-SIZE 10240000"), "{said}");
    assert!(said.contains("552 5.3.4"), "{said}");

    let mail = real_mail("Carol <carol@remote.example>", "bob@example.org, alice@example.org", 9_000_000);
    assert!(mail.len() > 8_900_000, "{}", mail.len());
    let r = rig.smtp_send("carol@remote.example", "bob@example.org,alice@example.org", &mail);
    assert!(r.starts_with("accepted 250"), "{r}");

    // One fragment taken off bob's server (not acknowledged, so it stays)
    // decrypts with openssl to a valid message/partial.
    let der = wait_for(Duration::from_secs(60), || take_one_unacked(rig.path(), "bob", &bob_server))
        .unwrap_or_else(|| panic!("nothing reached bob's server: {}", rig.log()));
    std::fs::write(rig.path().join("fragment.der"), &der).unwrap();
    let out = Command::new("openssl")
        .args(["cms", "-decrypt", "-binary", "-inform", "DER", "-in", "fragment.der"])
        .args(["-inkey", "bob/key.pem", "-recip", "bob/cert.pem"])
        .current_dir(rig.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let fragment = String::from_utf8_lossy(&out.stdout);
    let header = &fragment[..fragment.find("\r\n\r\n").unwrap()];
    for field in ["From: ", "To: <bob@bobhost>", "Date: ", "Message-ID: <", "MIME-Version: 1.0"] {
        assert!(header.contains(field), "{header}");
    }
    assert!(header.contains("Content-Type: message/partial; id=\"") && header.contains("; total="), "{header}");

    // Bob (remote server) and alice (the gateway's own mailbox) get it whole.
    for (who, server, dir) in [("bob", bob_server.as_str(), "bob-mail"), ("alice", rig.home.as_str(), "alice-mail")] {
        let files = wait_maildir(rig.path(), who, server, dir, 1);
        assert_eq!(files.len(), 1, "{who}: one message, not fragments");
        let got = std::fs::read(&files[0]).unwrap();
        assert!(got.ends_with(&mail), "{who}: {} octets, sent {}", got.len(), mail.len());
        let prepended = &got[..got.len() - mail.len()];
        assert!(prepended.starts_with(b"Received: from client.example"), "{}", String::from_utf8_lossy(prepended));
        // Nothing is left to join, and a second fetch brings nothing more.
        fetch_maildir(rig.path(), who, server, dir, 0);
        assert_eq!(maildir_new(&rig.path().join(dir)).len(), 1);
    }
}

/// EHLO, then MAIL FROM with SIZE= one octet over the limit.
fn raw_ehlo_size(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"EHLO c.example\r\nMAIL FROM:<a@remote.example> SIZE=10240001\r\nQUIT\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// The first message in `who`'s mailbox on `server` (localhost:PORT), left there.
fn take_one_unacked(dir: &Path, who: &str, server: &str) -> Option<Vec<u8>> {
    let port = server.rsplit_once(':')?.1;
    let identity = Arc::new(latssiam::Identity::load(&dir.join(who)).unwrap());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let pins = latssiam::tls::MemoryPins::default();
        let mut c = latssiam::client::Client::connect(addr, "localhost", Some(identity), &pins).await.ok()?;
        match c.accept(Duration::ZERO).await.ok()? {
            latssiam::client::Accepted::Message(d) => Some(d.message),
            latssiam::client::Accepted::Nothing(_) => None,
        }
    })
}

/// SENDs each of `messages` (plaintexts), sealed to the gateway and signed
/// by `who`, to the gateway's mailbox; returns the status codes.
fn send_signed(rig: &Rig, who: &str, messages: &[Vec<u8>]) -> Vec<latssiam::wire::Code> {
    let identity = Arc::new(latssiam::Identity::load(&rig.path().join(who)).unwrap());
    let gateway_cert = std::fs::read(rig.data_dir().join("identity/cert.pem")).unwrap();
    let gateway_cert = latssiam::identity::certificate_from_pem_or_der(&gateway_cert).unwrap().to_vec();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let addr = format!("127.0.0.1:{}", rig.home_port).parse().unwrap();
        let pins = latssiam::tls::MemoryPins::default();
        let mut c = latssiam::client::Client::connect(addr, "localhost", Some(identity.clone()), &pins).await.unwrap();
        let mut codes = Vec::new();
        for m in messages {
            let sealed = latssiam::crypto::seal(m, &gateway_cert).unwrap();
            let signature = latssiam::crypto::sign(&sealed, &identity).unwrap();
            codes.push(c.send(rig.gateway_fp.parse().unwrap(), &sealed, Some(&signature)).await.unwrap().code());
        }
        c.quit().await;
        codes
    })
}

#[test]
fn past_the_smtp_memory_budget_large_mail_waits_in_a_file_and_arrives_whole() {
    // A memory budget of 1 MiB beyond each session's first: two 4 MB
    // messages sent at once go on in unlinked files under the queue's spool
    // while they arrive, come back one at a time, and reach alice whole,
    // octet for octet.
    let rig = Rig::new("[smtp]\ndata_memory_mib = 1\n");
    rig.person("alice");
    rig.contact("alice", &["--email", "alice@example.org"]);
    let mails: Vec<Vec<u8>> = (0..2)
        .map(|i| real_mail(&format!("Carol{i} <carol{i}@remote.example>"), "alice@example.org", 4_000_000))
        .collect();
    let sent: Vec<String> = std::thread::scope(|s| {
        let sending: Vec<_> =
            mails.iter().map(|m| s.spawn(|| rig.smtp_send("carol@remote.example", "alice@example.org", m))).collect();
        sending.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &sent {
        assert!(r.starts_with("accepted 250"), "{r}\n{}", rig.log());
    }
    let files = wait_maildir(rig.path(), "alice", &rig.home, "alice-mail", 2);
    assert_eq!(files.len(), 2);
    let got: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    for m in &mails {
        assert!(got.iter().any(|g| g.ends_with(m)), "a message arrived altered or not at all");
    }
    let spool = rig.data_dir().join("queue/spool");
    let left: Vec<_> = std::fs::read_dir(&spool)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".smtp-data"))
        .collect();
    assert!(left.is_empty(), "no message data file left behind: {left:?}");
}

#[test]
fn a_contacts_large_mail_is_joined_and_relayed_octet_for_octet() {
    let rig = Rig::new("");
    rig.person("alice");
    rig.contact("alice", &["--email", "alice@example.org", "--allow-send"]);
    // Octet for octet needs lines SMTP can carry: this one has no line over 998 octets.
    let mail = relayable(&real_mail("Alice <alice@example.org>", "Victor <victor@remote.example>", 3_000_000));
    std::fs::write(rig.path().join("big.eml"), &mail).unwrap();
    let gateway_cert = rig.data_dir().join("identity/cert.pem");
    let out = rig.send_file("alice", gateway_cert.to_str().unwrap(), "big.eml", &[]);
    assert!(out.contains("31 Message accepted (") && out.contains("fragments)"), "{out}");
    let relayed = rig.wait_relayed(1);
    assert_eq!(relayed.len(), 1, "one mail, not fragments");
    assert_eq!(relayed[0]["rcpt_tos"][0], "victor@remote.example");
    let data = relayed[0]["data"].as_str().unwrap().as_bytes();
    // Exactly the octets alice wrote, after the gateway's trace fields (no empty line added at the end).
    assert!(data.ends_with(&mail), "{} octets relayed, {} written", data.len(), mail.len());
    let added = String::from_utf8_lossy(&data[..data.len() - mail.len()]);
    assert!(added.starts_with("Received: from alice@localhost") && added.contains("LATSSIAM-URL: "), "{added}");
    assert_eq!(rig.metric("latssiam_bridge_fragment_sets_joined_total"), 1);

    // A small message relayed the same way keeps its last line too (no empty line added).
    let small = b"From: alice@example.org\r\nTo: w@remote.example\r\nSubject: s\r\nDate: Sun, 06 Dec 2026 10:00:00 +0000\r\nMessage-ID: <s@x>\r\n\r\nlast line\r\n";
    assert_eq!(send_signed(&rig, "alice", &[small.to_vec()]), [latssiam::wire::Code::MessageAccepted]);
    let relayed = rig.wait_relayed(2);
    assert!(relayed[1]["data"].as_str().unwrap().ends_with("\r\n\r\nlast line\r\n"), "{}", relayed[1]["data"]);

    // A 5,000-octet line goes out re-encoded (the sink, like any MTA, refuses
    // lines over 1,000 octets), and decodes to exactly what alice wrote.
    let line = "x".repeat(5000);
    let long = format!("From: alice@example.org\r\nTo: w@remote.example\r\nSubject: long\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{line}\r\n");
    assert_eq!(send_signed(&rig, "alice", &[long.into_bytes()]), [latssiam::wire::Code::MessageAccepted]);
    let relayed = rig.wait_relayed(3);
    let data = relayed[2]["data"].as_str().unwrap();
    assert!(data.contains("Content-Transfer-Encoding: base64\r\n"), "{data}");
    assert!(data.lines().all(|l| l.len() <= 998));
    let body = data.split("\r\n\r\n").nth(1).unwrap().replace("\r\n", "");
    let decoded = base64::engine::general_purpose::STANDARD.decode(body).unwrap();
    assert_eq!(decoded, format!("{line}\r\n").into_bytes());
}

#[test]
fn another_signers_fragments_with_the_same_id_are_refused_and_the_first_arrives_intact() {
    let rig = Rig::new("");
    rig.person("alice");
    rig.contact("alice", &["--email", "alice@example.org", "--allow-send"]);
    rig.person("mallory");
    rig.contact("mallory", &["--email", "mallory@example.org", "--allow-send"]);
    let mail = relayable(&real_mail("alice@example.org", "victor@remote.example", 150_000));
    let gateway_cert = std::fs::read(rig.data_dir().join("identity/cert.pem")).unwrap();
    let gateway_cert = latssiam::identity::certificate_from_pem_or_der(&gateway_cert).unwrap().to_vec();
    let overhead = latssiam::fragment::sealing_overhead(&gateway_cert).unwrap();
    let id = latssiam::fragment::new_id("localhost").unwrap();
    let cut = |m: &[u8], from: &str| -> Vec<Vec<u8>> {
        latssiam::fragment::Fragmenter::new(
            m,
            overhead,
            &id,
            from,
            "<gateway@localhost>",
            "Sun, 6 Dec 2026 10:00:00 +0000",
        )
        .unwrap()
        .collect()
    };
    let alices = cut(&mail, "<alice@localhost>");
    let forged = real_mail("mallory@example.org", "victor@remote.example", 100_000);
    let mallorys = cut(&forged, "<mallory@localhost>");
    assert!(alices.len() >= 4, "{}", alices.len());
    let accepted = latssiam::wire::Code::MessageAccepted;
    assert_eq!(send_signed(&rig, "alice", &alices[..1]), [accepted]);
    // Mallory's fragments of alice's set: each dropped (52 on the home server) and logged.
    assert_eq!(send_signed(&rig, "mallory", &mallorys[1..]), vec![accepted; mallorys.len() - 1]);
    let refused = rig.wait_metric("latssiam_bridge_fragments_refused_total", (mallorys.len() - 1) as u64);
    assert_eq!(refused, (mallorys.len() - 1) as u64);
    assert!(rig.log().contains("another signer has an open set with this id"), "{}", rig.log());
    assert_eq!(send_signed(&rig, "alice", &alices[1..]), vec![accepted; alices.len() - 1]);
    let relayed = rig.wait_relayed(1);
    assert!(relayed[0]["data"].as_str().unwrap().as_bytes().ends_with(&mail));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rig.relayed().len(), 1, "mallory's slices made no message");
}

#[test]
fn a_sigkill_in_the_middle_of_a_200_fragment_set_loses_nothing_and_sends_it_once() {
    let (mut rig, _srv, bob_server) = Rig::with_bobhost("bob@example.org");
    let mail = real_mail("carol@remote.example", "bob@example.org", 3_600_000);
    let r = rig.smtp_send("carol@remote.example", "bob@example.org", &mail);
    assert!(r.starts_with("accepted 250"), "{r}");
    // The first fragment reaches bob (fetch keeps it in its partial-set store)...
    let first = fetch_until_one(rig.path(), &bob_server);
    assert!(first.is_empty(), "no whole message yet: {first}");
    // ...and the gateway dies in the middle of the set.
    rig.gateway.as_mut().unwrap().signal("KILL");
    let out = fetch_maildir(rig.path(), "bob", &bob_server, "bob-mail", 0);
    assert!(maildir_new(&rig.path().join("bob-mail")).is_empty(), "the set was cut short: {out}");
    rig.start();
    let files = wait_maildir(rig.path(), "bob", &bob_server, "bob-mail", 1);
    assert_eq!(files.len(), 1);
    assert!(std::fs::read(&files[0]).unwrap().ends_with(&mail));
    // Once: nothing more arrives after the set is done.
    std::thread::sleep(Duration::from_secs(2));
    fetch_maildir(rig.path(), "bob", &bob_server, "bob-mail", 1);
    assert_eq!(maildir_new(&rig.path().join("bob-mail")).len(), 1, "{}", rig.log());
    assert!(rig.cli(&["queue", "list"]).contains("-- 0 jobs"));
}

/// Fetches one message (a fragment) as bob into bob-mail; returns what fetch
/// wrote into the Maildir meanwhile (file names).
fn fetch_until_one(dir: &Path, server: &str) -> String {
    let out = run(
        dir,
        &[
            "fetch",
            "--identity",
            "bob",
            "--server",
            server,
            "--deadline",
            "60",
            "--max",
            "1",
            "--maildir",
            "bob-mail",
            "--pins",
            "pins",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    maildir_new(&dir.join("bob-mail")).iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" ")
}

#[test]
fn a_fragment_from_smtp_is_refused_and_one_person_gets_one_copy() {
    let rig = Rig::new("");
    rig.person("alice");
    rig.contact("alice", &["--email", "alice@example.org"]);
    // message/partial over SMTP would be joined by the recipient as the gateway's own set.
    let partial = b"From: m@remote.example\r\nTo: alice@example.org\r\nMIME-Version: 1.0\r\n\
Content-Type: message/partial; id=\"x@remote.example\"; number=1; total=2\r\n\r\nhalf\r\n";
    let r = rig.smtp_send("m@remote.example", "alice@example.org", partial);
    assert!(r.starts_with("refused 554 5.6.1"), "{r}");
    // One transaction naming her four times (and in other case) delivers one copy.
    let r = rig.smtp_send(
        "m@remote.example",
        "alice@example.org,ALICE@example.org,alice@EXAMPLE.org,alice@example.org",
        b"Subject: once\r\n\r\nonce\r\n",
    );
    assert!(r.starts_with("accepted 250"), "{r}");
    let (files, out) = rig.fetch("alice", 10);
    assert_eq!(files.len(), 1, "{out}");
}
