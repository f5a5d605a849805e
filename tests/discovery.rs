//! Key distribution and discovery against real peers: WebFinger over HTTP
//! with `curl`, the LATSSIAM URL header on relayed mail, and (below) the
//! Gemini capsule with `openssl s_client` and the client commands that
//! resolve LATSSIAM URLs, QR codes and addresses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::free_port;
use common::rig::Rig;

/// `curl -i` of `url`: status, headers and body.
fn curl(url: &str) -> (u16, String, String) {
    let out = Command::new("curl").args(["-s", "-i", "--max-time", "10", url]).output().expect("curl is installed");
    let text = String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n");
    let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

/// A rig with WebFinger on a free port; returns it and the base URL.
fn rig_with_webfinger(extra: &str) -> (Rig, String) {
    let port = free_port();
    let rig = Rig::new(&format!("[http]\npublic_listen = \"127.0.0.1:{port}\"\n{extra}"));
    (rig, format!("http://127.0.0.1:{port}"))
}

#[test]
fn webfinger_describes_contacts_and_mailboxes_and_nobody_else() {
    let (rig, base) = rig_with_webfinger("");
    let alice = rig.person("alice");
    rig.contact("alice", &["--email", "alice@example.org"]);
    let bob = rig.person("bob");
    let wf = |resource: &str| curl(&format!("{base}/.well-known/webfinger?resource={resource}"));

    // A contact, by the email alias (percent-encoded as a browser would).
    let (status, head, body) = wf("acct%3Aalice%40example.org");
    assert_eq!(status, 200, "{head}{body}");
    assert!(head.to_ascii_lowercase().contains("content-type: application/jrd+json"), "{head}");
    assert!(head.to_ascii_lowercase().contains("access-control-allow-origin: *"), "{head}");
    let jrd: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(jrd["subject"], "acct:alice@example.org");
    assert_eq!(jrd["properties"]["urn:latssiam:fingerprint"], alice.as_str());
    let url = format!("latssiam:{alice}//localhost/.well-known/latssiam/alice.pem");
    let aliases: Vec<&str> = jrd["aliases"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(aliases, [url.as_str(), "mailto:alice@example.org"], "{body}");
    let links = jrd["links"].as_array().unwrap();
    assert!(links.iter().any(|l| l["rel"] == "urn:latssiam:url" && l["href"] == url.as_str()), "{body}");
    assert!(
        links.iter().any(|l| l["rel"] == "urn:latssiam:certificate"
            && l["href"] == "gemini://localhost/.well-known/latssiam/alice.pem"
            && l["type"] == "application/x-pem-file"),
        "{body}"
    );
    // A mailbox on the embedded home server that is no contact: no mailto.
    let (status, _, body) = wf("acct:bob@localhost");
    assert_eq!(status, 200, "{body}");
    let jrd: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(jrd["properties"]["urn:latssiam:fingerprint"], bob.as_str());
    assert!(!body.contains("mailto:"), "{body}");
    // Anyone else, a contact known only at another domain (not the
    // gateway's to vouch for), and a request without a resource.
    common::identity(rig.path(), "carol@localhost", "carol");
    rig.contact("carol", &["--email", "carol@other.example"]);
    assert_eq!(wf("acct:carol@other.example").0, 404);
    assert_eq!(wf("acct:nobody@example.org").0, 404);
    assert_eq!(curl(&format!("{base}/.well-known/webfinger")).0, 400);
    assert_eq!(curl(&format!("{base}/metrics")).0, 404, "metrics stay on http.listen");
    // A deregistered mailbox is no longer described.
    common::ok(rig.path(), &["deregister", "--identity", "bob", "--server", &rig.home, "--pins", "pins"]);
    assert_eq!(wf("acct:bob@localhost").0, 404);
    // A contact on another server is described only if they opted in
    // (hostile review 2, finding 8: the directory linked every alias to an
    // external server and key).
    let erin = common::identity(rig.path(), "erin@elsewhere.example", "erin");
    rig.contact("erin", &["--email", "erin@example.org"]);
    assert_eq!(wf("acct:erin@example.org").0, 404);
    rig.contact("erin", &["--email", "erin@example.org", "--discoverable"]);
    let (status, _, body) = wf("acct:erin@example.org");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&erin), "{body}");
}

#[test]
fn webfinger_and_the_capsule_answer_one_client_at_a_bounded_rate() {
    // Hostile review 2, finding 8: 200 versus 404 is a membership oracle,
    // which a client could ask thousands of times a second.
    let port = free_port();
    let gemini_port = free_port();
    let rig = Rig::new(&format!(
        "[http]\npublic_listen = \"127.0.0.1:{port}\"\nlookups_per_minute = 5\n\
         [gemini]\nlisten = \"127.0.0.1:{gemini_port}\"\nrequests_per_minute = 5\n"
    ));
    let wf = |n: u32| curl(&format!("http://127.0.0.1:{port}/.well-known/webfinger?resource=acct:p{n}@example.org"));
    let statuses: Vec<u16> = (0..8).map(wf).map(|(s, _, _)| s).collect();
    assert_eq!(statuses, [404, 404, 404, 404, 404, 429, 429, 429], "{statuses:?}");
    let (_, head, _) = wf(9);
    assert!(head.to_ascii_lowercase().contains("retry-after: 60"), "{head}");
    // Another address is served meanwhile.
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--interface", "127.0.0.2", "--max-time", "10"])
        .arg(format!("http://127.0.0.1:{port}/.well-known/webfinger?resource=acct:p1@example.org"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
    let answers: Vec<String> = (0..6)
        .map(|n| {
            gemini(gemini_port, "localhost", format!("gemini://localhost/.well-known/latssiam/p{n}.pem\r\n").as_bytes())
        })
        .collect();
    assert!(answers[..5].iter().all(|a| a.starts_with("51 ")), "{answers:?}");
    assert!(answers[5].starts_with("44 60"), "{answers:?}");
    drop(rig);
}

#[test]
fn relayed_mail_names_the_senders_latssiam_url() {
    let rig = Rig::new("");
    let alice = rig.person("alice");
    rig.contact("alice", &["--email", "alice@example.org", "--allow-send"]);
    // No Date: or Message-ID: from her client, and a LATSSIAM-URL: of her own making.
    let m = b"From: alice@example.org\r\nTo: x@remote.example\r\nSubject: hi\r\nLATSSIAM-URL: latssiam:forged\r\n\r\nhi\r\n";
    assert_eq!(rig.send_to_gateway("alice", m), latssiam::wire::Code::MessageAccepted);
    let data = rig.wait_relayed(1)[0]["data"].as_str().unwrap().to_owned();
    let url = format!("LATSSIAM-URL: latssiam:{alice}//localhost/.well-known/latssiam/alice.pem\r\n");
    assert!(data.contains(&url), "{data}");
    assert_eq!(data.matches("LATSSIAM-URL:").count(), 1, "{data}");
    assert!(data.contains("\r\nDate: ") && data.contains("\r\nMessage-ID: <latssiam."), "{data}");
}

/// A Gemini request sent with `openssl s_client` (an independent TLS peer)
/// to the capsule on 127.0.0.1:`port` as `host`; what came back.
fn gemini(port: u16, host: &str, request: &[u8]) -> String {
    use std::io::Write as _;
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-servername", host, "-quiet"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl is installed");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(request).unwrap();
    // Kept open: the capsule, not the end of our input, must end the exchange.
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A rig whose capsule listens on a free port; returns it and the port.
fn rig_with_capsule(extra: &str) -> (Rig, u16) {
    let port = free_port();
    let rig = Rig::new(&format!("[gemini]\nlisten = \"127.0.0.1:{port}\"\n{extra}"));
    (rig, port)
}

#[test]
fn the_capsule_serves_what_latssiam_urls_name() {
    let (rig, port) = rig_with_capsule("");
    rig.person("alice");
    let shown = common::ok(rig.path(), &["identity", "show", "alice"]);
    let url = shown.lines().find_map(|l| l.strip_prefix("url:")).unwrap().trim().to_owned();
    let (_, path) = url.split_once("//localhost").unwrap();
    let answer = gemini(port, "localhost", format!("gemini://localhost{path}\r\n").as_bytes());
    assert!(answer.starts_with("20 application/x-pem-file\r\n"), "{answer:?}");
    let cert = std::fs::read_to_string(rig.path().join("alice/cert.pem")).unwrap();
    let served = answer.split_once("\r\n").unwrap().1;
    let der = |pem: &str| latssiam::identity::certificate_from_pem_or_der(pem.as_bytes()).unwrap().to_vec();
    assert_eq!(der(served), der(&cert), "exactly her certificate");
    // The gateway's own identity too.
    assert!(gemini(port, "localhost", b"gemini://localhost/.well-known/latssiam/gateway.pem\r\n").starts_with("20 "));
    // Unknown path, an over-long request, and after she deregisters.
    assert!(gemini(port, "localhost", b"gemini://localhost/.well-known/latssiam/nobody.pem\r\n").starts_with("51"));
    let long = format!("gemini://localhost/{}\r\n", "a".repeat(1025 - "gemini://localhost/".len()));
    assert_eq!(long.len(), 1027);
    assert!(gemini(port, "localhost", long.as_bytes()).starts_with("59"), "1025 octets before CRLF");
    common::ok(rig.path(), &["deregister", "--identity", "alice", "--server", &rig.home, "--pins", "pins"]);
    assert!(gemini(port, "localhost", format!("gemini://localhost{path}\r\n").as_bytes()).starts_with("51"));
}

#[test]
fn contacts_come_from_urls_qr_pictures_and_addresses() {
    let (first, capsule) = rig_with_capsule("");
    let alice = first.person("alice");
    first.contact("alice", &["--email", "alice@example.org"]);
    let connect = format!("127.0.0.1:{capsule}");
    let url = format!("latssiam:{alice}//localhost/.well-known/latssiam/alice.pem");

    // --url on a second gateway: fetched over Gemini, the fingerprint checked.
    let (second, _) = rig_with_capsule("");
    let added = second.cli(&["contacts", "add", "--url", &url, "--gemini-connect", &connect]);
    assert!(added.starts_with("added alice@localhost"), "{added}");
    let forged = format!("latssiam:{}//localhost/.well-known/latssiam/alice.pem", "0".repeat(64));
    let out = common::run(
        second.path(),
        &[
            "contacts",
            "add",
            "--url",
            &forged,
            "--gemini-connect",
            &connect,
            "--config",
            second.config.to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&"0".repeat(64)) && err.contains(&alice), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // A QR picture written by `identity show --qr --png` adds the same contact.
    common::ok(first.path(), &["identity", "show", "alice", "--qr", "--png", "card.png"]);
    let card = first.path().join("card.png");
    let (third, _) = rig_with_capsule("");
    let added = third.cli(&["contacts", "add", "--qr", card.to_str().unwrap(), "--gemini-connect", &connect]);
    assert!(added.starts_with("added alice@localhost"), "{added}");
    assert!(third.cli(&["contacts", "list"]).contains(&alice));

    // --address: WebFinger on the first gateway, then Gemini.
    let port = free_port();
    drop(first);
    // Here the home server serves the mail domain (home.host empty): Bob's
    // LATSSIAM address is his mail address, which WebFinger speaks for.
    let (first, capsule) =
        rig_with_capsule(&format!("[http]\npublic_listen = \"127.0.0.1:{port}\"\n[home]\nhost = \"\"\n"));
    let bob = common::identity(first.path(), "bob@example.org", "bob");
    let home = format!("127.0.0.1:{}", first.home_port);
    let out = common::ok(
        first.path(),
        &["register", "--identity", "bob", "--server", &home, "--password", "sesame", "--pins", "pins"],
    );
    assert!(out.starts_with("10 "), "{out}");
    let (fourth, _) = rig_with_capsule("");
    let gemini_first = format!("127.0.0.1:{capsule}");
    let added = fourth.cli(&[
        "contacts",
        "add",
        "--address",
        "bob@example.org",
        "--webfinger",
        &format!("http://127.0.0.1:{port}"),
        "--gemini-connect",
        &format!("127.0.0.1:{capsule}"),
        "--email",
        "bob@example.org",
    ]);
    assert!(added.starts_with("added bob@example.org"), "{added}");
    assert!(fourth.cli(&["contacts", "list"]).contains(&bob));
    // The first gateway's own contacts at another host are not its to vouch
    // for: WebFinger names dave (he opted in), the capsule does not serve him.
    common::identity(first.path(), "dave@localhost", "dave");
    first.contact("dave", &["--email", "dave@example.org", "--discoverable"]);
    let wf = format!("http://127.0.0.1:{port}");
    let args =
        ["contacts", "add", "--address", "dave@example.org", "--webfinger", &wf, "--gemini-connect", &gemini_first];
    let out = common::run(fourth.path(), &[&args[..], &["--config", fourth.config.to_str().unwrap()]].concat());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("dave@localhost"), "{err}");

    // send --to a LATSSIAM URL: the certificate from the capsule, the message to his mailbox.
    std::fs::write(
        first.path().join("m.eml"),
        "From: x@localhost\r\nTo: bob@example.org\r\nSubject: url\r\n\r\nhi\r\n",
    )
    .unwrap();
    let bob_url = format!("latssiam:{bob}//example.org/.well-known/latssiam/bob.pem");
    common::identity(first.path(), "carol@localhost", "carol");
    let gemini = format!("127.0.0.1:{capsule}");
    let args = ["send", "--identity", "carol", "--server", &home, "--to", &bob_url, "--gemini-connect", &gemini];
    let sent = common::ok(first.path(), &[&args[..], &["--pins", "pins", "m.eml"]].concat());
    assert!(sent.starts_with("31 "), "{sent}");
    let args = ["fetch", "--identity", "bob", "--server", &home, "--deadline", "10", "--out-dir", "bob-inbox"];
    let fetched = common::ok(first.path(), &[&args[..], &["--pins", "pins"]].concat());
    assert_eq!(common::eml_files(&first.path().join("bob-inbox")).len(), 1, "{fetched}");
}

#[test]
fn the_public_listeners_hold_one_address_to_its_share_and_drop_slow_clients() {
    use std::io::{Read as _, Write as _};
    let (rig, base) = rig_with_webfinger("");
    let port: u16 = base.rsplit(':').next().unwrap().parse().unwrap();
    // 16 connections from one address are held; the 17th and later are closed at once.
    let held: Vec<std::net::TcpStream> =
        (0..16).map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut extra = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    extra.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(extra.read(&mut buf).unwrap_or(0), 0, "closed without an answer");
    // Another address is still served meanwhile.
    let (status, _, _) = curl(&format!("http://127.0.0.1:{port}/.well-known/webfinger"));
    assert_eq!(status, 0, "curl from 127.0.0.1 is over the limit too");
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--interface", "127.0.0.2", "--max-time", "10"])
        .arg(format!("http://127.0.0.1:{port}/.well-known/webfinger"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "400");
    // A client that sends its request head a byte at a time is dropped by the head timeout (10 s).
    drop(held);
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let started = std::time::Instant::now();
    let mut dropped = false;
    slow.write_all(b"GET /.well-known/webfinger?resource=acct:x@example.org HTTP/1.1\r\nX-Slow: ").unwrap();
    for _ in 0..60 {
        // One more octet of a header value that never ends.
        if slow.write_all(b"a").is_err() {
            dropped = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(400));
    }
    assert!(dropped, "still connected after {:?}", started.elapsed());
    assert!(started.elapsed() < std::time::Duration::from_secs(16), "held {:?}", started.elapsed());
    drop(rig);
}
