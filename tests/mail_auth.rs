//! The gateway as the border that authenticates (SPF, DKIM, DMARC in; DKIM
//! out), against a real authoritative DNS server on loopback
//! (tests/support/dns_server.py) with real records: SPF `-all`, a DKIM key
//! made by `latssiam-bridge dkim new`, DMARC `p=reject` and `p=none`. Mail
//! is signed by mail-auth (as a sending MTA would) and sent with smtplib
//! from 127.0.0.1 (allowed by SPF) or 127.0.0.2 (not).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::rig::Rig;
use common::{ok, wait_for};
use mail_auth::common::headers::HeaderWriter as _;
use mail_auth::dkim::DkimSigner;
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator};

/// `dkim new` in `dir`; returns the key file and the zone line.
fn dkim_key(dir: &Path, domain: &str, selector: &str, ed25519: bool) -> (String, String) {
    let out = dir.join(format!("{selector}.{domain}.pem"));
    let mut args = vec!["dkim", "new", "--domain", domain, "--selector", selector, "--out", out.to_str().unwrap()];
    if ed25519 {
        args.push("--ed25519");
    }
    let record = ok(dir, &args).trim().to_owned();
    assert!(record.starts_with(&format!("{selector}._domainkey.{domain}. 3600 IN TXT (")), "{record}");
    (out.to_str().unwrap().to_owned(), record)
}

const SOA: &str = "example. 300 IN SOA ns.example. hostmaster.example. 1 3600 600 86400 300";

/// Signs `message` as `selector._domainkey.domain` with the key in `key_file`.
fn sign(message: &str, domain: &str, selector: &str, key_file: &str) -> String {
    let key = latssiam_bridge::gateway::auth::load_key(Path::new(key_file)).unwrap();
    let signature = DkimSigner::from_key(key)
        .domain(domain)
        .selector(selector)
        .headers(["From", "To", "Subject", "Date", "Message-ID"])
        .sign(message.as_bytes())
        .unwrap();
    format!("{}{message}", signature.to_header())
}

/// What `who` fetches now (what earlier fetches wrote is cleared first).
fn fetched(rig: &Rig, who: &str) -> (Vec<String>, String) {
    let _ = std::fs::remove_dir_all(rig.path().join(format!("{who}-inbox")));
    let (files, out) = rig.fetch(who, 10);
    (files.iter().map(|f| std::fs::read_to_string(f).unwrap()).collect(), out)
}

#[test]
fn authenticated_mail_passes_spoofed_mail_is_refused_or_marked_and_outbound_mail_is_signed() {
    let keys = tempfile::tempdir().unwrap();
    let (bob_key, bob_record) = dkim_key(keys.path(), "signed.example", "s1", false);
    let (gw_key, gw_record) = dkim_key(keys.path(), "example.org", "gw", true);
    let zone = format!(
        "{SOA}\n\
signed.example. 300 IN TXT \"v=spf1 ip4:127.0.0.1 -all\"\n\
_dmarc.signed.example. 300 IN TXT \"v=DMARC1; p=reject\"\n\
{bob_record}\n\
lax.example. 300 IN TXT \"v=spf1 ip4:127.0.0.1 -all\"\n\
_dmarc.lax.example. 300 IN TXT \"v=DMARC1; p=none\"\n\
late.example. 300 IN TXT \"v=spf1 ip4:127.0.0.1 -all\"\n\
_dmarc.late.example. 300 IN TXT \"v=DMARC1; p=reject\"\n\
{gw_record}\n"
    );
    let mut rig = Rig::with_zone(
        &format!("[[dkim]]\ndomain = \"example.org\"\nselector = \"gw\"\nkey_file = \"{gw_key}\"\n"),
        &zone,
    );
    rig.person("alice");
    rig.contact("alice", &["--email", "alice@example.org", "--allow-send"]);

    // Properly signed, from an address SPF allows: delivered, all three pass, no warning.
    let plain = "From: Bob <bob@signed.example>\r\nTo: alice@example.org\r\nSubject: the real thing\r\n\
Date: Sun, 06 Dec 2026 10:00:00 +0000\r\nMessage-ID: <real@signed.example>\r\n\r\nHello Alice.\r\n";
    let signed = sign(plain, "signed.example", "s1", &bob_key);
    let r = rig.smtp_send("bob@signed.example", "alice@example.org", signed.as_bytes());
    assert!(r.starts_with("accepted 250"), "{r}\n{}", rig.log());
    let (got, printed) = fetched(&rig, "alice");
    assert_eq!(got.len(), 1, "{printed}");
    let ar = got[0].split("\r\n\r\n").next().unwrap();
    assert!(ar.contains("Authentication-Results: gw.example.org;"), "{ar}");
    for result in ["spf=pass", "dkim=pass", "dmarc=pass"] {
        assert!(ar.contains(result), "{result} missing: {ar}");
    }
    assert!(!got[0].contains("LATSSIAM-Auth-Warning") && !printed.contains("WARNING"), "{printed}");

    // The same body with a tampered header, from an address SPF does not allow: DMARC p=reject.
    let tampered = signed.replace("Subject: the real thing", "Subject: pay this invoice");
    let r = rig.smtp_send_from("127.0.0.2", "bob@signed.example", "alice@example.org", tampered.as_bytes());
    assert!(r.starts_with("refused 550 5.7.1"), "{r}");
    assert!(rig.cli(&["queue", "list"]).contains("-- 0 jobs"), "nothing queued");
    assert_eq!(rig.metric("latssiam_bridge_inbound_auth_total{outcome=\"rejected_dmarc\"}"), 1);

    // p=none failing: delivered, marked; the sender's forged results and LATSSIAM-URL are gone.
    let forged = "Authentication-Results: gw.example.org; dkim=pass header.d=lax.example; dmarc=pass\r\n\
LATSSIAM-URL: latssiam:0000000000000000000000000000000000000000000000000000000000000000//evil.example/key\r\n\
Authentication-Results: elsewhere.example; spf=pass\r\n\
From: Carol <carol@lax.example>\r\nTo: alice@example.org\r\nSubject: trust me\r\n\r\nbody\r\n";
    let r = rig.smtp_send_from("127.0.0.2", "carol@lax.example", "alice@example.org", forged.as_bytes());
    assert!(r.starts_with("accepted 250"), "{r}");
    let (got, printed) = fetched(&rig, "alice");
    assert_eq!(got.len(), 1, "{printed}");
    let header = got[0].split("\r\n\r\n").next().unwrap();
    assert_eq!(header.matches("Authentication-Results: gw.example.org;").count(), 1, "only ours: {header}");
    assert!(header.contains("dmarc=fail"), "{header}");
    assert!(!header.contains("evil.example") && !header.contains("LATSSIAM-URL"), "{header}");
    assert!(header.contains("Authentication-Results: elsewhere.example; spf=pass"), "another id stays: {header}");
    assert!(header.contains("LATSSIAM-Auth-Warning: "), "{header}");
    assert!(printed.contains("WARNING: the sender's domain does not vouch"), "{printed}");

    // One of our own domains in From:, from outside trusted_networks: refused whatever it publishes.
    let own = "From: CEO <ceo@example.org>\r\nTo: alice@example.org\r\nSubject: urgent\r\n\r\nwire money\r\n";
    let r = rig.smtp_send_from("127.0.0.2", "ceo@example.org", "alice@example.org", own.as_bytes());
    assert!(r.starts_with("refused 550 5.7.1"), "{r}");

    // DNS down: 451 (never a silent pass); the sender's retry once it is back is delivered.
    let late = "From: Dan <dan@late.example>\r\nTo: alice@example.org\r\nSubject: later\r\n\r\nx\r\n";
    rig.dns.stop();
    let r = rig.smtp_send("dan@late.example", "alice@example.org", late.as_bytes());
    assert!(r.starts_with("refused 451 4.7.0"), "{r}");
    rig.dns.restart();
    let r = rig.smtp_send("dan@late.example", "alice@example.org", late.as_bytes());
    assert!(r.starts_with("accepted 250"), "{r}");
    assert!(rig.metric("latssiam_bridge_inbound_auth_total{outcome=\"tempfail\"}") >= 1);

    // Outbound: a contact's mail reaches the sink signed for example.org, and
    // the signature verifies against the published record.
    let out = "From: alice@example.org\r\nTo: victor@remote.example\r\nSubject: signed by the gateway\r\n\
Date: Sun, 06 Dec 2026 10:00:00 +0000\r\nMessage-ID: <out@example.org>\r\n\r\nHi Victor\r\n";
    assert_eq!(rig.send_to_gateway("alice", out.as_bytes()), latssiam::wire::Code::MessageAccepted);
    let relayed = rig.wait_relayed(1);
    let data = relayed[0]["data"].as_str().unwrap();
    assert!(data.starts_with("DKIM-Signature: v=1; a=ed25519-sha256;") && data.contains("d=example.org"), "{data}");
    let resolver =
        latssiam::client::dns_resolver(&[rig.dns.nameserver().parse().unwrap()], Duration::from_secs(2)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let results = rt.block_on(async {
        let auth = MessageAuthenticator(resolver);
        let message = AuthenticatedMessage::parse(data.as_bytes()).unwrap();
        auth.verify_dkim(&message).await.iter().map(|o| o.result().clone()).collect::<Vec<_>>()
    });
    assert_eq!(results, [DkimResult::Pass]);

    // With a key configured, a From: outside the signing domains does not go out.
    let other = "From: alice@localhost\r\nTo: victor@remote.example\r\nSubject: unsigned\r\n\r\nx\r\n";
    assert_eq!(rig.send_to_gateway("alice", other.as_bytes()), latssiam::wire::Code::MessageAccepted);
    let log = wait_for(Duration::from_secs(20), || Some(rig.log()).filter(|l| l.contains("signs mail only")));
    assert!(log.is_some(), "{}", rig.log());
    assert_eq!(rig.relayed().len(), 1);
}

#[test]
fn a_trusted_upstreams_results_count_only_from_trusted_networks() {
    // Set as a container would: through the environment (lists comma-separated).
    let rig = Rig::with_env(
        "",
        &[
            ("LATSSIAM_BRIDGE__AUTH__TRUSTED_NETWORKS", "10.9.0.0/16,127.0.0.3/32"),
            ("LATSSIAM_BRIDGE__AUTH__TRUSTED_AUTHSERV_IDS", "mx.upstream.example"),
        ],
    );
    rig.person("alice");
    rig.contact("alice", &["--email", "alice@example.org"]);
    let m = "Authentication-Results: mx.upstream.example; spf=pass smtp.mailfrom=ceo@example.org;\r\n\
\tdkim=pass header.d=example.org; dmarc=pass header.from=example.org\r\n\
From: CEO <ceo@example.org>\r\nTo: alice@example.org\r\nSubject: from inside\r\n\r\nok\r\n";
    // From elsewhere the claim is worthless: our own domain, not authenticated.
    let r = rig.smtp_send_from("127.0.0.2", "ceo@example.org", "alice@example.org", m.as_bytes());
    assert!(r.starts_with("refused 550 5.7.1"), "{r}");
    // From the trusted MTA its results are taken (and its field replaced by ours).
    let r = rig.smtp_send_from("127.0.0.3", "ceo@example.org", "alice@example.org", m.as_bytes());
    assert!(r.starts_with("accepted 250"), "{r}");
    let (got, _) = fetched(&rig, "alice");
    let header = got[0].split("\r\n\r\n").next().unwrap();
    assert!(!header.contains("mx.upstream.example"), "{header}");
    assert!(header.contains("Authentication-Results: gw.example.org; spf=pass"), "{header}");
    assert!(header.contains("dmarc=pass") && !header.contains("LATSSIAM-Auth-Warning"), "{header}");
    assert_eq!(rig.metric("latssiam_bridge_inbound_auth_total{outcome=\"upstream\"}"), 1);
}

/// A name the DNS server says does not exist, without an SOA (so with no
/// negative TTL), is not asked again for every message: the answer is kept
/// for `NEGATIVE_MIN_TTL`. Shown by stopping the server after the first
/// answer: the same question is still answered "no such name", while a new
/// one now fails to reach the server.
#[test]
fn a_negative_answer_without_an_soa_is_kept_briefly_not_asked_per_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut dns = common::dns::Dns::start(dir.path(), "held.test. 60 IN TXT \"v=spf1 -all\"\n");
    let server: std::net::SocketAddr = dns.nameserver().parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let resolver = latssiam::client::dns_resolver(&[server], Duration::from_millis(500)).unwrap();
    let ask = |name: &'static str| rt.block_on(resolver.txt_lookup(name));
    assert!(ask("_dmarc.test.").unwrap_err().is_nx_domain(), "the server holds no _dmarc.test");
    assert!(ask("held.test.").is_ok(), "the server answers what it holds");
    dns.stop();
    let again = ask("_dmarc.test.");
    assert!(again.as_ref().is_err_and(|e| e.is_nx_domain()), "asked the stopped server again: {again:?}");
    let fresh = ask("_dmarc.other.test.");
    assert!(fresh.as_ref().is_err_and(|e| !e.is_no_records_found()), "the server is down: {fresh:?}");
}
