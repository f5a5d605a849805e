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
    // Anyone else, and a request without a resource.
    assert_eq!(wf("acct:nobody@example.org").0, 404);
    assert_eq!(curl(&format!("{base}/.well-known/webfinger")).0, 400);
    assert_eq!(curl(&format!("{base}/metrics")).0, 404, "metrics stay on http.listen");
    // A deregistered mailbox is no longer described.
    common::ok(rig.path(), &["deregister", "--identity", "bob", "--server", &rig.home, "--pins", "pins"]);
    assert_eq!(wf("acct:bob@localhost").0, 404);
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
