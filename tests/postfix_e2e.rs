//! Postfix in front of the gateway, without Docker: a private instance of
//! Debian's Postfix on loopback (tests/common/postfix.rs) is example.org's MX
//! and the gateway's smarthost, as in docker/compose.yaml. Bob has a Maildir
//! there; alice@example.org goes to the gateway through transport_maps.
//!
//! Skipped (with a line saying so) where Postfix is not installed or the test
//! does not run as root (the master process must start as root).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/postfix.rs"]
mod postfix;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::rig::Rig;
use common::{free_port, wait_for};
use postfix::Postfix;

fn swaks(port: u16, from: &str, to: &str, body: &str) -> String {
    let out: Output = Command::new("swaks")
        .args(["--server", &format!("127.0.0.1:{port}"), "--from", from, "--to", to, "--body", body])
        .stdin(Stdio::null())
        .output()
        .expect("swaks must be installed (apt-get install swaks)");
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Waits until a message of Bob's contains `needle`.
fn wait_bob(pf: &Postfix, rig: &Rig, needle: &str) -> String {
    wait_for(Duration::from_secs(30), || pf.bob_mail().into_iter().find(|m| m.contains(needle)))
        .unwrap_or_else(|| panic!("Bob has no {needle:?}: {:#?}\n{}\n{}", pf.bob_mail(), pf.log(), rig.log()))
}

/// Fetches as Alice until a message contains `needle`; returns it.
fn wait_alice(rig: &Rig, pf: &Postfix, needle: &str) -> String {
    for _ in 0..6 {
        let (files, _) = rig.fetch("alice", 5);
        if let Some(m) = files.iter().map(|f| std::fs::read_to_string(f).unwrap()).find(|m| m.contains(needle)) {
            return m;
        }
    }
    panic!("Alice never got {needle:?}\nPostfix queue: {}\n{}\n{}", pf.queue(), pf.log(), rig.log())
}

#[test]
fn postfix_in_front_round_trip_and_deferral() {
    if let Some(why) = Postfix::unavailable() {
        println!("SKIPPED postfix_e2e: {why}");
        return;
    }
    let postfix_port = free_port();
    // Postfix, on loopback, is the MTA in front: trusted as the sidecar's Postfix is
    // (mail from it may claim example.org; SPF is not checked against a relay).
    let mut rig =
        Rig::new(&format!("[smarthost]\nport = {postfix_port}\n[auth]\ntrusted_networks = [\"127.0.0.1/32\"]\n"));
    rig.person("alice");
    rig.contact("alice", &["--email", "alice@example.org", "--allow-send"]);
    // carol@example.org is sent to the gateway by Postfix, but the gateway does not know her.
    let pf = Postfix::start(postfix_port, rig.smtp_port, &["alice@example.org", "carol@example.org"]);

    // Email -> LATSSIAM: swaks to Postfix (the MX), transport_maps to the gateway, Alice fetches.
    let r = swaks(postfix_port, "juergen@remote.example", "alice@example.org", "Hello Alice through Postfix");
    assert!(r.contains("250 2.0.0 Ok: queued as"), "{r}");
    let got = wait_alice(&rig, &pf, "Hello Alice through Postfix");
    assert!(got.contains("by mail.example.org (Postfix)"), "{got}");
    assert!(got.contains("by gw.example.org with ESMTP"), "{got}");
    assert!(pf.log().contains(&format!("relay=127.0.0.1[127.0.0.1]:{}", rig.smtp_port)), "{}", pf.log());

    // LATSSIAM -> email: Alice answers Bob; the gateway relays through Postfix into his Maildir.
    std::fs::write(
        rig.path().join("reply.eml"),
        "From: alice@example.org\r\nTo: Bob <bob@example.org>\r\nSubject: Re: hello\r\n\r\nHello Bob from LATSSIAM\r\n",
    )
    .unwrap();
    let out = rig.send_file("alice", &rig.gateway_fp, "reply.eml", &["--sign"]);
    assert!(out.starts_with("31"), "{out}");
    let bob = wait_bob(&pf, &rig, "Hello Bob from LATSSIAM");
    assert!(bob.contains("Return-Path: <alice@example.org>"), "{bob}");
    assert!(bob.contains("Delivered-To: bob@example.org"), "{bob}");
    assert!(bob.contains("with LATSSIAM"), "{bob}");

    // Refusals: unknown to Postfix (550 at RCPT); known to Postfix but not to the gateway
    // (the gateway's 550 5.1.1 at RCPT, which Postfix returns to the sender as a bounce).
    let r = swaks(postfix_port, "bob@example.org", "dave@example.org", "x");
    assert!(r.contains("550 5.1.1"), "{r}");
    let r = swaks(postfix_port, "bob@example.org", "carol@example.org", "Hi Carol");
    assert!(r.contains("250 2.0.0 Ok: queued as"), "{r}");
    let bounce = wait_bob(&pf, &rig, "Undelivered Mail Returned to Sender");
    assert!(bounce.contains("<carol@example.org>") && bounce.contains("550 5.1.1"), "{bounce}");

    // The gateway stops: Postfix keeps the mail (deferred, not bounced) and delivers it once it is back.
    let status = rig.gateway.as_mut().unwrap().signal("TERM");
    assert!(status.success(), "{status:?}\n{}", rig.log());
    rig.gateway = None;
    let r = swaks(postfix_port, "bob@example.org", "alice@example.org", "Written while the gateway was down");
    assert!(r.contains("250 2.0.0 Ok: queued as"), "{r}");
    // The queue shows the reason before Postfix's log (written by its own
    // daemon) says status=deferred: both are waited for.
    wait_for(Duration::from_secs(20), || {
        (pf.queue().contains("Connection refused") && pf.log().contains("status=deferred")).then_some(())
    })
    .unwrap_or_else(|| panic!("not deferred: {}\n{}", pf.queue(), pf.log()));
    rig.start();
    pf.flush();
    let got = wait_alice(&rig, &pf, "Written while the gateway was down");
    assert!(got.contains("From: bob@example.org") || got.contains("bob@example.org"), "{got}");
    assert_eq!(
        pf.bob_mail().iter().filter(|m| m.contains("Undelivered Mail")).count(),
        1,
        "only carol's bounce: {:#?}",
        pf.bob_mail()
    );
    assert!(
        wait_for(Duration::from_secs(10), || pf.queue().contains("Mail queue is empty").then_some(())).is_some(),
        "{}",
        pf.queue()
    );
}
