//! `latssiam-bridge sendmail` as mail programs call it: `-t` with a large
//! message through the person's gateway to a real SMTP sink, `git
//! send-email --sendmail-cmd` with a 3-patch series, a LATSSIAM recipient
//! reached directly, and sendmail's exit codes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::mail::{real_mail, relayable};
use common::rig::Rig;
use common::BIN;

fn rig() -> Rig {
    common::rig::sendmail_rig()
}

fn sendmail(dir: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(BIN)
        .arg("sendmail")
        .args(args)
        .current_dir(dir)
        .env("LATSSIAM_SENDMAIL_CONFIG", dir.join("sendmail.toml"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn sendmail_t_sends_the_nine_megabyte_mail_through_the_gateway_whole() {
    let rig = rig();
    // The large-mail tests' 9 MB message (HTML alternative, three attachments),
    // with LF line ends as a mail program hands it over, and a Bcc.
    let mail = relayable(&real_mail("Alice <alice@example.org>", "Victor <victor@remote.example>", 9_000_000));
    let mail = String::from_utf8(mail).unwrap().replacen("\r\n", "\r\nBcc: hidden@remote.example\r\n", 1);
    let lf = mail.replace("\r\n", "\n");
    let out = sendmail(rig.path(), &["-t", "-oi", "-oem"], lf.as_bytes());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let relayed = rig.wait_relayed(2);
    let mut rcpts: Vec<String> = relayed.iter().map(|r| r["rcpt_tos"][0].as_str().unwrap().to_owned()).collect();
    rcpts.sort();
    assert_eq!(rcpts, ["hidden@remote.example", "victor@remote.example"]);
    let expected = mail.replace("Bcc: hidden@remote.example\r\n", "");
    for r in &relayed {
        let data = r["data"].as_str().unwrap();
        assert!(data.ends_with(&expected), "{} octets relayed, {} sent", data.len(), expected.len());
        assert!(!data.contains("hidden@"), "the Bcc field is not sent");
    }
}

#[test]
fn mutt_sends_through_the_gateway() {
    if Command::new("mutt").arg("-v").output().is_err() {
        println!("SKIPPED mutt_sends_through_the_gateway: mutt is not installed (.ci/run installs it)");
        return;
    }
    let rig = rig();
    let muttrc = rig.path().join("muttrc");
    let settings = rig.path().join("sendmail.toml");
    std::fs::write(
        &muttrc,
        format!(
            "set sendmail=\"{BIN} sendmail --config {}\"\nset from=\"Alice <alice@example.org>\"\nset use_from=yes\n\
             set copy=no\nset record=\"\"\nset tmpdir=\"{}\"\nset charset=\"utf-8\"\nset send_charset=\"utf-8\"\n",
            settings.display(),
            rig.path().display()
        ),
    )
    .unwrap();
    let mut child = Command::new("mutt")
        .args(["-n", "-F", muttrc.to_str().unwrap(), "-s", "sent by mutt", "--", "victor@remote.example"])
        .env("HOME", rig.path())
        .env("MAIL", rig.path().join("mbox"))
        .current_dir(rig.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all("Grüße from mutt\n.leading dot\n".as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "mutt: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let relayed = rig.wait_relayed(1);
    let data = relayed[0]["data"].as_str().unwrap();
    assert_eq!(relayed[0]["rcpt_tos"][0], "victor@remote.example");
    assert!(data.contains("Subject: sent by mutt") && data.contains("From: Alice <alice@example.org>"), "{data}");
    assert!(data.ends_with("\r\n\r\nGrüße from mutt\r\n.leading dot\r\n"), "{data}");
}

#[test]
fn git_send_email_of_three_patches_arrives_as_three_mails() {
    let rig = rig();
    let repo = rig.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    let git = |args: &[&str]| {
        let out = Command::new("git").args(args).current_dir(&repo).output().unwrap();
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    git(&["init", "-q"]);
    git(&["config", "user.email", "alice@example.org"]);
    git(&["config", "user.name", "Alice"]);
    for i in 1..=3 {
        std::fs::write(repo.join(format!("f{i}")), format!("change {i}\n")).unwrap();
        git(&["add", "."]);
        git(&["commit", "-qm", &format!("change number {i}")]);
    }
    git(&["format-patch", "-q", "--root", "-o", "out"]);
    let cmd = format!("{BIN} sendmail --config {}", rig.path().join("sendmail.toml").display());
    let mut args = vec![
        "send-email".to_owned(),
        format!("--sendmail-cmd={cmd}"),
        "--to=victor@remote.example".into(),
        "--from=Alice <alice@example.org>".into(),
        "--suppress-cc=all".into(),
        "--confirm=never".into(),
    ];
    let mut patches: Vec<String> =
        std::fs::read_dir(repo.join("out")).unwrap().map(|e| e.unwrap().path().display().to_string()).collect();
    patches.sort();
    assert_eq!(patches.len(), 3);
    args.extend(patches);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    git(&args);
    let relayed = rig.wait_relayed(3);
    assert_eq!(relayed.len(), 3);
    let mut subjects: Vec<String> = relayed
        .iter()
        .map(|r| {
            assert_eq!(r["rcpt_tos"][0], "victor@remote.example");
            let data = r["data"].as_str().unwrap();
            data.lines().find(|l| l.starts_with("Subject: ")).unwrap().to_owned()
        })
        .collect();
    subjects.sort();
    assert_eq!(
        subjects,
        [
            "Subject: [PATCH 1/3] change number 1",
            "Subject: [PATCH 2/3] change number 2",
            "Subject: [PATCH 3/3] change number 3"
        ]
    );
}

#[test]
fn a_latssiam_recipient_is_reached_directly_signed_by_the_sender() {
    let rig = rig();
    let mail = b"From: alice@localhost\nTo: bob@localhost\nSubject: direct\n\nstraight to you\n.\nnot read: the dot ended it\n";
    let out = sendmail(rig.path(), &["bob@localhost"], mail);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (files, printed) = rig.fetch("bob", 10);
    assert_eq!(files.len(), 1, "{printed}");
    assert!(printed.contains("signed by alice@localhost"), "{printed}");
    let got = std::fs::read_to_string(&files[0]).unwrap();
    assert_eq!(got, "From: alice@localhost\r\nTo: bob@localhost\r\nSubject: direct\r\n\r\nstraight to you\r\n");
    std::thread::sleep(Duration::from_millis(300));
    assert!(rig.relayed().is_empty(), "nothing went through the gateway");
}

#[test]
fn exit_codes_are_sendmails() {
    let rig = rig();
    let code = |o: &Output| o.status.code();
    // No recipients: EX_USAGE.
    let out = sendmail(rig.path(), &[], b"Subject: x\n\nx\n");
    assert_eq!(code(&out), Some(64), "{}", String::from_utf8_lossy(&out.stderr));
    // Not an address: EX_NOUSER.
    assert_eq!(code(&sendmail(rig.path(), &["nobody"], b"Subject: x\n\nx\n")), Some(67));
    // An empty message: EX_DATAERR.
    assert_eq!(code(&sendmail(rig.path(), &["bob@localhost"], b"")), Some(65));
    // More than a joined message may hold: EX_DATAERR, with the rest of the
    // input left unread (it stops reading at the limit, it does not buffer it).
    let mut child = Command::new(BIN)
        .args(["sendmail", "bob@localhost"])
        .current_dir(rig.path())
        .env("LATSSIAM_SENDMAIL_CONFIG", rig.path().join("sendmail.toml"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let line = [b'x'; 999];
        let mut sent = 0usize;
        while sent < 3 * latssiam::fragment::MAX_JOINED
            && stdin.write_all(&line).and_then(|()| stdin.write_all(b"\n")).is_ok()
        {
            sent += 1000;
        }
        sent
    });
    let out = child.wait_with_output().unwrap();
    let sent = writer.join().unwrap();
    assert_eq!(code(&out), Some(65), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("larger than"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(sent < 3 * latssiam::fragment::MAX_JOINED, "it read all {sent} octets");
    // No settings: EX_CONFIG, one line.
    let out = Command::new(BIN)
        .args(["sendmail", "--config", "/nonexistent/sendmail.toml", "bob@localhost"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
    // The server is down: EX_TEMPFAIL, so the mail program keeps the message.
    std::fs::write(
        rig.path().join("sendmail.toml"),
        "identity = \"alice\"\npins = \"pins\"\n[recipients]\n\"bob@localhost\" = \"bob/cert.pem\"\n[routes]\nlocalhost = \"127.0.0.1:1\"\n",
    )
    .unwrap();
    assert_eq!(code(&sendmail(rig.path(), &["bob@localhost"], b"Subject: x\n\nx\n")), Some(75));
}
