//! What a new operator meets: defaults that follow the mail domains and the
//! server's identity, secrets read from files, the settings file named by
//! `LATSSIAM_BRIDGE_CONFIG`, and `healthcheck` for container runtimes. Real
//! binaries on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::rig::Rig;
use common::{free_port, identity, ok, run, wait_for, Process, BIN};

fn register(rig: &Rig, who: &str, server: &str, password: &str) -> String {
    let out =
        run(rig.path(), &["register", "--identity", who, "--server", server, "--password", password, "--pins", "pins"]);
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// `healthcheck` with the rig's settings: exit status and what it printed.
fn healthcheck(rig: &Rig) -> (bool, String) {
    let out =
        Command::new(BIN).args(["healthcheck", "--config"]).arg(&rig.config).current_dir(rig.path()).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), said)
}

#[test]
fn the_embedded_home_server_serves_the_first_mail_domain() {
    // No home.host: the first of gateway.domains (example.org).
    let rig = Rig::new("[home]\nhost = \"\"\n");
    identity(rig.path(), "alice@example.org", "alice");
    let out = register(&rig, "alice", &format!("127.0.0.1:{}", rig.home_port), "sesame");
    assert!(out.starts_with("10 "), "{out}");
    assert!(rig.log().contains("as NAME@example.org, with the password from home.register_password"), "{}", rig.log());
    let gateway = ok(rig.path(), &["identity", "show", "gw/identity"]);
    assert!(gateway.contains("gateway@example.org"), "{gateway}");
    // Mail to her mail address reaches her LATSSIAM mailbox, one address for both.
    rig.contact("alice", &[]);
    let r = rig.smtp_send("b@remote.example", "alice@example.org", b"Subject: one address\r\n\r\nhi\r\n");
    assert!(r.starts_with("accepted 250"), "{r}");
}

#[test]
fn a_server_with_an_identity_serves_its_host() {
    let dir = tempfile::tempdir().unwrap();
    identity(dir.path(), "postmaster@example.org", "pm");
    identity(dir.path(), "alice@example.org", "alice");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = ["server", "--identity", "pm", "--listen", &listen, "--data-dir", "srv", "--register-password", "pw"];
    let _srv = Process::start(dir.path(), BIN, &args, &[("LATSSIAM_LOG", "warn")]);
    let out =
        ok(dir.path(), &["register", "--identity", "alice", "--server", &listen, "--password", "pw", "--pins", "pins"]);
    assert!(out.starts_with("10 "), "registered at example.org, not refused with 15: {out}");
}

#[test]
fn secrets_come_from_files_and_settings_from_latssiam_bridge_config() {
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "from a file\n").unwrap();
    let path: &'static str = Box::leak(secret.path().display().to_string().into_boxed_str());
    let rig = Rig::with_env("", &[("LATSSIAM_BRIDGE__HOME__REGISTER_PASSWORD_FILE", path)]);
    identity(rig.path(), "alice@localhost", "alice");
    identity(rig.path(), "bob@localhost", "bob");
    let refused = register(&rig, "bob", &rig.home, "sesame");
    assert!(refused.starts_with("11 "), "the file's password replaces the configured one: {refused}");
    let out = register(&rig, "alice", &rig.home, "from a file");
    assert!(out.starts_with("10 "), "{out}");
    assert!(rig.log().contains("LATSSIAM_BRIDGE__HOME__REGISTER_PASSWORD_FILE"), "{}", rig.log());
    // The settings file named by LATSSIAM_BRIDGE_CONFIG, without --config.
    let listed = Command::new(BIN)
        .args(["contacts", "list"])
        .env("LATSSIAM_BRIDGE_CONFIG", &rig.config)
        .current_dir(rig.path())
        .output()
        .unwrap();
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    // A secret file that cannot be read stops start-up with one line naming it.
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&rig.config)
        .env("LATSSIAM_BRIDGE__SMARTHOST__PASSWORD_FILE", "/nonexistent/secret")
        .current_dir(rig.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("LATSSIAM_BRIDGE__SMARTHOST__PASSWORD_FILE"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn healthcheck_says_healthy_or_what_is_wrong_in_one_line() {
    let rig = Rig::new("");
    let (healthy, said) = healthcheck(&rig);
    assert!(healthy && said.is_empty(), "{said}");
    // An external home server that is down.
    let home = free_port();
    let rig = Rig::new(&format!("[home]\nserver = \"127.0.0.1:{home}\"\nregister_password = \"\"\n"));
    let (healthy, said) = healthcheck(&rig);
    assert!(!healthy && said.contains("home server 127.0.0.1:") && said.trim().lines().count() == 1, "{said}");
    // No gateway at all.
    let mut rig = rig;
    rig.gateway.as_mut().unwrap().signal("TERM");
    let (healthy, said) = healthcheck(&rig);
    assert!(!healthy && said.contains("http.listen") && said.trim().lines().count() == 1, "{said}");
}

#[test]
fn healthcheck_reports_a_queue_that_cannot_be_written() {
    let Some(disk) = common::SmallDisk::mount("64m") else {
        eprintln!("SKIPPED healthcheck_reports_a_queue_that_cannot_be_written: cannot mount a tmpfs (needs root)");
        return;
    };
    let rig = Rig::new(&format!("[gateway]\ndata_dir = {:?}\n", disk.path().join("gw")));
    assert!(healthcheck(&rig).0);
    disk.fill();
    std::thread::sleep(Duration::from_millis(1100));
    let (healthy, said) = healthcheck(&rig);
    assert!(!healthy && said.contains("queue not writable") && said.trim().lines().count() == 1, "{said}");
    std::fs::remove_file(disk.path().join("filler")).unwrap();
    let healthy = wait_for(Duration::from_secs(10), || healthcheck(&rig).0.then_some(()));
    assert!(healthy.is_some(), "healthy again once there is room");
}

#[test]
fn metrics_keep_every_name_they_had() {
    let rig = Rig::new("");
    let body = rig.http_get("/metrics");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let mut names: Vec<String> = vec!["latssiam_bridge_end_to_end_seconds_bucket{le=\"0.001\"} ".into()];
    for state in ["active", "deferred", "dead"] {
        names.push(format!("latssiam_bridge_queue_jobs{{state=\"{state}\"}} "));
    }
    for channel in ["latssiam", "smtp"] {
        for result in ["ok", "deferred", "failed"] {
            names.push(format!("latssiam_bridge_deliveries_total{{channel=\"{channel}\",result=\"{result}\"}} "));
        }
    }
    for counter in [
        "smtp_accepted",
        "smtp_refused",
        "accept_round_trips",
        "accept_taken",
        "accept_refused",
        "irc_joins",
        "irc_lines_heard",
        "irc_lines_queued",
        "irc_digests_queued",
    ] {
        names.push(format!("latssiam_bridge_{counter}_total "));
    }
    names.push("latssiam_bridge_end_to_end_seconds_bucket{le=\"+Inf\"} ".into());
    names.push("latssiam_bridge_end_to_end_seconds_sum ".into());
    names.push("latssiam_bridge_end_to_end_seconds_count ".into());
    for name in names {
        assert!(body.lines().any(|l| l.starts_with(&name)), "no {name:?} in\n{body}");
    }
}
