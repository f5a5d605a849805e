//! The reference server and the client commands as separate processes, as
//! a user runs them: a conversation, durability across SIGKILL, SIGTERM, and
//! the operator's commands.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;
use common::{eml_files, identity, ok, run, Process, SyncTrace, BIN};

/// A server process; killed when dropped.
struct ServerProcess {
    process: Process,
    addr: String,
}

impl ServerProcess {
    fn start(dir: &Path, data: &str, extra: &[&str]) -> Self {
        let mut args = vec!["server", "--listen", "127.0.0.1:0", "--data-dir", data, "--register-password", "sesame"];
        args.extend_from_slice(extra);
        Self::start_with(dir, &args)
    }

    fn start_with(dir: &Path, args: &[&str]) -> Self {
        let process = Process::start(dir, BIN, args, &[("LATSSIAM_LOG", "warn")]);
        // "listening on 127.0.0.1:PORT as FINGERPRINT"
        let line = &process.first_line;
        let addr = line.split_whitespace().nth(2).unwrap_or_else(|| panic!("server said {line:?}")).to_owned();
        let port = addr.rsplit(':').next().unwrap();
        let addr = format!("localhost:{port}");
        Self { process, addr }
    }

    fn signal(&mut self, sig: &str) -> std::process::ExitStatus {
        self.process.signal(sig)
    }
}

fn register(dir: &Path, server: &str, who: &str) {
    let out = ok(dir, &["register", "--identity", who, "--server", server, "--password", "sesame", "--pins", "pins"]);
    assert!(out.starts_with("10 "), "{out}");
}

/// Bob sends `msg.eml` to Alice's certificate (with `extra` flags); what `send` printed.
fn send_to_alice(dir: &Path, server: &str, extra: &[&str]) -> String {
    let mut args = vec!["send", "--identity", "bob", "--server", server, "--to", "alice/cert.pem"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["msg.eml", "--pins", "pins"]);
    ok(dir, &args)
}

const MESSAGE: &str = "From: bob@localhost\r\nTo: alice@localhost\r\nDate: Tue, 24 Nov 2026 12:00:00 +0000\r\n\
Message-ID: <1@localhost>\r\nSubject: Grüße\r\n\r\nHallo Alice, schöne Grüße!\r\n";

#[test]
fn conversation_with_a_waiting_fetch() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let server = ServerProcess::start(dir, "srv", &[]);
    let alice_fp = identity(dir, "alice@localhost", "alice");
    identity(dir, "bob@localhost", "bob");
    register(dir, &server.addr, "alice");
    register(dir, &server.addr, "bob");

    // Alice waits; Bob sends a signed message.
    let fetch = Command::new(BIN)
        .args([
            "fetch",
            "--identity",
            "alice",
            "--server",
            &server.addr,
            "--deadline",
            "30",
            "--out-dir",
            "inbox",
            "--pins",
            "pins",
        ])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(dir.join("msg.eml"), MESSAGE).unwrap();
    let sent = send_to_alice(dir, &server.addr, &["--sign"]);
    assert_eq!(sent.trim(), "31 Message accepted");
    let out = fetch.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(lines[0].contains("signed by bob@localhost"), "{stdout}");
    assert_eq!(lines[1], "33 No more messages available");
    let files = eml_files(&dir.join("inbox"));
    assert_eq!(files.len(), 1);
    assert_eq!(std::fs::read_to_string(&files[0]).unwrap(), MESSAGE);

    // With only a fingerprint, send obtains the certificate through VERIFY.
    let sent = ok(
        dir,
        &["send", "--identity", "bob", "--server", &server.addr, "--to", &alice_fp, "msg.eml", "--pins", "pins"],
    );
    assert_eq!(sent.trim(), "31 Message accepted");
    let verified = ok(dir, &["verify", "--identity", "bob", "--server", &server.addr, "--pins", "pins", &alice_fp]);
    assert!(verified.contains("owner:       alice@localhost"), "{verified}");
    let out =
        ok(dir, &["fetch", "--identity", "alice", "--server", &server.addr, "--out-dir", "inbox", "--pins", "pins"]);
    assert!(out.contains(" unsigned"), "{out}");
    // Deregistration: later sends get 38.
    ok(dir, &["deregister", "--identity", "alice", "--server", &server.addr, "--pins", "pins"]);
    let refused = run(
        dir,
        &["send", "--identity", "bob", "--server", &server.addr, "--to", "alice/cert.pem", "msg.eml", "--pins", "pins"],
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stdout).starts_with("38 "));
}

/// A server on `srv` in `dir`, with Alice registered and Bob's identity made.
fn alice_registered_and_bob(dir: &Path) -> ServerProcess {
    let server = ServerProcess::start(dir, "srv", &[]);
    identity(dir, "alice@localhost", "alice");
    identity(dir, "bob@localhost", "bob");
    register(dir, &server.addr, "alice");
    server
}

#[test]
fn a_message_acknowledged_with_31_survives_sigkill() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let mut server = alice_registered_and_bob(dir);
    std::fs::write(dir.join("msg.eml"), MESSAGE).unwrap();
    let sent = send_to_alice(dir, &server.addr, &[]);
    assert_eq!(sent.trim(), "31 Message accepted");
    let status = server.signal("KILL");
    assert!(!status.success(), "killed, not exited");
    drop(server);

    // Restarted on the same data (a new port; the same certificate, so TOFU pins hold per host:port).
    let server = ServerProcess::start(dir, "srv", &[]);
    let out =
        ok(dir, &["fetch", "--identity", "alice", "--server", &server.addr, "--out-dir", "inbox", "--pins", "pins2"]);
    let files = eml_files(&dir.join("inbox"));
    assert_eq!(files.len(), 1, "{out}");
    assert_eq!(std::fs::read_to_string(&files[0]).unwrap(), MESSAGE);
}

/// A message is stored, and deleted once fetched, when its record reaches
/// the server's log; sled, which finds messages, writes in its own time and
/// is brought up to date from the log at the next start. So a SIGKILL right
/// after the `31`s loses no message, and one right after a fetch brings
/// none back.
#[test]
fn messages_and_their_deletes_survive_sigkill_right_after_their_31() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let mut server = alice_registered_and_bob(dir);
    for i in 0..3 {
        // Three different messages (fetch names a file after its contents).
        std::fs::write(dir.join("msg.eml"), MESSAGE.replace("<1@localhost>", &format!("<{i}@localhost>"))).unwrap();
        let sent = send_to_alice(dir, &server.addr, &[]);
        assert_eq!(sent.trim(), "31 Message accepted");
    }
    assert!(!server.signal("KILL").success());
    drop(server);

    let mut server = ServerProcess::start(dir, "srv", &[]);
    let out =
        ok(dir, &["fetch", "--identity", "alice", "--server", &server.addr, "--out-dir", "inbox", "--pins", "pins2"]);
    assert_eq!(eml_files(&dir.join("inbox")).len(), 3, "{out}");
    assert!(!server.signal("KILL").success());
    drop(server);

    let server = ServerProcess::start(dir, "srv", &[]);
    let out =
        ok(dir, &["fetch", "--identity", "alice", "--server", &server.addr, "--out-dir", "inbox", "--pins", "pins3"]);
    assert_eq!(out.trim(), "33 No more messages available", "fetched messages came back");
    assert_eq!(eml_files(&dir.join("inbox")).len(), 3);
}

#[test]
fn sigterm_stops_cleanly_and_operator_commands_work_on_the_data() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let mut server = ServerProcess::start(dir, "srv", &["--require-approval"]);
    let alice_fp = identity(dir, "alice@localhost", "alice");
    let out = ok(
        dir,
        &["register", "--identity", "alice", "--server", &server.addr, "--password", "sesame", "--pins", "pins"],
    );
    assert!(out.starts_with("12 "), "{out}");
    // The store admits one process: operator commands say so clearly while the server runs.
    let busy = run(dir, &["server", "mailboxes", "--data-dir", "srv"]);
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("stop it first"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    assert!(server.signal("TERM").success(), "SIGTERM is a clean exit");

    let list = ok(dir, &["server", "mailboxes", "--data-dir", "srv"]);
    assert!(
        list.lines().any(|l| l.contains("alice@localhost") && l.contains(&alice_fp) && l.contains("pending")),
        "{list}"
    );
    ok(dir, &["server", "approve", &alice_fp, "--data-dir", "srv"]);
    let list = ok(dir, &["server", "mailboxes", "--data-dir", "srv"]);
    assert!(list.lines().any(|l| l.contains(&alice_fp) && l.contains("active")), "{list}");
    ok(dir, &["server", "move", &alice_fp, "new.example", "--data-dir", "srv"]);
    let list = ok(dir, &["server", "mailboxes", "--data-dir", "srv"]);
    assert!(list.lines().any(|l| l.contains(&alice_fp) && l.contains("moved to new.example")), "{list}");
    let bad = run(dir, &["server", "approve", &alice_fp, "--data-dir", "srv"]);
    assert!(!bad.status.success(), "only pending mailboxes can be approved");

    // Unknown settings keys stop start-up, naming the key.
    std::fs::write(dir.join("bad.toml"), "hots = \"typo\"\n").unwrap();
    let out = run(dir, &["server", "--config", "bad.toml", "--data-dir", "srv2"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("hots"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `31` says the message is on disk, so the store makes it durable with
/// `fdatasync`, which also flushes the device's write cache and commits the
/// metadata that finds newly written blocks; `sync_file_range`, which sled
/// used, does neither, and a message it covered could be lost at a power
/// cut after its `31`. The file synced is the server's log, where the
/// message's record was appended (sled's pointer to it is written later,
/// and brought up to date from the log at start).
/// Watched with strace attached to the running server.
#[test]
fn a_message_is_fdatasynced_not_only_written_back_before_31() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let server = alice_registered_and_bob(dir);
    std::fs::write(dir.join("msg.eml"), MESSAGE).unwrap();
    let Some(trace) = SyncTrace::attach(server.process.child.id(), &dir.join("syscalls")) else { return };
    let sent = send_to_alice(dir, &server.addr, &[]);
    let calls = trace.calls();
    assert_eq!(sent.trim(), "31 Message accepted");
    // `-y` names each call's file: fdatasync(7</…/srv/bodies/0000000000000001.log>).
    assert!(calls.synced("/bodies/", ".log"), "the message's log is not fdatasynced before 31:\n{}", calls.text);
    assert!(!calls.text.contains("sync_file_range("), "sync_file_range is not durable:\n{}", calls.text);
}
