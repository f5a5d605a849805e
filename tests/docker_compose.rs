//! The Docker sidecar deployment end to end (docker/compose.yaml): Postfix as
//! example.org's MX in front of the gateway, ngircd as the IRC network, the
//! gateway image built from docker/Dockerfile around the binary cargo built.
//!
//! Skipped (with a line saying so) where `docker info` fails. Where no registry
//! can be reached the images are built from a local Debian image made with
//! debootstrap (docker/make-base.sh, once: it is kept as latssiam-base:bookworm);
//! LATSSIAM_DOCKER_BASE=debian:bookworm-slim uses a registry's image instead.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::irc::IrcPerson;
use common::rig::support;
use common::{free_port, identity, ok, wait_for, BIN};

const BASE: &str = "latssiam-base:bookworm";
const GATEWAY_IMAGE: &str = "latssiam-bridge:test";
const POSTFIX_IMAGE: &str = "latssiam-postfix:test";
const NGIRCD_IMAGE: &str = "latssiam-ngircd:test";
/// Messages sent through Postfix while the gateway is killed.
const BURST: usize = 100;

fn docker_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docker")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Runs a command to the end; panics with its output unless it succeeds.
fn must(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn docker(args: &[&str]) -> Command {
    let mut c = Command::new("docker");
    c.args(args).stdin(Stdio::null());
    c
}

/// `docker compose` (v2) or `docker-compose` (v1), whichever works.
fn compose_program() -> Option<Vec<String>> {
    let works = |p: &[&str]| {
        Command::new(p[0]).args(&p[1..]).arg("version").stdout(Stdio::null()).stderr(Stdio::null()).status()
    };
    [&["docker", "compose"][..], &["docker-compose"][..]]
        .into_iter()
        .find(|p| works(p).is_ok_and(|s| s.success()))
        .map(|p| p.iter().map(|s| s.to_string()).collect())
}

/// One Compose project; `down -v` when dropped (its logs first, if the test failed).
struct Project {
    program: Vec<String>,
    name: String,
    env: Vec<(String, String)>,
}

impl Project {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.program[0]);
        c.args(&self.program[1..])
            .args(["-p", &self.name, "-f"])
            .arg(docker_dir().join("compose.yaml"))
            .args(args)
            .current_dir(docker_dir())
            .stdin(Stdio::null())
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        must(&mut self.command(args))
    }

    fn output(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// `exec -T SERVICE sh -c SCRIPT`'s stdout (whatever its status).
    fn sh(&self, service: &str, script: &str) -> String {
        String::from_utf8_lossy(&self.output(&["exec", "-T", service, "sh", "-c", script]).stdout).into_owned()
    }

    fn container(&self, service: &str) -> String {
        self.ok(&["ps", "-q", service]).trim().to_owned()
    }

    fn logs(&self, service: &str) -> String {
        text(&self.output(&["logs", "--no-color", service]))
    }

    fn health(&self, container: &str) -> String {
        let out = docker(&["inspect", "-f", "{{if .State.Health}}{{.State.Health.Status}}{{end}}", container])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Waits until the service's container is `healthy`; returns the time it took.
    fn wait_healthy(&self, service: &str, limit: Duration) -> Duration {
        let start = Instant::now();
        let container = wait_for(limit, || Some(self.container(service)).filter(|c| !c.is_empty())).unwrap();
        wait_for(limit, || (self.health(&container) == "healthy").then_some(()))
            .unwrap_or_else(|| panic!("{service} is not healthy: {}\n{}", self.health(&container), self.logs(service)));
        start.elapsed()
    }

    /// Bob's Maildir in the Postfix container, one string per message.
    fn bob_mail(&self) -> Vec<String> {
        let all = self.sh(
            "postfix",
            "for f in /var/mail/vhosts/example.org/bob/new/*; do [ -f \"$f\" ] && cat \"$f\" && echo '=====END====='; done",
        );
        all.split("=====END=====\n").filter(|m| !m.trim().is_empty()).map(str::to_owned).collect()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", text(&self.output(&["logs", "--no-color", "--tail=150"])));
        }
        let out = self.output(&["down", "-v", "--remove-orphans", "-t", "5"]);
        if !out.status.success() {
            eprintln!("docker compose down failed:\n{}", text(&out));
        }
    }
}

/// Alice on the host: her identity, the pins file and what she fetched, in `dir`.
struct Alice<'a> {
    dir: &'a Path,
    server: String,
}

impl Alice<'_> {
    /// Fetches until `done` holds for every message fetched so far (or `secs` pass); returns them all.
    fn fetch_until(&self, secs: u64, done: impl Fn(&[String]) -> bool) -> Vec<String> {
        let start = Instant::now();
        loop {
            let out = common::run(
                self.dir,
                &[
                    "fetch",
                    "--identity",
                    "alice",
                    "--server",
                    &self.server,
                    "--deadline",
                    "5",
                    "--out-dir",
                    "inbox",
                    "--pins",
                    "pins",
                ],
            );
            assert!(out.status.success(), "fetch: {}", text(&out));
            let got = self.inbox();
            if done(&got) || start.elapsed() > Duration::from_secs(secs) {
                return got;
            }
        }
    }

    fn inbox(&self) -> Vec<String> {
        common::eml_files(&self.dir.join("inbox")).iter().map(|p| std::fs::read_to_string(p).unwrap()).collect()
    }

    fn send(&self, gateway_fp: &str, name: &str, message: &str) {
        std::fs::write(self.dir.join(name), message).unwrap();
        let out = ok(
            self.dir,
            &[
                "send",
                "--identity",
                "alice",
                "--server",
                &self.server,
                "--to",
                gateway_fp,
                "--sign",
                "--pins",
                "pins",
                name,
            ],
        );
        assert!(out.starts_with("31"), "{out}");
    }
}

/// The base image: kept from an earlier run, named by LATSSIAM_DOCKER_BASE, or made now.
fn base_image() -> String {
    if let Ok(base) = std::env::var("LATSSIAM_DOCKER_BASE") {
        return base;
    }
    if docker(&["image", "inspect", BASE]).stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap().success() {
        return BASE.to_owned();
    }
    let start = Instant::now();
    eprintln!("docker_compose: making {BASE} with debootstrap (once; a few minutes)");
    must(Command::new(docker_dir().join("make-base.sh")).arg(BASE));
    println!("docker_compose: made {BASE} in {:.0?}", start.elapsed());
    BASE.to_owned()
}

/// The three images: the gateway around the binary cargo built (PREBUILT), Postfix and ngircd.
fn build_images(base: &str, work: &Path) {
    let start = Instant::now();
    let old: Vec<String> = [GATEWAY_IMAGE, POSTFIX_IMAGE, NGIRCD_IMAGE].iter().map(|i| image_id(i)).collect();
    let context = work.join("gateway-context");
    std::fs::create_dir(&context).unwrap();
    std::fs::copy(docker_dir().join("Dockerfile"), context.join("Dockerfile")).unwrap();
    // A debug build is ~180 MB, mostly debug info: strip it if we can (the image then holds what a release would).
    let binary = context.join("latssiam-bridge");
    let stripped =
        Command::new("strip").args(["--strip-debug", "-o"]).arg(&binary).arg(BIN).status().is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy(BIN, &binary).unwrap();
    }
    let arg = |k: &str, v: &str| ["--build-arg".to_owned(), format!("{k}={v}")];
    let mut gateway = docker(&["build", "-q", "-t", GATEWAY_IMAGE]);
    gateway
        .args(arg("BUILDER", base))
        .args(arg("RUNTIME", base))
        .args(arg("PREBUILT", "latssiam-bridge"))
        .arg(&context);
    must(&mut gateway);
    // The legacy builder keeps each builder stage as a dangling image: drop ours.
    let _ = docker(&["image", "prune", "-f", "--filter", "label=org.latssiam-bridge.stage=build"]).output();
    for (image, dir) in [(POSTFIX_IMAGE, "postfix"), (NGIRCD_IMAGE, "ngircd")] {
        let mut c = docker(&["build", "-q", "-t", image]);
        c.args(arg("BASE", base)).arg(docker_dir().join(dir));
        must(&mut c);
    }
    // An image these tags named before is now dangling: remove it (if nothing else uses it).
    for (image, old) in [GATEWAY_IMAGE, POSTFIX_IMAGE, NGIRCD_IMAGE].iter().zip(old) {
        if !old.is_empty() && image_id(image) != old {
            let _ = docker(&["rmi", &old]).output();
        }
    }
    println!("docker_compose: images built in {:.1?} (binary stripped: {stripped})", start.elapsed());
}

/// The image's id, or "" if there is none.
fn image_id(image: &str) -> String {
    let out = docker(&["image", "inspect", "--format", "{{.Id}}", image]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The gateway's fingerprint, from its first stdout line `gateway FP smtp ADDR ...`.
fn gateway_fingerprint(project: &Project) -> String {
    wait_for(Duration::from_secs(60), || {
        let logs = project.logs("gateway");
        logs.lines().find_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words.windows(3).find(|w| w[0] == "gateway" && w[1].len() == 64 && w[2] == "smtp").map(|w| w[1].to_owned())
        })
    })
    .unwrap_or_else(|| panic!("no start line from the gateway:\n{}", project.logs("gateway")))
}

fn swaks(port: u16, from: &str, to: &str, header: &str, body: &str) -> Output {
    Command::new("swaks")
        .args(["--server", &format!("127.0.0.1:{port}"), "--from", from, "--to", to])
        .args(["--header", header, "--body", body])
        .stdin(Stdio::null())
        .output()
        .expect("swaks must be installed (apt-get install swaks)")
}

/// The messages in `inbox` carrying the line `burst-TOKEN-N`, counted by N.
fn burst_counts(inbox: &[String], token: &str) -> BTreeMap<usize, usize> {
    let marker = format!("burst-{token}-");
    let mut counts = BTreeMap::new();
    for m in inbox {
        for line in m.lines() {
            if let Some(n) = line.strip_prefix(&marker).and_then(|n| n.trim().parse().ok()) {
                *counts.entry(n).or_insert(0) += 1;
            }
        }
    }
    counts
}

#[test]
fn sidecar_deployment_with_postfix_and_ngircd() {
    let info = Command::new("docker").arg("info").stdin(Stdio::null()).output();
    match &info {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            let why = text(out);
            println!("SKIPPED docker_compose: docker info failed: {}", why.lines().last().unwrap_or("").trim());
            return;
        }
        Err(e) => {
            println!("SKIPPED docker_compose: docker info failed: {e}");
            return;
        }
    }
    let program = compose_program().expect("docker works but neither `docker compose` nor `docker-compose` does");
    let test_start = Instant::now();
    let work = tempfile::tempdir().unwrap();
    let base = base_image();
    build_images(&base, work.path());
    let size: u64 =
        must(&mut docker(&["image", "inspect", "--format", "{{.Size}}", GATEWAY_IMAGE])).trim().parse().unwrap();
    println!("docker_compose: gateway image {GATEWAY_IMAGE}: {:.1} MB", size as f64 / 1e6);

    // The settings a test needs: free ports on loopback, its own secret, its own Postfix tables
    // (the shipped ones plus carol, whom Postfix sends to the gateway but the gateway does not know).
    let (smtp_port, home_port, http_port, irc_port) = (free_port(), free_port(), free_port(), free_port());
    let password = work.path().join("register_password");
    std::fs::write(&password, "open sesame\n").unwrap();
    let tables = work.path().join("tables");
    std::fs::create_dir(&tables).unwrap();
    for t in ["vmailbox", "virtual", "latssiam"] {
        std::fs::copy(docker_dir().join("postfix/tables").join(t), tables.join(t)).unwrap();
    }
    let mut latssiam = std::fs::OpenOptions::new().append(true).open(tables.join("latssiam")).unwrap();
    writeln!(latssiam, "carol@example.org\tlatssiam:[gateway]:2525").unwrap();
    // Everything the container reads must be readable by its users (uid 10001, postfix).
    for p in [&password, &tables, &tables.join("vmailbox"), &tables.join("virtual"), &tables.join("latssiam")] {
        let mode = if p.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    }
    // A DNS server for the gateway (it authenticates inbound mail, and these
    // machines resolve nothing): on the host's first IPv4 address, which
    // containers reach (bound to it, so that answers come from it).
    let host_ip = must(Command::new("hostname").arg("-I"))
        .split_whitespace()
        .find(|a| a.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| !ip.is_loopback()))
        .expect("the host has an IPv4 address")
        .to_owned();
    let dns = common::dns::Dns::start_on(work.path(), "", &host_ip);
    let gateway_toml = work.path().join("gateway.toml");
    let shipped = std::fs::read_to_string(docker_dir().join("gateway/gateway.toml")).unwrap();
    std::fs::write(
        &gateway_toml,
        format!("{shipped}\n[dns]\nnameservers = [\"{}\"]\ntimeout_secs = 2\n", dns.nameserver()),
    )
    .unwrap();
    std::fs::set_permissions(&gateway_toml, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let project = Project {
        program,
        name: format!("latssiamtest{}x{nanos}", std::process::id()),
        env: [
            ("LATSSIAM_IMAGE", GATEWAY_IMAGE.to_owned()),
            ("POSTFIX_IMAGE", POSTFIX_IMAGE.to_owned()),
            ("NGIRCD_IMAGE", NGIRCD_IMAGE.to_owned()),
            ("LATSSIAM_BASE", base.clone()),
            ("GATEWAY_HOME_PUBLISH", format!("127.0.0.1:{home_port}")),
            ("GATEWAY_GEMINI_PUBLISH", format!("127.0.0.1:{}", free_port())),
            ("GATEWAY_HTTP_PORT", http_port.to_string()),
            ("POSTFIX_SMTP_PUBLISH", format!("127.0.0.1:{smtp_port}")),
            ("NGIRCD_PUBLISH", format!("127.0.0.1:{irc_port}")),
            ("LATSSIAM_REGISTER_PASSWORD_FILE", password.display().to_string()),
            ("POSTFIX_TABLES", tables.display().to_string()),
            ("LATSSIAM_GATEWAY_TOML", gateway_toml.display().to_string()),
            // Health checked every second, so the time to healthy is measured to the second.
            ("GATEWAY_HEALTH_INTERVAL", "1s".to_owned()),
            // Deferred mail retried within seconds rather than minutes.
            (
                "POSTFIX_POSTCONF",
                "queue_run_delay = 2s\nminimal_backoff_time = 2s\nmaximal_backoff_time = 4s".to_owned(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect(),
    };

    let up = Instant::now();
    project.ok(&["up", "-d", "--no-build"]);
    let fp = gateway_fingerprint(&project);
    let to_start_line = up.elapsed();
    project.wait_healthy("gateway", Duration::from_secs(90));
    println!(
        "docker_compose: up -d to the gateway's start line {to_start_line:.1?}, to healthy {:.1?} (health checked every 1 s)",
        up.elapsed()
    );
    let gateway = project.container("gateway");
    assert_eq!(project.sh("postfix", "postconf -h queue_run_delay").trim(), "2s", "POSTFIX_POSTCONF applied");

    // Non-root, read-only root filesystem.
    let uid = project.ok(&["exec", "-T", "gateway", "id", "-u"]);
    assert_ne!(uid.trim(), "0", "the gateway must not run as root");
    assert!(!uid.trim().is_empty());
    let ro = must(&mut docker(&["inspect", "-f", "{{.HostConfig.ReadonlyRootfs}}", &gateway]));
    assert_eq!(ro.trim(), "true", "read_only: true");
    let touch = project.output(&["exec", "-T", "-u", "0", "gateway", "touch", "/x"]);
    assert!(text(&touch).contains("Read-only file system"), "{}", text(&touch));

    // Alice registers on the gateway's embedded home server (published port) as alice@example.org,
    // and the operator adds her as a contact inside the running container.
    let alice = Alice { dir: work.path(), server: format!("localhost:{home_port}") };
    identity(work.path(), "alice@example.org", "alice");
    let out = ok(
        work.path(),
        &["register", "--identity", "alice", "--server", &alice.server, "--password", "open sesame", "--pins", "pins"],
    );
    assert!(out.starts_with("10 "), "{out}");
    let cert = std::fs::File::open(work.path().join("alice/cert.pem")).unwrap();
    let added = must(
        project
            .command(&["exec", "-T", "gateway", "latssiam-bridge", "contacts", "add", "--cert", "/dev/stdin"])
            .args(["--email", "alice@example.org", "--allow-send"])
            .stdin(cert),
    );
    assert!(added.starts_with("added alice@example.org"), "{added}");

    // 1. Email to alice@example.org through Postfix (the MX) reaches her LATSSIAM mailbox.
    let out =
        swaks(smtp_port, "juergen@remote.example", "alice@example.org", "Subject: Grüße", "Hello Alice via Postfix");
    assert!(out.status.success() && text(&out).contains("250 2.0.0 Ok: queued as"), "{}", text(&out));
    let inbox = alice.fetch_until(60, |m| m.iter().any(|m| m.contains("Hello Alice via Postfix")));
    let mail = inbox
        .iter()
        .find(|m| m.contains("Hello Alice via Postfix"))
        .unwrap_or_else(|| panic!("Alice got {inbox:#?}\n{}\n{}", project.logs("postfix"), project.logs("gateway")));
    assert!(mail.contains("by mail.example.org (Postfix)"), "it came through Postfix: {mail}");
    assert!(mail.contains("From: juergen@remote.example"), "{mail}");

    // 2. Alice answers by LATSSIAM; the gateway relays through Postfix into Bob's Maildir.
    alice.send(
        &fp,
        "reply.eml",
        "From: alice@example.org\r\nTo: Bob <bob@example.org>\r\nSubject: Re: hello\r\n\r\nHello Bob from LATSSIAM\r\n",
    );
    let bob = wait_for(Duration::from_secs(60), || {
        project.bob_mail().into_iter().find(|m| m.contains("Hello Bob from LATSSIAM"))
    })
    .unwrap_or_else(|| panic!("Bob got nothing:\n{}\n{}", project.logs("postfix"), project.logs("gateway")));
    assert!(bob.contains("Return-Path: <alice@example.org>"), "{bob}");
    assert!(bob.contains("with LATSSIAM"), "{bob}");

    // 3. Refusals: someone Postfix does not know (550 at its RCPT); someone Postfix sends to the
    // gateway but the gateway does not know (the gateway's 550 5.1.1 becomes Postfix's bounce).
    let out = swaks(smtp_port, "bob@example.org", "dave@example.org", "Subject: x", "x");
    assert!(!out.status.success() && text(&out).contains("550 5.1.1"), "{}", text(&out));
    let out = swaks(smtp_port, "bob@example.org", "carol@example.org", "Subject: to carol", "Hi Carol");
    assert!(text(&out).contains("250 2.0.0 Ok: queued as"), "{}", text(&out));
    let bounce = wait_for(Duration::from_secs(60), || {
        project.bob_mail().into_iter().find(|m| m.contains("Undelivered Mail Returned to Sender"))
    })
    .unwrap_or_else(|| panic!("no bounce for carol:\n{}", project.logs("postfix")));
    assert!(bounce.contains("<carol@example.org>") && bounce.contains("550 5.1.1"), "{bounce}");

    // 4. IRC: a channel line on ngircd reaches the subscriber (alice@example.org), and her answer the channel.
    let mut carl = IrcPerson::connect(irc_port, "carl", "#chat");
    carl.wait_heard(
        |l| {
            (l.contains(" 353 ") && l.split_whitespace().any(|w| w.trim_start_matches([':', '@', '+']) == "latssiam"))
                || (l.starts_with(":latssiam!") && l.contains(" JOIN "))
        },
        "the bot in #chat",
    );
    carl.send("PRIVMSG #chat :hello from IRC, Alice\r\n");
    let inbox = alice.fetch_until(60, |m| m.iter().any(|m| m.contains("<carl> hello from IRC, Alice")));
    let digest = inbox
        .iter()
        .find(|m| m.contains("<carl> hello from IRC, Alice"))
        .unwrap_or_else(|| panic!("no digest: {inbox:#?}\n{}", project.logs("gateway")));
    assert!(digest.contains("<#chat@irc.example.org>"), "{digest}");
    alice.send(
        &fp,
        "to-chat.eml",
        "From: alice@example.org\r\nTo: #chat@irc.example.org\r\nSubject: chat\r\n\r\nHello IRC from LATSSIAM\r\n",
    );
    carl.wait_heard(
        |l| l.starts_with(":latssiam!") && l.contains("PRIVMSG #chat :") && l.contains("Hello IRC from LATSSIAM"),
        "Alice's answer",
    );

    // 5. SIGKILL the gateway while 100 messages flow through Postfix, start it again: everything
    // Postfix accepted reaches Alice (at least once), nothing bounces.
    let token = format!("t{nanos}");
    let mut burst = Command::new("python3")
        .arg(support("smtp_burst.py"))
        .args(["127.0.0.1", &smtp_port.to_string(), "bob@example.org", "alice@example.org"])
        .args([&BURST.to_string(), &token, "0.02"])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(burst.stdout.take().unwrap()).lines();
    let mut accepted = Vec::new();
    let mut other = Vec::new();
    let mut killed_at = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        match line.strip_prefix("accepted ") {
            Some(n) => accepted.push(n.trim().parse::<usize>().unwrap()),
            None => other.push(line),
        }
        if killed_at.is_none() && accepted.len() == BURST / 3 {
            project.ok(&["kill", "-s", "SIGKILL", "gateway"]);
            killed_at = Some(accepted.len());
        }
    }
    assert!(burst.wait().unwrap().success());
    assert!(killed_at.is_some(), "the gateway was killed mid-burst");
    let queued = project.sh("postfix", "postqueue -p | tail -n 1");
    let down = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    project.ok(&["up", "-d", "--no-build", "gateway"]);
    let restart = project.wait_healthy("gateway", Duration::from_secs(90));
    println!(
        "docker_compose: gateway SIGKILLed after {} of {BURST} accepted; Postfix then held: {}; healthy again {:.1?} after up -d",
        killed_at.unwrap(),
        queued.trim(),
        restart
    );
    project.ok(&["exec", "-T", "postfix", "postqueue", "-f"]);
    let inbox = alice.fetch_until(240, |m| {
        let counts = burst_counts(m, &token);
        accepted.iter().all(|n| counts.contains_key(n))
    });
    let counts = burst_counts(&inbox, &token);
    let missing: Vec<usize> = accepted.iter().copied().filter(|n| !counts.contains_key(n)).collect();
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    let duplicated: Vec<usize> = counts.iter().filter(|(_, &c)| c > 1).map(|(&n, _)| n).collect();
    println!(
        "docker_compose: burst: {} accepted by Postfix, {} delivered to Alice, {} missing, {duplicates} duplicates {duplicated:?}, \
         {} not accepted {other:?}; all in {:.1?} after the kill",
        accepted.len(),
        counts.len(),
        missing.len(),
        BURST - accepted.len(),
        down.elapsed()
    );
    assert!(
        missing.is_empty(),
        "accepted by Postfix but never delivered: {missing:?}\n{}\n{}",
        project.sh("postfix", "postqueue -p"),
        project.logs("gateway")
    );
    assert!(counts.keys().all(|n| accepted.contains(n)), "only accepted messages arrive");
    assert_eq!(accepted.len(), BURST, "Postfix accepts everything while the gateway is down: {other:?}");
    let bounces = project.bob_mail().iter().filter(|m| m.contains(&token)).count();
    assert_eq!(bounces, 0, "Postfix must defer, not bounce, while the gateway is down");
    assert!(
        wait_for(Duration::from_secs(30), || project
            .sh("postfix", "postqueue -p")
            .contains("Mail queue is empty")
            .then_some(()))
        .is_some(),
        "Postfix's queue drains: {}",
        project.sh("postfix", "postqueue -p")
    );

    // Healthy, from Docker's point of view and by the command itself.
    assert_eq!(project.health(&project.container("gateway")), "healthy");
    project.ok(&["exec", "-T", "gateway", "latssiam-bridge", "healthcheck"]);
    println!("docker_compose: whole test {:.1?}", test_start.elapsed());
}
