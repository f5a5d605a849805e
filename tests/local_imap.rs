//! `latssiam-bridge local` with real IMAP clients: mbsync (isync) syncing
//! 200 received messages, large ones among them, byte for byte, and
//! nothing again after a restart; IDLE announcing a new message; APPEND,
//! MOVE, flags, EXPUNGE and `UID SEARCH NOT DELETED` with Python's
//! imaplib; curl's IMAP over STARTTLS; and the attacks on the listener
//! (wrong passwords slowed and cut off, a flood before login, a password in
//! the clear on a listener that is not loopback).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::mail::real_mail;
use common::rig::Rig;
use common::{free_port, ok, wait_for, BIN};

/// bob's bridge: `local --init` done; returns (password, certificate).
fn init(rig: &Rig) -> (String, PathBuf) {
    init_for(rig, "bob")
}

/// `local --init` for `who`; returns (password, certificate).
fn init_for(rig: &Rig, who: &str) -> (String, PathBuf) {
    let out = ok(rig.path(), &["local", "--identity", who, "--init"]);
    let password = out.lines().find_map(|l| l.strip_prefix("password:")).unwrap().trim().to_owned();
    assert!(out.contains("SHA-256 "), "{out}");
    (password, rig.path().join(format!("{who}/local/tls/cert.pem")))
}

/// alice's `local` with her sendmail settings, submission on `submission`
/// (an ADDR:PORT); waits until it listens on `connect`.
fn start_submission(rig: &Rig, submission: &str, connect: &str) -> Killed {
    start_submission_with(rig, submission, connect, &[])
}

/// As [`start_submission`], with more arguments for `local`.
fn start_submission_with(rig: &Rig, submission: &str, connect: &str, more: &[&str]) -> Killed {
    let imap = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(rig.path().join("local.log")).unwrap();
    let local = Killed(
        Command::new(BIN)
            .args(["local", "--identity", "alice", "--sendmail-config", "sendmail.toml"])
            .args(["--imap", &imap, "--submission", submission])
            .args(more)
            .current_dir(rig.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait_for(Duration::from_secs(20), || TcpStream::connect(connect).ok()).expect("submission listens");
    local
}

/// `local` for bob, taking mail from the rig's home server, IMAP on `port`.
fn start_local(rig: &Rig, imap: &str) -> std::process::Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(rig.path().join("local.log")).unwrap();
    let child = Command::new(BIN)
        .args(["local", "--identity", "bob", "--pins", "pins", "--server", &rig.home, "--imap", imap])
        .current_dir(rig.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let addr = imap.to_owned();
    wait_for(Duration::from_secs(20), || TcpStream::connect(&addr).ok()).expect("local listens");
    child
}

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn stop(mut k: Killed) {
    Command::new("kill").args(["-TERM", &k.0.id().to_string()]).status().unwrap();
    let _ = k.0.wait();
}

/// bob's bridge, running: `local --init` done, IMAP on a free loopback port,
/// taking bob's mail from the rig's home server (alice too, to send it).
struct Bridge {
    rig: Rig,
    password: String,
    cert: PathBuf,
    port: u16,
    imap: String,
    local: Killed,
}

fn bridge(with_alice: bool) -> Bridge {
    let rig = Rig::new("");
    if with_alice {
        rig.person("alice");
    }
    rig.person("bob");
    let (password, cert) = init(&rig);
    let port = free_port();
    let imap = format!("127.0.0.1:{port}");
    let local = Killed(start_local(&rig, &imap));
    Bridge { rig, password, cert, port, imap, local }
}

fn python(script: &str, args: &[&str]) -> String {
    let out = Command::new("python3").arg("-c").arg(script).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "python failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A small message numbered `i`.
fn small(i: usize) -> Vec<u8> {
    format!(
        "From: Alice <alice@localhost>\r\nTo: bob@localhost\r\nSubject: note {i}\r\nMessage-ID: <n{i}@localhost>\r\n\
Date: Sun, 06 Dec 2026 10:00:00 +0000\r\n\r\nThis is note {i}.\r\n"
    )
    .into_bytes()
}

/// Sends `messages` from alice to bob through the home server.
fn send_all(rig: &Rig, messages: &[Vec<u8>]) {
    for (i, m) in messages.iter().enumerate() {
        let file = format!("out-{i}.eml");
        std::fs::write(rig.path().join(&file), m).unwrap();
        let out = rig.send_file("alice", "bob/cert.pem", &file, &["--sign"]);
        assert!(out.contains("30 ") || out.contains("31 ") || out.starts_with("3"), "{out}");
    }
}

fn mbsync_config(rig: &Rig, port: u16, password: &str, cert: &Path, maildir: &Path) -> PathBuf {
    let config = format!(
        "IMAPAccount bob\nHost 127.0.0.1\nPort {port}\nUser bob@localhost\nPass {password}\nSSLType STARTTLS\n\
CertificateFile {cert}\n\nIMAPStore far\nAccount bob\n\nMaildirStore near\nPath {dir}/\nInbox {dir}/INBOX\n\n\
Channel bob\nFar :far:\nNear :near:\nPatterns INBOX\nCreate Near\nSyncState *\n",
        cert = cert.display(),
        dir = maildir.display()
    );
    let path = rig.path().join("mbsyncrc");
    std::fs::write(&path, config).unwrap();
    path
}

/// Runs mbsync; returns what it printed (with -V, what it did).
fn mbsync(config: &Path) -> String {
    let out = Command::new("mbsync").args(["-V", "-c", config.to_str().unwrap(), "-a"]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let tail: Vec<&str> = text.lines().rev().take(60).collect();
    assert!(out.status.success(), "mbsync failed:\n{tail:#?}");
    text
}

/// The messages of a Maildir folder's cur/ and new/, sorted.
fn maildir_messages(dir: &Path) -> Vec<Vec<u8>> {
    let mut all = Vec::new();
    for sub in ["cur", "new"] {
        if let Ok(rd) = std::fs::read_dir(dir.join(sub)) {
            for e in rd {
                all.push(std::fs::read(e.unwrap().path()).unwrap());
            }
        }
    }
    all.sort();
    all
}

fn crlf_to_lf(m: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(m.len());
    for (i, &b) in m.iter().enumerate() {
        if !(b == b'\r' && m.get(i + 1) == Some(&b'\n')) {
            out.push(b);
        }
    }
    out
}

/// A message without the `X-TUID:` line mbsync adds to its copies.
fn without_tuid(m: &[u8]) -> Vec<u8> {
    let Some(start) = m.windows(8).position(|w| w == b"X-TUID: ") else { return m.to_vec() };
    let end = m[start..].iter().position(|&b| b == b'\n').map_or(m.len(), |i| start + i + 1);
    [&m[..start], &m[end..]].concat()
}

fn have(cmd: &str, arg: &str) -> bool {
    Command::new(cmd).arg(arg).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

#[test]
fn mbsync_syncs_two_hundred_messages_byte_for_byte_and_nothing_again_after_a_restart() {
    if !have("mbsync", "--version") {
        println!("SKIPPED mbsync test: mbsync (isync) is not installed (.ci/run installs it)");
        return;
    }
    let Bridge { rig, password, cert, port, imap, local } = bridge(true);
    // 198 small messages and two 9 MB ones (sent as PROFILE section 8 fragments).
    let mut sent: Vec<Vec<u8>> = (0..198).map(small).collect();
    sent.insert(50, real_mail("Alice <alice@localhost>", "bob@localhost", 9_000_000));
    sent.insert(150, real_mail("Alice <alice@localhost>", "Bob <bob@localhost>", 9_000_001));
    send_all(&rig, &sent);
    let inbox = rig.path().join("bob/local/Maildir");
    let stored = wait_for(Duration::from_secs(120), || {
        let n = maildir_messages(&inbox).len();
        (n == sent.len()).then_some(n)
    });
    assert_eq!(stored, Some(200), "local stored every message; log:\n{}", rig.log());

    let near = rig.path().join("near");
    std::fs::create_dir_all(&near).unwrap();
    let config = mbsync_config(&rig, port, &password, &cert, &near);
    let first = mbsync(&config);
    // The bridge's own Maildir holds exactly what was sent.
    let mut expected = sent.clone();
    expected.sort();
    assert!(maildir_messages(&inbox) == expected, "the bridge stored the octets that were sent");
    // mbsync writes its Maildir with the local line end (LF): the copies
    // are what was sent, line ends aside.
    let mut expected: Vec<Vec<u8>> = sent.iter().map(|m| crlf_to_lf(m)).collect();
    expected.sort();
    let synced = maildir_messages(&near.join("INBOX"));
    assert_eq!(synced.len(), 200, "{first}");
    // mbsync marks each copy with its own X-TUID header line; the rest is ours.
    let mut synced: Vec<Vec<u8>> = synced.iter().map(|m| without_tuid(m)).collect();
    synced.sort();
    if let Some((a, b)) = synced.iter().zip(&expected).find(|(a, b)| a != b) {
        let at = a.iter().zip(b.iter()).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()));
        panic!(
            "a copy differs from what was sent at octet {at} ({} against {} octets): {:?} / {:?}",
            a.len(),
            b.len(),
            String::from_utf8_lossy(&a[at.saturating_sub(40)..(at + 40).min(a.len())]),
            String::from_utf8_lossy(&b[at.saturating_sub(40)..(at + 40).min(b.len())])
        );
    }

    // A restart changes nothing a client sees: the second sync moves nothing.
    stop(local);
    let _local = Killed(start_local(&rig, &imap));
    let names = |dir: &Path| {
        let mut v: Vec<_> = ["cur", "new"]
            .iter()
            .flat_map(|s| std::fs::read_dir(dir.join(s)).unwrap().map(|e| e.unwrap().file_name()))
            .collect();
        v.sort();
        v
    };
    let before = names(&near.join("INBOX"));
    let second = mbsync(&config);
    println!("second sync:\n{second}");
    assert!(!second.contains("UIDVALIDITY of far side"), "UIDVALIDITY did not change:\n{second}");
    assert_eq!(names(&near.join("INBOX")), before, "the second sync transferred nothing:\n{second}");
}

const IMAPLIB: &str = r#"
import imaplib, ssl, sys, re
port, password, cafile = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=cafile)
M = imaplib.IMAP4('127.0.0.1', port)
M.starttls(ssl_context=ctx)
assert M.login('bob@localhost', password)[0] == 'OK'
caps = M.capability()[1][0].decode().split()
for c in ('IDLE', 'MOVE', 'UIDPLUS', 'UNSELECT', 'SPECIAL-USE', 'LITERAL+', 'ENABLE', 'NAMESPACE', 'ID'):
    assert c in caps, (c, caps)
typ, lst = M.list()
names = b' '.join(lst)
for special in (b'\\Sent', b'\\Drafts', b'\\Trash', b'\\Archive'):
    assert special in names, names
msg = b"From: Bob <bob@localhost>\r\nTo: alice@localhost\r\nSubject: filed by the client\r\n\r\nmy own copy\r\n"
typ, data = M.append('Sent', '(\\Seen)', None, msg)
assert typ == 'OK' and b'APPENDUID' in data[0], data
validity = int(re.search(rb'APPENDUID (\d+) (\d+)', data[0]).group(1))
M.select('Sent')
typ, data = M.fetch('1', '(FLAGS BODY.PEEK[])')
assert data[0][1] == msg and b'\\Seen' in data[0][0], data
for i in range(3):
    M.append('INBOX', None, None, b"Subject: m%d\r\n\r\nbody %d\r\n" % (i, i))
M.select('INBOX')
typ, data = M.uid('SEARCH', 'NOT DELETED')
uids = data[0].split()
assert len(uids) >= 3, data
M.uid('STORE', uids[0], '+FLAGS', '(\\Deleted \\Flagged)')
typ, data = M.uid('SEARCH', 'NOT DELETED')
assert uids[0] not in data[0].split() and len(data[0].split()) == len(uids) - 1, data
typ, data = M.uid('SEARCH', 'DELETED FLAGGED')
assert data[0].split() == [uids[0]], data
typ, data = M.uid('MOVE', uids[1], 'Trash')
assert typ == 'OK', data
assert M.untagged_responses.get('COPYUID'), M.untagged_responses
typ, data = M.expunge()
assert typ == 'OK' and data[0] is not None, data
typ, data = M.uid('SEARCH', 'ALL')
left = data[0].split()
assert uids[0] not in left and uids[1] not in left and uids[2] in left, (uids, left)
M.select('Trash')
typ, data = M.fetch('1:*', '(UID FLAGS)')
assert len([d for d in data if d]) == 1, data
M.select('INBOX')
M.uid('STORE', uids[2], '+FLAGS', '(\\Answered $Label1)')
typ, data = M.uid('FETCH', uids[2], '(FLAGS)')
assert b'\\Answered' in data[0] and b'$Label1' in data[0], data
typ, data = M.search(None, 'TEXT', '"body 2"')
assert len(data[0].split()) == 1, data
typ, data = M.status('Sent', '(MESSAGES UIDVALIDITY)')
assert (b'UIDVALIDITY %d' % validity) in data[0] and b'MESSAGES 1' in data[0], data
# BODYSTRUCTURE, parts, a partial fetch and a part's MIME header, cut from the stored octets.
mp = (b"Subject: mp\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
      b"part one\r\n--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\nAAEC\r\n--b--\r\n")
M.append('Archive', None, None, mp)
M.select('Archive')
typ, data = M.fetch('1', '(BODYSTRUCTURE BODY.PEEK[1] BODY.PEEK[2]<1.2> BODY.PEEK[2.MIME])')
flat = b''.join(x if isinstance(x, bytes) else b''.join(x) for x in data)
assert b'("TEXT" "plain"' in flat and b'"application" "octet-stream"' in flat and b'"mixed"' in flat, flat
assert b'part one' in flat and b'BODY[2]<1> {2}' in flat and b'AE' in flat, flat
assert b'Content-Transfer-Encoding: base64' in flat, flat
# Several expunged at once: each EXPUNGE names the number after the ones before it went.
M.create('Many')
for i in range(5):
    M.append('Many', None, None, b"Subject: %d\r\n\r\nx\r\n" % i)
M.select('Many')
M.store('2,4', '+FLAGS', '(\\Deleted)')
typ, data = M.expunge()
assert data == [b'2', b'3'], data
typ, data = M.fetch('1:*', '(BODY.PEEK[HEADER.FIELDS (SUBJECT)])')
subjects = [d[1].strip() for d in data if isinstance(d, tuple)]
assert subjects == [b'Subject: 0', b'Subject: 2', b'Subject: 4'], subjects
# A folder deleted and made again by another client is not the one selected:
# the next command gets BYE (RFC 3501 7.1.5), not the new folder's UIDs.
M.create('Gone')
M.select('Gone')
N = imaplib.IMAP4('127.0.0.1', port)
N.starttls(ssl_context=ctx)
N.login('bob@localhost', password)
assert N.delete('Gone')[0] == 'OK' and N.create('Gone')[0] == 'OK'
N.logout()
try:
    M.noop()
    raise SystemExit('no BYE after the selected folder was deleted')
except imaplib.IMAP4.abort:
    pass
print('ok', uids[2].decode())
"#;

const FLAGS_AFTER: &str = r#"
import imaplib, ssl, sys
port, password, cafile, uid = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
M = imaplib.IMAP4('127.0.0.1', port)
M.starttls(ssl_context=ssl.create_default_context(cafile=cafile))
M.login('bob@localhost', password)
M.select('INBOX')
typ, data = M.uid('FETCH', uid, '(FLAGS)')
print(data[0].decode())
"#;

#[test]
fn imaplib_append_move_flags_expunge_and_search_behave_as_the_rfcs_say_and_persist() {
    let Bridge { rig, password, cert, port, imap, local } = bridge(false);
    let out = python(IMAPLIB, &[&port.to_string(), &password, cert.to_str().unwrap()]);
    let uid = out.trim().strip_prefix("ok ").expect("the script finished").to_owned();
    stop(local);
    let _local = Killed(start_local(&rig, &imap));
    let flags = python(FLAGS_AFTER, &[&port.to_string(), &password, cert.to_str().unwrap(), &uid]);
    assert!(flags.contains("\\Answered") && flags.contains("$Label1"), "flags persist over a restart: {flags}");
}

/// Reads one line from the raw connection.
fn line(r: &mut BufReader<TcpStream>) -> String {
    let mut s = String::new();
    r.read_line(&mut s).unwrap();
    s
}

#[test]
fn a_message_arriving_during_idle_is_announced_at_once() {
    let Bridge { rig, password, imap, local: _local, .. } = bridge(true);
    let tcp = TcpStream::connect(&imap).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = tcp.try_clone().unwrap();
    let mut r = BufReader::new(tcp);
    assert!(line(&mut r).starts_with("* OK"));
    // Plain text is allowed on loopback.
    write!(w, "a LOGIN bob@localhost {password}\r\n").unwrap();
    while !line(&mut r).starts_with("a OK") {}
    write!(w, "b SELECT INBOX\r\n").unwrap();
    while !line(&mut r).starts_with("b OK") {}
    write!(w, "c IDLE\r\n").unwrap();
    assert!(line(&mut r).starts_with("+"));
    send_all(&rig, &[small(1)]);
    let sent = Instant::now();
    let l = line(&mut r);
    let waited = sent.elapsed();
    assert_eq!(l, "* 1 EXISTS\r\n");
    println!("EXISTS {} ms after the sender's SEND was answered", waited.as_millis());
    write!(w, "DONE\r\n").unwrap();
    assert!(line(&mut r).starts_with("c OK"));
}

#[test]
fn curl_reads_a_message_over_starttls() {
    if !have("curl", "--version") {
        println!("SKIPPED curl test: curl is not installed");
        return;
    }
    let Bridge { rig, password, cert, port, local: _local, .. } = bridge(true);
    send_all(&rig, &[small(7)]);
    let inbox = rig.path().join("bob/local/Maildir");
    wait_for(Duration::from_secs(30), || (maildir_messages(&inbox).len() == 1).then_some(())).expect("stored");
    let out = Command::new("curl")
        .args(["-sS", "--ssl-reqd", "--cacert", cert.to_str().unwrap(), "--user", &format!("bob@localhost:{password}")])
        .arg(format!("imap://localhost:{port}/INBOX;UID=1"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, small(7));
}

/// Connects, reads the greeting, and sends `command`; returns the reply line and how long it took.
fn one_command(addr: &str, command: &str) -> (String, Duration) {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut w = tcp.try_clone().unwrap();
    let mut r = BufReader::new(tcp);
    line(&mut r);
    let start = Instant::now();
    w.write_all(command.as_bytes()).unwrap();
    (line(&mut r), start.elapsed())
}

#[test]
fn wrong_passwords_are_refused_and_slowed_and_the_connection_is_cut_after_three() {
    let Bridge { rig: _rig, password, imap, local: _local, .. } = bridge(false);
    let tcp = TcpStream::connect(&imap).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut w = tcp.try_clone().unwrap();
    let mut r = BufReader::new(tcp);
    line(&mut r);
    let start = Instant::now();
    for i in 0..3 {
        write!(w, "t{i} LOGIN bob@localhost wrong{i}\r\n").unwrap();
        let l = line(&mut r);
        assert!(l.starts_with(&format!("t{i} NO")), "{l}");
    }
    // 1 + 2 + 4 seconds of delay: asserted as a floor, not a speed.
    assert!(start.elapsed() >= Duration::from_secs(7), "failures are slowed: {:?}", start.elapsed());
    let bye = line(&mut r);
    assert!(bye.starts_with("* BYE"), "{bye}");
    let mut rest = String::new();
    let _ = r.read_to_string(&mut rest);
    // The right password still works on a new connection.
    let (l, _) = one_command(&imap, &format!("x LOGIN bob@localhost {password}\r\n"));
    assert!(l.starts_with("x OK"), "{l}");
}

#[test]
fn a_flood_before_login_is_cut_off_and_no_password_goes_in_the_clear_off_loopback() {
    let Bridge { rig, imap, local: _local, .. } = bridge(false);
    // 1 MB of a literal announced before login: cut off at 64 KiB.
    let tcp = TcpStream::connect(&imap).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = tcp.try_clone().unwrap();
    let mut r = BufReader::new(tcp);
    line(&mut r);
    w.write_all(b"a LOGIN {1000000+}\r\n").unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    let mut written = 0;
    for _ in 0..16 {
        if w.write_all(&chunk).is_err() {
            break;
        }
        written += chunk.len();
    }
    let mut rest = String::new();
    let _ = r.read_to_string(&mut rest);
    assert!(rest.contains("BYE") || written < 1_000_000, "{rest}");
    // Garbage gets BAD, tagged where a tag can be found, and no panic.
    let (l, _) = one_command(&imap, "z1 FETCH (((((\r\n");
    assert!(l.starts_with("z1 BAD"), "{l}");
    // A listener on a non-loopback address offers no plain login.
    let out = ok(rig.path(), &["local", "--identity", "bob", "--data", "open", "--init"]);
    let password = out.lines().find_map(|l| l.strip_prefix("password:")).unwrap().trim().to_owned();
    let open = free_port();
    let log = std::fs::File::create(rig.path().join("open.log")).unwrap();
    let _open = Killed(
        Command::new(BIN)
            .args(["local", "--identity", "bob", "--data", "open", "--imap", &format!("0.0.0.0:{open}")])
            .current_dir(rig.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let addr = format!("127.0.0.1:{open}");
    wait_for(Duration::from_secs(20), || TcpStream::connect(&addr).ok()).unwrap();
    let (caps, _) = one_command(&addr, "c CAPABILITY\r\n");
    assert!(caps.contains("LOGINDISABLED") && caps.contains("STARTTLS") && !caps.contains("AUTH=PLAIN"), "{caps}");
    let (l, _) = one_command(&addr, &format!("l LOGIN bob@localhost {password}\r\n"));
    assert!(l.starts_with("l NO"), "{l}");
}

const SUBMIT: &str = r#"
import smtplib, ssl, sys, time
port, password, cafile = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=cafile)
msg = (b"From: Alice <alice@example.org>\r\nTo: bob@localhost, Victor <victor@remote.example>\r\n"
       b"Subject: through the bridge\r\nMessage-ID: <sub1@example.org>\r\n\r\nsubmitted by a mail program\r\n")
s = smtplib.SMTP('127.0.0.1', port)
s.starttls(context=ctx)
s.ehlo()
assert 'auth' in s.esmtp_features and 'PLAIN' in s.esmtp_features['auth'], s.esmtp_features
try:
    s.sendmail('alice@example.org', ['bob@localhost'], msg)
    raise SystemExit('MAIL without AUTH was taken')
except smtplib.SMTPSenderRefused as e:
    assert e.smtp_code == 530, e
t = time.monotonic()
try:
    s.login('alice@localhost', 'wrong')
    raise SystemExit('a wrong password was taken')
except smtplib.SMTPAuthenticationError as e:
    assert e.smtp_code == 535, e
assert time.monotonic() - t >= 1.0, 'a wrong password is answered late'
s.login('alice@localhost', password)
refused = s.sendmail('alice@example.org', ['bob@localhost', 'victor@remote.example'], msg)
assert refused == {}, refused
s.quit()
# AUTH LOGIN works too.
s = smtplib.SMTP('127.0.0.1', port)
s.starttls(context=ctx)
s.ehlo()
code, _ = s.docmd('AUTH', 'LOGIN')
assert code == 334
import base64
code, _ = s.docmd(base64.b64encode(b'alice@localhost').decode())
code, _ = s.docmd(base64.b64encode(password.encode()).decode())
assert code == 235, code
s.quit()
print('ok')
"#;

#[test]
fn submission_with_auth_over_starttls_reaches_a_latssiam_person_and_through_the_gateway_an_smtp_sink() {
    let rig = common::rig::sendmail_rig();
    let (password, cert) = init_for(&rig, "alice");
    let submission = free_port();
    let addr = format!("127.0.0.1:{submission}");
    let _local = start_submission(&rig, &addr, &addr);
    let out = python(SUBMIT, &[&submission.to_string(), &password, cert.to_str().unwrap()]);
    assert_eq!(out.trim(), "ok");
    // Bob has it, sealed and signed by Alice; Victor's copy went out through the gateway.
    let (files, printed) = rig.fetch("bob", 5);
    assert_eq!(files.len(), 1, "{printed}");
    assert!(std::fs::read_to_string(&files[0]).unwrap().contains("submitted by a mail program"));
    assert!(printed.contains("signed by alice@localhost"), "{printed}");
    // (The gateway relays by the header fields, so it also sends bob@localhost
    // a copy by SMTP, as it does for the sendmail command.)
    let to_victor = wait_for(Duration::from_secs(30), || {
        rig.relayed()
            .into_iter()
            .find(|r| r["rcpt_tos"].as_array().is_some_and(|t| t.iter().any(|x| x == "victor@remote.example")))
    })
    .expect("the gateway relayed Victor's copy");
    assert!(to_victor["data"].as_str().unwrap().contains("submitted by a mail program"));
}

/// Submits one message over implicit TLS; prints the certificate's SHA-256.
const SUBMIT_IMPLICIT_TLS: &str = r#"
import smtplib, ssl, sys, hashlib
port, password, cafile = int(sys.argv[1]), sys.argv[2], sys.argv[3]
s = smtplib.SMTP_SSL('localhost', port, context=ssl.create_default_context(cafile=cafile), timeout=30)
s.ehlo()
assert 'starttls' not in s.esmtp_features, s.esmtp_features
code, _ = s.docmd('STARTTLS')
assert code == 503, code
assert 'PLAIN' in s.esmtp_features.get('auth', ''), s.esmtp_features
s.login('alice@localhost', password)
msg = (b"From: Alice <alice@example.org>\r\nTo: bob@localhost\r\nSubject: over implicit TLS\r\n"
       b"Message-ID: <sub465@example.org>\r\n\r\nsubmitted on the submissions port\r\n")
assert s.sendmail('alice@example.org', ['bob@localhost'], msg) == {}
der = s.sock.getpeercert(binary_form=True)
s.quit()
print(':'.join('%02X' % b for b in hashlib.sha256(der).digest()))
"#;

#[test]
fn submission_with_implicit_tls_where_asked_takes_mail_after_the_handshake_and_nothing_in_the_clear() {
    let rig = common::rig::sendmail_rig();
    let (password, cert) = init_for(&rig, "alice");
    let submissions = free_port();
    let addr = format!("127.0.0.1:{submissions}");
    let plain = format!("127.0.0.1:{}", free_port());
    let _local = start_submission_with(&rig, &plain, &addr, &["--submissions", &addr]);
    // A client that never starts the handshake is cut off at the handshake deadline (30 s).
    let silent = TcpStream::connect(&addr).unwrap();
    let silent_since = Instant::now();
    // A client speaking plain SMTP is greeted by nothing: the port waits for a TLS handshake.
    let tcp = TcpStream::connect(&addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut first = [0u8; 3];
    let read = (&tcp).read(&mut first);
    assert!(!matches!(read, Ok(n) if n > 0), "the server spoke first, in the clear: {read:?} {first:?}");
    // smtplib over TLS: no STARTTLS offered, AUTH is, and the mail reaches bob.
    let fingerprint = python(SUBMIT_IMPLICIT_TLS, &[&submissions.to_string(), &password, cert.to_str().unwrap()]);
    let printed = ok(rig.path(), &["local", "--identity", "alice", "--init"]);
    assert!(printed.contains(fingerprint.trim()), "the printed certificate: {printed} / {fingerprint}");
    let (files, printed) = rig.fetch("bob", 5);
    assert_eq!(files.len(), 1, "{printed}");
    assert!(std::fs::read_to_string(&files[0]).unwrap().contains("submitted on the submissions port"));
    assert!(printed.contains("signed by alice@localhost"), "{printed}");
    silent.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let read = (&silent).read(&mut first);
    assert!(matches!(read, Ok(0)) || read.is_err() && silent_since.elapsed() < Duration::from_secs(60), "{read:?}");
    assert!(silent_since.elapsed() < Duration::from_secs(45), "held {:?}", silent_since.elapsed());
}

#[test]
fn plain_auth_is_refused_on_a_submission_listener_that_is_not_loopback() {
    let rig = Rig::new("");
    rig.person("alice");
    std::fs::write(rig.path().join("sendmail.toml"), "identity = \"alice\"\npins = \"pins\"\n").unwrap();
    init_for(&rig, "alice");
    let submission = free_port();
    let addr = format!("127.0.0.1:{submission}");
    let _local = start_submission(&rig, &format!("0.0.0.0:{submission}"), &addr);
    let tcp = TcpStream::connect(&addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = tcp.try_clone().unwrap();
    let mut r = BufReader::new(tcp);
    assert!(line(&mut r).starts_with("220"));
    w.write_all(b"EHLO client\r\n").unwrap();
    let mut ehlo = Vec::new();
    loop {
        let l = line(&mut r);
        ehlo.push(l.clone());
        if l.starts_with("250 ") {
            break;
        }
    }
    assert!(!ehlo.iter().any(|l| l.contains("AUTH")) && ehlo.iter().any(|l| l.contains("STARTTLS")), "{ehlo:?}");
    w.write_all(b"AUTH PLAIN AGFsaWNlQGxvY2FsaG9zdAB4\r\n").unwrap();
    let l = line(&mut r);
    assert!(l.starts_with("538 5.7.11"), "{l}");
    w.write_all(b"MAIL FROM:<alice@example.org>\r\n").unwrap();
    let l = line(&mut r);
    assert!(l.starts_with("530 5.7.0"), "{l}");
}

#[test]
fn fetchmail_takes_the_messages_over_starttls_and_leaves_them_read() {
    if !have("fetchmail", "--version") {
        println!("SKIPPED fetchmail test: fetchmail is not installed (.ci/run installs it)");
        return;
    }
    let Bridge { rig, password, cert, port, local: _local, .. } = bridge(true);
    send_all(&rig, &[small(1), small(2)]);
    let inbox = rig.path().join("bob/local/Maildir");
    wait_for(Duration::from_secs(30), || (maildir_messages(&inbox).len() == 2).then_some(())).expect("stored");
    let out_dir = rig.path().join("fetched");
    std::fs::create_dir_all(&out_dir).unwrap();
    let rc = rig.path().join("fetchmailrc");
    std::fs::write(
        &rc,
        format!(
            "poll 127.0.0.1 service {port} protocol IMAP auth password\n  user \"bob@localhost\" password \"{password}\"\n  \
sslproto tls1.2+ sslcertck sslcertfile \"{cert}\" sslcommonname localhost\n  keep\n  mda \"/bin/sh -c 'cat >> {dir}/all'\"\n",
            cert = cert.display(),
            dir = out_dir.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&rc, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = Command::new("fetchmail")
        .args(["-f", rc.to_str().unwrap(), "--nodetach", "--nosyslog", "-v"])
        .env("HOME", rig.path())
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "fetchmail failed:\n{text}");
    assert!(text.contains("STARTTLS") || text.contains("TLS"), "over TLS:\n{text}");
    // fetchmail hands each message to the MDA (with its own Received line).
    let got = std::fs::read_to_string(out_dir.join("all")).unwrap();
    for i in [1, 2] {
        assert_eq!(got.matches(&format!("This is note {i}.")).count(), 1, "{got}\n{text}");
    }
    // What it read is marked \Seen in the store (fetchmail's `keep` leaves it there).
    let names: Vec<String> = std::fs::read_dir(inbox.join("cur"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| n.ends_with(":2,S")), "{names:?}");
}

#[test]
fn implicit_tls_is_offered_where_asked_and_the_certificate_is_the_printed_one() {
    let rig = Rig::new("");
    rig.person("bob");
    let (password, cert) = init(&rig);
    let (imap, imaps) = (free_port(), free_port());
    let log = std::fs::File::create(rig.path().join("local.log")).unwrap();
    let _local = Killed(
        Command::new(BIN)
            .args(["local", "--identity", "bob", "--imap", &format!("127.0.0.1:{imap}")])
            .args(["--imaps", &format!("127.0.0.1:{imaps}"), "--submission", &format!("127.0.0.1:{}", free_port())])
            .current_dir(rig.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let addr = format!("127.0.0.1:{imaps}");
    wait_for(Duration::from_secs(20), || TcpStream::connect(&addr).ok()).expect("IMAPS listens");
    let script = r#"
import imaplib, ssl, sys, hashlib
port, password, cafile = int(sys.argv[1]), sys.argv[2], sys.argv[3]
M = imaplib.IMAP4_SSL('localhost', port, ssl_context=ssl.create_default_context(cafile=cafile))
der = M.sock.getpeercert(binary_form=True)
print(':'.join('%02X' % b for b in hashlib.sha256(der).digest()))
assert 'STARTTLS' not in M.capabilities and 'AUTH=PLAIN' in M.capabilities, M.capabilities
assert M.login('bob@localhost', password)[0] == 'OK'
M.logout()
"#;
    let fingerprint = python(script, &[&imaps.to_string(), &password, cert.to_str().unwrap()]);
    // `--init` again keeps the certificate and prints the same fingerprint.
    let again = ok(rig.path(), &["local", "--identity", "bob", "--data", "bob/local", "--init"]);
    assert!(again.contains(fingerprint.trim()), "{again} / {fingerprint}");
}

/// Appends 48 messages of 1 MB, asks for all of them at once (with two
/// more commands pipelined behind) and reads nothing for a while, then reads
/// everything. Prints the bridge's RSS (kB) before the FETCH and while the
/// client does not read, how many complete messages came, the tags of the
/// tagged answers in order, and the answer to a FETCH that lists one
/// message's text four times.
const FETCH_ALL_UNREAD: &str = r#"
import imaplib, socket, sys, time
port, password, pid = int(sys.argv[1]), sys.argv[2], sys.argv[3]
def rss():
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS:"):
            return int(l.split()[1])
m = imaplib.IMAP4("127.0.0.1", port)
m.login("bob@localhost", password)
filler = (b"All work and no play makes Jack a dull boy. " * 24 + b"\r\n") * 960
for i in range(48):
    msg = b"From: alice@localhost\r\nSubject: big %d\r\n\r\n" % i + filler
    typ, _ = m.append("INBOX", None, None, msg)
    assert typ == "OK", typ
m.logout()
time.sleep(1)
before = rss()
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
f = s.makefile("rb")
f.readline()
s.sendall(b"a LOGIN bob@localhost " + password.encode() + b"\r\nb SELECT INBOX\r\n")
while not f.readline().startswith(b"b OK"):
    pass
s.sendall(b"c UID FETCH 1:* BODY.PEEK[]\r\nd UID FETCH 1:* FLAGS\r\ne NOOP\r\n")
time.sleep(4)
held = rss()
complete, tags = 0, []
while len(tags) < 3:
    l = f.readline()
    if l[:2] in (b"c ", b"d ", b"e "):
        tags.append(l.split()[0].decode() + ":" + l.split()[1].decode())
    elif l.rstrip().endswith(b"}"):
        n = int(l.rstrip()[l.rindex(b"{") + 1:-1])
        body = f.read(n)
        complete += body.startswith(b"From: alice@localhost") and len(body) == n
s.sendall(b"f FETCH 1 (BODY.PEEK[] BODY.PEEK[] BODY.PEEK[] BODY.PEEK[])\r\n")
while True:
    l = f.readline()
    if l.startswith(b"f "):
        too_much = l.split(b" ", 1)[1].strip().decode()
        break
    if l.rstrip().endswith(b"}"):
        f.read(int(l.rstrip()[l.rindex(b"{") + 1:-1]))
print(before, held, complete, ",".join(tags), too_much)
"#;

#[test]
fn fetching_a_whole_large_folder_holds_a_chunk_not_the_folder_and_pipelined_commands_wait() {
    let Bridge { rig: _rig, password, port, local, .. } = bridge(false);
    let out = python(FETCH_ALL_UNREAD, &[&port.to_string(), &password, &local.0.id().to_string()]);
    let f: Vec<&str> = out.split_whitespace().collect();
    let (before, held, complete): (u64, u64, u64) =
        (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap());
    assert_eq!(complete, 48, "{out}");
    // What the client pipelined behind the FETCH waits for it, each answered once.
    assert_eq!(f[3], "c:OK,d:OK,e:OK", "{out}");
    // Listing a message's text again and again does not multiply it in memory.
    assert!(f[4..].join(" ").starts_with("NO [LIMIT]"), "{out}");
    // The folder is 48 MB; answering at once would hold all of it (twice, encoded).
    assert!(held < before + 24 * 1024, "RSS went from {before} kB to {held} kB while the client did not read");
}

#[test]
fn connections_beyond_the_cap_are_told_bye_and_a_freed_slot_is_taken_again() {
    let Bridge { rig: _rig, imap, local: _local, .. } = bridge(false);
    let greeted = |tcp: &TcpStream| {
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        line(&mut BufReader::new(tcp.try_clone().unwrap()))
    };
    let mut held = Vec::new();
    for i in 0..32 {
        let tcp = TcpStream::connect(&imap).unwrap();
        let l = greeted(&tcp);
        assert!(l.starts_with("* OK"), "connection {i}: {l}");
        held.push(tcp);
    }
    let extra = TcpStream::connect(&imap).unwrap();
    let l = greeted(&extra);
    assert!(l.starts_with("* BYE"), "the 33rd connection: {l}");
    drop(held.pop());
    // The slot comes free once the bridge has seen the close.
    let again = wait_for(Duration::from_secs(20), || {
        let tcp = TcpStream::connect(&imap).ok()?;
        greeted(&tcp).starts_with("* OK").then_some(tcp)
    });
    assert!(again.is_some(), "a freed slot is taken again");
}

#[test]
fn a_client_that_trickles_its_login_is_cut_off_at_the_login_deadline() {
    let Bridge { rig: _rig, imap, local: _local, .. } = bridge(false);
    let tcp = TcpStream::connect(&imap).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut w = tcp.try_clone().unwrap();
    let mut r = BufReader::new(tcp);
    assert!(line(&mut r).starts_with("* OK"));
    let start = Instant::now();
    // One octet every 2 s, never a whole line: no octet moves the deadline.
    let trickle = b"a LOGIN bob@localhost aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    r.get_ref().set_read_timeout(Some(Duration::from_millis(10))).unwrap();
    let mut buf = [0u8; 256];
    for &b in trickle.iter().cycle() {
        assert!(start.elapsed() < Duration::from_secs(100), "the trickling client was never cut off");
        if w.write_all(&[b]).is_err() {
            break;
        }
        match r.read(&mut buf) {
            Ok(0) => break,
            Err(e) if !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
            _ => {}
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let cut = start.elapsed();
    // The deadline is one minute from connecting, however the octets come.
    assert!(cut >= Duration::from_secs(50) && cut <= Duration::from_secs(90), "cut off after {cut:?}");
}
