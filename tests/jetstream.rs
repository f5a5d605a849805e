//! Several gateway nodes on one queue: `queue.backend = "jetstream"` against a
//! real `nats-server` (JetStream, its own store directory, a free port), an
//! external reference server as the home server, and the real binaries.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::nats::Nats;
use common::rig::support;
use common::{eml_files, free_port, identity, ok, wait_for, Process, BIN};

/// A NATS server, a reference server as home, a smarthost, and gateway nodes.
struct Cluster {
    dir: tempfile::TempDir,
    nats: Nats,
    _server: Process,
    home_port: u16,
    _smarthost: Process,
    smarthost_port: u16,
    nodes: Vec<Node>,
    /// The DNS the nodes ask (inbound mail is authenticated).
    dns: common::dns::Dns,
}

struct Node {
    config: PathBuf,
    smtp_port: u16,
    process: Option<Process>,
    gateway_fp: String,
}

impl Cluster {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let nats = Nats::start(dir.path());
        let home_port = free_port();
        let listen = format!("127.0.0.1:{home_port}");
        let server = Process::start(
            dir.path(),
            BIN,
            &["server", "--listen", &listen, "--data-dir", "home", "--register-password", "sesame"],
            &[("LATSSIAM_LOG", "warn")],
        );
        let smarthost_port = free_port();
        let smarthost = Process::start(
            dir.path(),
            "python3",
            &[&support("smarthost.py"), &smarthost_port.to_string(), "relayed"],
            &[],
        );
        assert_eq!(smarthost.first_line.trim(), "ready");
        let dns = common::dns::Dns::start(dir.path(), "");
        Self { dir, nats, _server: server, home_port, _smarthost: smarthost, smarthost_port, nodes: Vec::new(), dns }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Two nodes (neither running) with one identity, and bob, a contact
    /// who may send: node 0 registered the gateway's mailbox and stopped, so
    /// what is sent now waits on the home server for both pollers.
    fn two_pollers_stopped() -> Self {
        let mut cluster = Cluster::new();
        cluster.add_node("");
        cluster.add_node("");
        cluster.start(0);
        cluster.person("bob", &["--allow-send"]);
        cluster.nodes[0].process.as_mut().unwrap().signal("TERM");
        cluster.add_node_identity(1);
        cluster
    }

    fn home(&self) -> String {
        format!("localhost:{}", self.home_port)
    }

    /// A settings file `NAME.toml` that names the cluster's NATS and no
    /// node's data dir (`NAME`), with `extra` sections: for the command line
    /// and for the library's own connections.
    fn settings_file(&self, name: &str, extra: &str) -> PathBuf {
        let file = self.path().join(format!("{name}.toml"));
        std::fs::write(
            &file,
            format!(
                "[gateway]\ndata_dir = \"{name}\"\ndomains = [\"example.org\"]\n{extra}[queue]\nbackend = \"jetstream\"\nnats_url = \"{}\"\n",
                self.nats.url()
            ),
        )
        .unwrap();
        file
    }

    /// Adds a node (not started); see [`Cluster::add_node_identity`].
    fn add_node(&mut self, extra: &str) -> usize {
        let n = self.nodes.len();
        let smtp_port = free_port();
        let config = self.path().join(format!("node{n}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"[gateway]
data_dir = "node{n}"
domains = ["example.org"]
hostname = "gw.example.org"
# The floods come from one origin; its daily share is not what these test.
max_per_origin_per_day = 0
[home]
server = "localhost:{home}"
register_password = "sesame"
accept_deadline_secs = 5
[routes]
localhost = "127.0.0.1:{home}"
[dns]
nameservers = ["{dns}"]
timeout_secs = 1
[smtp]
listen = "127.0.0.1:{smtp_port}"
[smarthost]
host = "127.0.0.1"
port = {smarthost}
[http]
listen = "127.0.0.1:{http}"
[gemini]
listen = ""
[queue]
first_retry_secs = 1
max_retry_secs = 2
backend = "jetstream"
nats_url = "{nats}"
nats_monitor_url = "http://127.0.0.1:{monitor}"
ack_wait_secs = 5
concurrency = 8
{extra}
"#,
                home = self.home_port,
                smarthost = self.smarthost_port,
                http = free_port(),
                nats = self.nats.url(),
                monitor = self.nats.monitor,
                dns = self.dns.nameserver(),
            ),
        )
        .unwrap();
        self.nodes.push(Node { config, smtp_port, process: None, gateway_fp: String::new() });
        n
    }

    fn start(&mut self, n: usize) {
        let log = self.path().join(format!("node{n}.log"));
        let node = &mut self.nodes[n];
        let p = Process::start_logging(
            self.dir.path(),
            BIN,
            &["run", "--config", node.config.to_str().unwrap()],
            &[("LATSSIAM_LOG", "info")],
            Some(&log),
        );
        let words: Vec<&str> = p.first_line.split_whitespace().collect();
        assert_eq!(words.first(), Some(&"gateway"), "{}", p.first_line);
        node.gateway_fp = words[1].to_owned();
        node.process = Some(p);
    }

    fn log(&self, n: usize) -> String {
        std::fs::read_to_string(self.path().join(format!("node{n}.log"))).unwrap_or_default()
    }

    fn logs(&self) -> String {
        (0..self.nodes.len()).map(|n| format!("--- node{n}:\n{}", self.log(n))).collect()
    }

    fn cli(&self, n: usize, args: &[&str]) -> String {
        let mut v = args.to_vec();
        v.extend(["--config", self.nodes[n].config.to_str().unwrap()]);
        ok(self.path(), &v)
    }

    /// A person registered on the home server, and a contact of the gateway (added on node 0).
    fn person(&self, name: &str, extra: &[&str]) {
        identity(self.path(), &format!("{name}@localhost"), name);
        let home = self.home();
        let out = ok(
            self.path(),
            &["register", "--identity", name, "--server", &home, "--password", "sesame", "--pins", "pins"],
        );
        assert!(out.starts_with("10 "), "{out}");
        let cert = format!("{name}/cert.pem");
        let email = format!("{name}@example.org");
        let mut args = vec!["contacts", "add", "--cert", &cert, "--email", &email];
        args.extend_from_slice(extra);
        assert!(self.cli(0, &args).starts_with("added "));
    }

    /// Fetches `who`'s messages into `who-inbox` (each delivery its own file);
    /// returns every file there, from this fetch and earlier ones.
    fn fetch(&self, who: &str) -> Vec<PathBuf> {
        let out_dir = format!("{who}-inbox");
        let home = self.home();
        ok(
            self.path(),
            &[
                "fetch",
                "--identity",
                who,
                "--server",
                &home,
                "--deadline",
                "2",
                "--out-dir",
                &out_dir,
                "--pins",
                "pins",
            ],
        );
        eml_files(&self.path().join(out_dir))
    }

    /// Deliveries per message number (`Subject: flood N`) in `who`'s inbox.
    fn delivered(&self, who: &str) -> BTreeMap<u32, usize> {
        let mut seen = BTreeMap::new();
        for f in self.fetch(who) {
            let text = std::fs::read_to_string(f).unwrap();
            if let Some(n) = text.split("Subject: flood ").nth(1).and_then(|r| r.split("\r\n").next()) {
                *seen.entry(n.parse().unwrap()).or_default() += 1;
            }
        }
        seen
    }

    /// `smtp_send.py` of `file` from x@remote.example to `rcpt` through node `n`; what it printed.
    fn smtp_send(&self, n: usize, rcpt: &str, file: &Path) -> String {
        let out = Command::new("python3")
            .args([
                &support("smtp_send.py"),
                "127.0.0.1",
                &self.nodes[n].smtp_port.to_string(),
                "x@remote.example",
                rcpt,
                file.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// What the smarthost received.
    fn relayed(&self) -> Vec<serde_json::Value> {
        common::files_with(&self.path().join("relayed"), "json")
            .iter()
            .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
            .collect()
    }
}

/// `smtp_flood.py` numbers `from..to` over `sessions` sessions to one node.
fn flood(port: u16, numbers: std::ops::Range<u32>, sessions: u32) -> Child {
    Command::new("python3")
        .args([
            &support("smtp_flood.py"),
            "127.0.0.1",
            &port.to_string(),
            "flood@remote.example",
            "alice@example.org",
            &numbers.end.to_string(),
            &sessions.to_string(),
            "--from",
            &numbers.start.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn start_three(cluster: &mut Cluster) {
    for _ in 0..3 {
        cluster.add_node("");
    }
    cluster.start(0);
    for n in 1..3 {
        // Each later node gets node 0's identity before it starts.
        let n = cluster.add_node_identity(n);
        cluster.start(n);
    }
}

impl Cluster {
    /// Gives node `n` node 0's identity (made at node 0's first start): one gateway, many nodes.
    fn add_node_identity(&mut self, n: usize) -> usize {
        let from = self.path().join("node0/identity");
        let to = self.path().join(format!("node{n}/identity"));
        std::fs::create_dir_all(&to).unwrap();
        for f in ["cert.pem", "key.pem"] {
            std::fs::copy(from.join(f), to.join(f)).unwrap();
        }
        n
    }
}

#[test]
fn three_nodes_share_one_queue_and_a_sigkill_loses_nothing_that_got_250() {
    let mut cluster = Cluster::new();
    start_three(&mut cluster);
    let fp = &cluster.nodes[0].gateway_fp;
    assert!(cluster.nodes.iter().all(|n| &n.gateway_fp == fp), "one gateway identity on every node");
    cluster.person("alice", &[]);
    // The contact added on node 0 reaches the others through the shared bucket.
    for n in 1..3 {
        let seen = wait_for(Duration::from_secs(10), || {
            cluster.cli(n, &["contacts", "list"]).contains("alice@localhost").then_some(())
        });
        assert!(seen.is_some(), "node{n} never saw the contact added on node0:\n{}", cluster.logs());
    }

    // 600 messages, 200 to each node's SMTP listener; node 2 is killed in the middle.
    let mut floods: Vec<Child> =
        (0..3u32).map(|n| flood(cluster.nodes[n as usize].smtp_port, n * 200..(n + 1) * 200, 4)).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    for f in &mut floods {
        let out = f.stdout.take().unwrap();
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(n) = line.strip_prefix("ok ") {
                    let _ = tx.send(n.split_whitespace().next().unwrap().parse::<u32>().unwrap());
                }
            }
        });
    }
    drop(tx);
    let mut acked = std::collections::BTreeSet::new();
    let mut killed = false;
    for n in rx {
        acked.insert(n);
        if !killed && acked.len() >= 250 {
            cluster.nodes[2].process.as_mut().unwrap().signal("KILL");
            killed = true;
        }
    }
    for mut f in floods {
        f.wait().unwrap();
    }
    assert!(killed, "the floods ended before the kill");
    assert!(acked.len() < 600, "the kill came too late to test anything");

    // Every 250 is delivered, whichever node took it and whichever delivers it.
    let mut seen: BTreeMap<u32, usize> = BTreeMap::new();
    // The inbox keeps every delivery as a file of its own: each look counts them all.
    let complete = wait_for(Duration::from_secs(120), || {
        seen = cluster.delivered("alice");
        acked.iter().all(|n| seen.contains_key(n)).then_some(())
    });
    std::thread::sleep(Duration::from_secs(4));
    seen = cluster.delivered("alice");
    let lost: Vec<_> = acked.iter().filter(|n| !seen.contains_key(n)).collect();
    let duplicates: usize = seen.values().map(|c| c - 1).sum();
    eprintln!(
        "jetstream crash test: {} acknowledged with 250, {} distinct delivered, {duplicates} duplicate deliveries after the SIGKILL of one node",
        acked.len(),
        seen.len()
    );
    assert!(complete.is_some() && lost.is_empty(), "lost after 250: {lost:?}\n{}", cluster.logs());
    // The killed node had at most queue.concurrency = 8 deliveries in flight:
    // only those can have been delivered without their ack.
    assert!(duplicates <= 8, "{duplicates} duplicates, more than node 2 had in flight\n{}", cluster.logs());
}

#[test]
fn nats_away_for_ten_seconds_means_451_and_nothing_lost() {
    let mut cluster = Cluster::new();
    cluster.add_node("");
    cluster.start(0);
    cluster.person("alice", &[]);
    cluster.person("bob", &["--allow-send"]);
    let port = cluster.nodes[0].smtp_port;
    let dir = cluster.path().to_owned();
    let send = |n: u32| -> String {
        let file = dir.join(format!("m{n}.eml"));
        std::fs::write(
            &file,
            format!("From: x@remote.example\r\nTo: alice@example.org\r\nSubject: flood {n}\r\n\r\nhello {n}\r\n"),
        )
        .unwrap();
        let out = Command::new("python3")
            .args([
                &support("smtp_send.py"),
                "127.0.0.1",
                &port.to_string(),
                "x@remote.example",
                "alice@example.org",
                file.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert!(send(1).starts_with("accepted 250"), "before the outage");

    cluster.nats.stop();
    let during = send(2);
    assert!(during.contains("451") && during.contains("4.3.0"), "while NATS is away: {during}");
    // A LATSSIAM message meanwhile stays on the home server (no 31 for what is not stored).
    let code = send_latssiam(&cluster, "bob", "bob's message during the outage");
    assert_eq!(code, latssiam::wire::Code::MessageAccepted);
    std::thread::sleep(Duration::from_secs(10));
    assert!(cluster.relayed().is_empty(), "nothing relayed while NATS is away");
    cluster.nats.resume();

    let after = wait_for(Duration::from_secs(30), || Some(send(3)).filter(|r| r.starts_with("accepted 250")));
    assert!(after.is_some(), "SMTP recovers once NATS is back:\n{}", cluster.log(0));
    let relayed = wait_for(Duration::from_secs(60), || Some(cluster.relayed()).filter(|r| !r.is_empty()));
    let relayed = relayed.unwrap_or_else(|| panic!("bob's message never left the home server:\n{}", cluster.log(0)));
    assert!(relayed[0]["data"].as_str().unwrap().contains("bob's message during the outage"), "{relayed:?}");
    let mut seen = BTreeMap::new();
    let both = wait_for(Duration::from_secs(60), || {
        seen.extend(cluster.delivered("alice"));
        (seen.contains_key(&1) && seen.contains_key(&3)).then_some(())
    });
    assert!(both.is_some(), "delivered: {seen:?}\n{}", cluster.log(0));
    assert!(!seen.contains_key(&2), "the 451'd message was not delivered");
}

/// SENDs `text` as `who` (signed) to the gateway's mailbox on the home server.
fn send_latssiam(cluster: &Cluster, who: &str, text: &str) -> latssiam::wire::Code {
    send_many(cluster, who, &[text.to_owned()])[0]
}

fn send_many(cluster: &Cluster, who: &str, texts: &[String]) -> Vec<latssiam::wire::Code> {
    let identity = std::sync::Arc::new(latssiam::Identity::load(&cluster.path().join(who)).unwrap());
    let gateway_cert = std::fs::read(cluster.path().join("node0/identity/cert.pem")).unwrap();
    let gateway_cert = latssiam::identity::certificate_from_pem_or_der(&gateway_cert).unwrap();
    let gateway_fp = cluster.nodes[0].gateway_fp.parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let addr = format!("127.0.0.1:{}", cluster.home_port).parse().unwrap();
        let pins = latssiam::tls::MemoryPins::default();
        let mut c = latssiam::client::Client::connect(addr, "localhost", Some(identity.clone()), &pins).await.unwrap();
        let mut codes = Vec::new();
        for text in texts {
            let message =
                format!("From: {who}@example.org\r\nTo: carol@mail.test\r\nSubject: {text}\r\n\r\n{text}\r\n");
            let sealed = latssiam::crypto::seal(message.as_bytes(), &gateway_cert).unwrap();
            let signature = latssiam::crypto::sign(&sealed, &identity).unwrap();
            codes.push(c.send(gateway_fp, &sealed, Some(&signature)).await.unwrap().code());
        }
        c.quit().await;
        codes
    })
}

#[test]
fn two_nodes_polling_one_mailbox_relay_each_message_once() {
    let mut cluster = Cluster::two_pollers_stopped();
    let texts: Vec<String> = (0..200).map(|i| format!("poll {i}")).collect();
    let codes = send_many(&cluster, "bob", &texts);
    assert!(codes.iter().all(|c| *c == latssiam::wire::Code::MessageAccepted), "{codes:?}");

    cluster.start(0);
    cluster.start(1);
    let relayed = wait_for(Duration::from_secs(120), || Some(cluster.relayed()).filter(|r| r.len() >= 200));
    let share: Vec<usize> = (0..2).map(|n| cluster.log(n).matches("Queued a message from LATSSIAM.").count()).collect();
    eprintln!("two pollers: node0 relayed {}, node1 {}", share[0], share[1]);
    assert!(relayed.is_some(), "relayed {} of 200\n{}", cluster.relayed().len(), cluster.logs());
    std::thread::sleep(Duration::from_secs(3));
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for r in cluster.relayed() {
        let data = r["data"].as_str().unwrap().to_owned();
        let subject = data.split("Subject: ").nth(1).and_then(|s| s.split("\r\n").next()).unwrap().to_owned();
        *counts.entry(subject).or_default() += 1;
    }
    assert_eq!(counts.len(), 200, "every message relayed");
    let twice: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "relayed more than once: {twice:?}");
}

#[test]
fn a_large_message_whose_fragments_two_nodes_took_is_joined_once() {
    let mut cluster = Cluster::two_pollers_stopped();
    // A 400 KB message as signed fragments, waiting on the home server for both pollers.
    let line = "The quarterly figures, line after line of them. ".repeat(2);
    let mut message = String::from(
        "From: bob@example.org\r\nTo: carol@mail.test\r\nSubject: the big one\r\nDate: Sun, 06 Dec 2026 10:00:00 +0000\r\n\
         Message-ID: <big@example.org>\r\n\r\n",
    );
    while message.len() < 400_000 {
        message.push_str(&line);
        message.push_str("\r\n");
    }
    let file = cluster.path().join("big.eml");
    std::fs::write(&file, &message).unwrap();
    let gateway = cluster.path().join("node0/identity/cert.pem");
    let out = ok(
        cluster.path(),
        &[
            "send",
            "--identity",
            "bob",
            "--server",
            &cluster.home(),
            "--to",
            gateway.to_str().unwrap(),
            "--pins",
            "pins",
            file.to_str().unwrap(),
        ],
    );
    assert!(out.contains("fragments)"), "{out}");
    cluster.start(0);
    cluster.start(1);
    let relayed = wait_for(Duration::from_secs(60), || Some(cluster.relayed()).filter(|r| !r.is_empty()));
    assert!(relayed.is_some(), "never relayed\n{}", cluster.logs());
    std::thread::sleep(Duration::from_secs(3));
    let relayed = cluster.relayed();
    assert_eq!(relayed.len(), 1, "joined and relayed once");
    assert!(relayed[0]["data"].as_str().unwrap().ends_with(&message), "whole, octet for octet");
    let took: Vec<usize> = (0..2).map(|n| cluster.log(n).matches("Queued a message from LATSSIAM.").count()).collect();
    assert_eq!(took.iter().sum::<usize>(), 1, "{took:?}");
}

/// Sends a signed message as `who` to the gateway (through the home server) with the `send` command.
fn send_cli(cluster: &Cluster, who: &str, to: &str, body: &str) {
    let file = format!("{who}-{}.eml", free_port());
    let message = format!(
        "From: {who}@example.org\r\nTo: {to}\r\nSubject: to the channel\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}"
    );
    std::fs::write(cluster.path().join(&file), message).unwrap();
    let (home, gateway) = (cluster.home(), cluster.nodes[0].gateway_fp.clone());
    ok(
        cluster.path(),
        &["send", "--identity", who, "--server", &home, "--to", &gateway, "--sign", "--pins", "pins", &file],
    );
}

#[test]
fn one_irc_bot_across_the_cluster_and_another_node_takes_over_when_it_dies() {
    irc_failover(common::irc::Server::Ngircd);
}

#[test]
fn one_irc_bot_across_the_cluster_and_another_node_takes_over_when_it_dies_on_inspircd() {
    irc_failover(common::irc::Server::Inspircd);
}

/// The IRC failover, against `server` (as every IRC test runs against both).
fn irc_failover(server: common::irc::Server) {
    let mut cluster = Cluster::new();
    let port = free_port();
    let _ircd = common::irc::Ircd::start(server, cluster.path(), port);
    let irc = format!(
        "[irc]\nserver = \"127.0.0.1\"\nport = {port}\nnick = \"gwbot\"\nreconnect_min_secs = 1\nreconnect_max_secs = 2\n\
         lease_secs = 6\n[[irc.channels]]\nname = \"#test\"\nnetwork = \"irc.test\"\nsubscribers = [\"bob@localhost\"]\n"
    );
    cluster.add_node(&irc);
    cluster.add_node(&irc);
    cluster.start(0);
    cluster.person("bob", &["--allow-send"]);
    cluster.add_node_identity(1);
    cluster.start(1);
    let carl = common::irc::IrcPerson::connect(port, "carl", "#test");
    // The bot is there already (in the names carl got) or joins now.
    carl.wait_heard(
        |l| (l.starts_with(":gwbot!") && l.contains("JOIN")) || (l.contains(" 353 carl ") && l.contains("gwbot")),
        "the bot in the channel",
    );
    let said = |text: &str| {
        let text = text.to_owned();
        move |l: &str| l.starts_with(":gwbot!") && l.contains(" PRIVMSG #test :") && l.contains(&text)
    };
    send_cli(&cluster, "bob", "#test@irc.test", "before the failover");
    carl.wait_heard(said("before the failover"), "the first post");
    let leaders: Vec<usize> = (0..2).filter(|&n| cluster.log(n).contains("This node holds the IRC lease")).collect();
    assert_eq!(leaders.len(), 1, "exactly one node runs the bot:\n{}", cluster.logs());
    let leader = leaders[0];
    let joins = |p: &common::irc::IrcPerson| {
        p.lines().iter().filter(|l| l.starts_with(":gwbot!") && l.contains("JOIN")).count()
    };
    let before = joins(&carl);
    assert!(before <= 1, "one bot in the channel");

    cluster.nodes[leader].process.as_mut().unwrap().signal("KILL");
    let killed = std::time::Instant::now();
    send_cli(&cluster, "bob", "#test@irc.test", "sent while the bot's node is dead");
    let back = wait_for(Duration::from_secs(40), || (joins(&carl) > before).then_some(()));
    assert!(back.is_some(), "no node took the bot over:\n{}", cluster.logs());
    let took = killed.elapsed();
    carl.wait_heard(said("sent while the bot's node is dead"), "the post sent meanwhile");
    eprintln!(
        "IRC failover: the bot was back in the channel {:.1} s after the SIGKILL (lease 6 s)",
        took.as_secs_f64()
    );
    let other = 1 - leader;
    assert!(cluster.log(other).contains("This node holds the IRC lease"), "{}", cluster.log(other));
    // Within the lease and the bot's own (re)connection: the lease's 6 s plus at most 14 s to notice, connect, register and join.
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

#[test]
fn contacts_and_the_queue_from_a_machine_with_only_the_cli_and_the_nats_url() {
    let mut cluster = Cluster::new();
    identity(cluster.path(), "alice@localhost", "alice");
    let home = cluster.home();
    let out = ok(
        cluster.path(),
        &["register", "--identity", "alice", "--server", &home, "--password", "sesame", "--pins", "pins"],
    );
    assert!(out.starts_with("10 "), "{out}");
    // No node runs, and this settings file names no data dir of a node's.
    let cli = cluster.settings_file("no-node-here", "");
    let dir = cluster.path().to_owned();
    let cli_run = |args: &[&str]| {
        let mut v = args.to_vec();
        v.extend(["--config", cli.to_str().unwrap()]);
        ok(&dir, &v)
    };
    let added = cli_run(&["contacts", "add", "--cert", "alice/cert.pem", "--email", "alice@example.org"]);
    assert!(added.starts_with("added alice@localhost"), "{added}");
    let refused = common::run(
        cluster.path(),
        &["contacts", "add", "--cert", "alice/cert.pem", "--email", "x@example.org", "--config", cli.to_str().unwrap()],
    );
    assert!(refused.status.success(), "the same contact may be changed");
    identity(cluster.path(), "mallory@localhost", "mallory");
    let taken = common::run(
        cluster.path(),
        &[
            "contacts",
            "add",
            "--cert",
            "mallory/cert.pem",
            "--email",
            "x@example.org",
            "--config",
            cli.to_str().unwrap(),
        ],
    );
    assert!(!taken.status.success(), "an alias held by another contact is refused");
    assert!(String::from_utf8_lossy(&taken.stderr).contains("already belongs to another contact"));
    cli_run(&["contacts", "add", "--cert", "alice/cert.pem", "--email", "alice@example.org"]);
    assert!(cli_run(&["contacts", "list"]).contains("alice@example.org"));
    assert!(!cluster.path().join("no-node-here").exists(), "the command line made no node's database");
    let queue = cli_run(&["queue", "list"]);
    assert!(queue.contains("0 jobs on the JetStream stream latssiam-bridge"), "{queue}");

    // A node started later knows the contact from the shared bucket, and delivers to it.
    cluster.add_node("");
    cluster.start(0);
    assert!(cluster.cli(0, &["contacts", "list"]).contains("alice@example.org"));
    let msg = cluster.path().join("m.eml");
    std::fs::write(&msg, "From: x@remote.example\r\nTo: alice@example.org\r\nSubject: flood 7\r\n\r\nhi\r\n").unwrap();
    let out = cluster.smtp_send(0, "alice@example.org", &msg);
    assert!(out.starts_with("accepted 250"), "{out}");
    let got = wait_for(Duration::from_secs(30), || cluster.delivered("alice").get(&7).copied());
    assert_eq!(got, Some(1), "{}", cluster.log(0));

    // Removed on NATS alone: the running node forgets the contact, and its mail is refused.
    assert!(cli_run(&["contacts", "remove", "alice@example.org"]).starts_with("removed "));
    let gone = wait_for(Duration::from_secs(10), || {
        (!cluster.cli(0, &["contacts", "list"]).contains("alice@example.org")).then_some(())
    });
    assert!(gone.is_some(), "the node still lists the removed contact");
    let out = cluster.smtp_send(0, "alice@example.org", &msg);
    assert!(out.contains("550"), "{out}");
}

#[test]
fn a_deferred_job_counts_its_attempts_and_expires_into_a_dead_letter_and_a_dsn() {
    let mut cluster = Cluster::new();
    cluster.add_node("lifetime_secs = 6");
    cluster.start(0);
    // Dan's server is a port where nothing listens.
    identity(cluster.path(), "dan@elsewhere.example", "dan");
    let nowhere = format!("127.0.0.1:{}", free_port());
    cluster.cli(0, &["contacts", "add", "--cert", "dan/cert.pem", "--email", "dan@example.org", "--server", &nowhere]);
    let msg = cluster.path().join("m.eml");
    std::fs::write(&msg, "From: x@remote.example\r\nTo: dan@example.org\r\nSubject: to dan\r\n\r\nhi\r\n").unwrap();
    let out = cluster.smtp_send(0, "dan@example.org", &msg);
    assert!(out.starts_with("accepted 250"), "{out}");
    // The DSN to the sender, through the smarthost, once the lifetime is over.
    let dsn = wait_for(Duration::from_secs(60), || {
        cluster.relayed().into_iter().find(|r| r["rcpt_tos"].to_string().contains("x@remote.example"))
    });
    let dsn = dsn.unwrap_or_else(|| panic!("no DSN:\n{}", cluster.log(0)));
    let data = dsn["data"].as_str().unwrap();
    assert!(data.contains("dan@example.org") && data.contains("5.4.7"), "{data}");
    let log = cluster.log(0);
    // Each attempt counted once, in order (the job is re-published with its state).
    let attempts: Vec<u32> = log
        .lines()
        .filter(|l| l.contains("Deferred."))
        .filter_map(|l| l.split("attempts=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(attempts.len() >= 2, "{log}");
    assert_eq!(attempts, (1..=attempts.len() as u32).collect::<Vec<_>>(), "{log}");
    let queue = cluster.cli(0, &["queue", "list"]);
    assert!(queue.contains("1 dead letters"), "{queue}");
    // One DSN, not one per hand-out.
    std::thread::sleep(Duration::from_secs(3));
    let dsns = cluster.relayed().iter().filter(|r| r["rcpt_tos"].to_string().contains("x@remote.example")).count();
    assert_eq!(dsns, 1);
}

/// The entries of a key-value bucket on `url`, key -> value.
fn bucket_entries(url: &str, bucket: &str) -> BTreeMap<String, Vec<u8>> {
    use futures_util::StreamExt as _;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
        let kv = js.get_key_value(bucket).await.unwrap();
        let keys: Vec<String> = kv.keys().await.unwrap().filter_map(|k| async move { k.ok() }).collect().await;
        let mut out = BTreeMap::new();
        for k in keys {
            if let Some(v) = kv.get(&k).await.unwrap() {
                out.insert(k, v.to_vec());
            }
        }
        out
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn tofu_pins_are_one_for_the_cluster() {
    let mut cluster = Cluster::new();
    cluster.add_node("");
    cluster.add_node("");
    cluster.start(0);
    // Node 0 pinned the home server on its first connection (registration), for every node.
    let home_fp = cluster._server.first_line.split_whitespace().nth(4).unwrap().to_owned();
    let key = hex(format!("localhost:{}", cluster.home_port).as_bytes());
    let pins = wait_for(Duration::from_secs(10), || {
        Some(bucket_entries(&cluster.nats.url(), "latssiam-bridge-pins")).filter(|p| p.contains_key(&key))
    });
    let pins = pins.unwrap_or_else(|| panic!("no shared pin for the home server:\n{}", cluster.log(0)));
    assert_eq!(hex(&pins[&key]), home_fp.to_ascii_lowercase().replace(':', ""), "{pins:?}");

    // A pin planted in the shared bucket (as if another node had met another
    // certificate there first) is what node 1 trusts: it refuses the home server.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(cluster.nats.url()).await.unwrap());
        let kv = js.get_key_value("latssiam-bridge-pins").await.unwrap();
        kv.put(&key, vec![7u8; 32].into()).await.unwrap();
    });
    cluster.add_node_identity(1);
    cluster.start(1);
    let refused = wait_for(Duration::from_secs(20), || cluster.log(1).contains("but 0707").then_some(()));
    assert!(refused.is_some(), "node 1 did not hold the shared pin against the server:\n{}", cluster.log(1));

    // Node 0, which pinned the real server first, is not re-pinned by the
    // planted value: it logs the conflict and goes on delivering there.
    let conflict = wait_for(Duration::from_secs(10), || cluster.log(0).contains("TOFU conflict").then_some(()));
    assert!(conflict.is_some(), "{}", cluster.log(0));
    cluster.nodes[1].process.as_mut().unwrap().signal("TERM");
    cluster.person("alice", &[]);
    let msg = cluster.path().join("m.eml");
    std::fs::write(&msg, "From: x@remote.example\r\nTo: alice@example.org\r\nSubject: flood 5\r\n\r\nhi\r\n").unwrap();
    assert!(cluster.smtp_send(0, "alice@example.org", &msg).starts_with("accepted 250"));
    let got = wait_for(Duration::from_secs(30), || cluster.delivered("alice").get(&5).copied());
    assert_eq!(got, Some(1), "{}", cluster.log(0));
    assert!(!cluster.log(0).contains("but 0707"), "{}", cluster.log(0));
}

#[test]
fn a_node_that_meets_another_certificate_than_the_first_pin_is_refused_even_before_the_mirror() {
    use latssiam::tls::PinStore as _;
    // The race of the review: node A has just pinned server S in the bucket,
    // and node B, on a path an attacker controls, meets S's "certificate"
    // before the mirror brought A's pin. B's pin is claimed with `create`
    // and loses: B's connection fails as a changed certificate, and B trusts A's.
    let cluster = Cluster::new();
    let config = cluster.settings_file("b", &format!("[home]\nserver = \"{}\"\n", cluster.home()));
    let settings = latssiam_bridge::gateway::config::Settings::load(Some(&config)).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (honest, forged) = (latssiam::Fingerprint::of(b"S"), latssiam::Fingerprint::of(b"attacker"));
    rt.block_on(async {
        let queue = std::sync::Arc::new(latssiam_bridge::gateway::queue::jetstream::connect(&settings).await.unwrap());
        let js = async_nats::jetstream::new(async_nats::connect(cluster.nats.url()).await.unwrap());
        let kv = js.get_key_value("latssiam-bridge-pins").await.unwrap();
        kv.create(hex(b"s.example:1977"), honest.as_bytes().to_vec().into()).await.unwrap();
        let db = sled::open(cluster.path().join("b-pins")).unwrap();
        let pins = latssiam_bridge::pins::SledPins::open(&db).unwrap();
        pins.share(queue);
        let e = pins.set("s.example:1977", forged).unwrap_err();
        assert!(matches!(e, latssiam::tls::TlsError::PinMismatch { .. }), "{e}");
        assert_eq!(pins.get("s.example:1977").unwrap(), Some(honest), "B trusts the first pin");
        // And a server nobody pinned yet is B's to pin, for everyone.
        pins.set("t.example:1977", forged).unwrap();
        let shared = kv.get(hex(b"t.example:1977")).await.unwrap().unwrap();
        assert_eq!(&shared[..], forged.as_bytes());
    });
}

#[test]
fn a_nats_server_that_acknowledges_before_it_fsyncs_is_warned_about() {
    const WARNING: &str = "acknowledges JetStream writes before it fsyncs them";
    let mut cluster = Cluster::new();
    cluster.add_node("");
    cluster.start(0);
    // The test's server runs with sync_interval: always, read from its /varz.
    let checked =
        wait_for(Duration::from_secs(15), || cluster.log(0).contains("fsyncs every JetStream write").then_some(()));
    assert!(checked.is_some(), "{}", cluster.log(0));
    assert!(!cluster.log(0).contains(WARNING));
    // One on NATS's default (an fsync every two minutes): a node says so at start.
    cluster.nodes[0].process.as_mut().unwrap().signal("TERM");
    cluster.nats.stop();
    let lazy = cluster.path().join("lazy");
    std::fs::create_dir_all(&lazy).unwrap();
    cluster.nats = Nats::start_syncing(&lazy, "2m");
    cluster.add_node("");
    cluster.add_node_identity(1);
    cluster.start(1);
    let warned = wait_for(Duration::from_secs(15), || cluster.log(1).contains(WARNING).then_some(()));
    assert!(warned.is_some(), "{}", cluster.log(1));
}

#[test]
fn a_record_that_does_not_decode_is_kept_as_a_dead_letter_not_dropped() {
    let mut cluster = Cluster::new();
    cluster.add_node("");
    cluster.start(0);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(cluster.nats.url()).await.unwrap());
        // A frame whose length runs past its end.
        js.publish("latssiam-bridge.jobs", b"\0\0\0\x02{x".as_slice().into()).await.unwrap().await.unwrap();
    });
    let buried = wait_for(Duration::from_secs(20), || {
        cluster.cli(0, &["queue", "list"]).contains("1 dead letters").then_some(())
    });
    assert!(buried.is_some(), "{}\n{}", cluster.cli(0, &["queue", "list"]), cluster.log(0));
    let raw = rt.block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(cluster.nats.url()).await.unwrap());
        let mut dead = js.get_stream("latssiam-bridge-dead").await.unwrap();
        let first = dead.info().await.unwrap().state.first_sequence;
        dead.get_raw_message(first).await.unwrap()
    });
    assert_eq!(&raw.payload[..], b"\0\0\0\x02{x", "kept as it came");
    let queue = cluster.cli(0, &["queue", "list"]);
    assert!(queue.contains("0 jobs on the JetStream stream"), "{queue}");
    // And the node goes on delivering.
    cluster.person("alice", &[]);
    let msg = cluster.path().join("m.eml");
    std::fs::write(&msg, "From: x@remote.example\r\nTo: alice@example.org\r\nSubject: flood 3\r\n\r\nhi\r\n").unwrap();
    assert!(cluster.smtp_send(0, "alice@example.org", &msg).starts_with("accepted 250"));
    let got = wait_for(Duration::from_secs(30), || cluster.delivered("alice").get(&3).copied());
    assert_eq!(got, Some(1), "{}", cluster.log(0));
}

#[test]
fn the_hourly_bounce_limit_is_one_for_the_cluster() {
    let mut cluster = Cluster::new();
    cluster.add_node("lifetime_secs = 3\nmax_bounces_per_hour = 1");
    cluster.add_node("lifetime_secs = 3\nmax_bounces_per_hour = 1");
    cluster.start(0);
    cluster.add_node_identity(1);
    cluster.start(1);
    identity(cluster.path(), "dan@elsewhere.example", "dan");
    let nowhere = format!("127.0.0.1:{}", free_port());
    cluster.cli(0, &["contacts", "add", "--cert", "dan/cert.pem", "--email", "dan@example.org", "--server", &nowhere]);
    let msg = cluster.path().join("m.eml");
    std::fs::write(&msg, "From: x@remote.example\r\nTo: dan@example.org\r\nSubject: to dan\r\n\r\nhi\r\n").unwrap();
    let dead = |n: usize| {
        wait_for(Duration::from_secs(60), || {
            cluster.cli(0, &["queue", "list"]).contains(&format!("{n} dead letters")).then_some(())
        })
    };
    // One failure through each node, one after the other: one report in all.
    for node in [0, 1] {
        let out = cluster.smtp_send(node, "dan@example.org", &msg);
        assert!(out.starts_with("accepted 250"), "{out}");
        assert!(dead(node + 1).is_some(), "{}", cluster.logs());
    }
    std::thread::sleep(Duration::from_secs(2));
    let dsns = cluster.relayed().iter().filter(|r| r["rcpt_tos"].to_string().contains("x@remote.example")).count();
    assert_eq!(dsns, 1, "{}", cluster.logs());
    assert!(cluster.logs().contains("over their hourly limit"), "{}", cluster.logs());
}

#[test]
fn a_stalled_latssiam_server_holds_only_its_share_of_a_node() {
    // Hostile review 2, finding 3: with the shared queue, the jobs parked for
    // a stalled destination were subtracted from what a node claimed, so one
    // black-holed server stopped every claim on every node.
    let stall = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stall_port = stall.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in stall.incoming().flatten() {
            held.push(s);
        }
    });
    let mut cluster = Cluster::new();
    cluster.add_node("destination_concurrency = 3\nconnect_timeout_secs = 600");
    cluster.start(0);
    cluster.person("alice", &[]);
    identity(cluster.path(), "stuck@stallhost", "stuck");
    let stalled = format!("127.0.0.1:{stall_port}");
    cluster
        .cli(0, &["contacts", "add", "--cert", "stuck/cert.pem", "--email", "stuck@example.org", "--server", &stalled]);
    let port = cluster.nodes[0].smtp_port;
    assert_eq!(common::rig::smtp_flood(port, "a@remote.example", "stuck@example.org", 80, 4), 80);
    std::thread::sleep(Duration::from_secs(2));
    let msg = cluster.path().join("m.eml");
    std::fs::write(&msg, "From: b@remote.example\r\nTo: alice@example.org\r\nSubject: flood 1\r\n\r\nhi\r\n").unwrap();
    assert!(cluster.smtp_send(0, "alice@example.org", &msg).starts_with("accepted 250"));
    let got = wait_for(Duration::from_secs(20), || cluster.delivered("alice").get(&1).copied());
    assert_eq!(got, Some(1), "{}", cluster.log(0));
}

#[test]
fn two_contacts_claiming_one_alias_at_once_one_wins_and_a_planted_contact_takes_no_alias() {
    use latssiam_bridge::gateway::contacts::Contact;
    // Hostile review 2, finding 11: the alias check and the write were two
    // steps, so two operators on two nodes could both take one alias; and
    // finding 5: a record written straight into the bucket took an alias
    // from the contact that held it.
    let mut cluster = Cluster::new();
    cluster.add_node("");
    cluster.start(0);
    let config = cluster.settings_file("cli", "");
    let settings = latssiam_bridge::gateway::config::Settings::load(Some(&config)).unwrap();
    let contact = |who: &str, alias: &str| {
        identity(cluster.path(), &format!("{who}@localhost"), who);
        let pem = std::fs::read(cluster.path().join(who).join("cert.pem")).unwrap();
        let der = latssiam::identity::certificate_from_pem_or_der(&pem).unwrap().to_vec();
        Contact {
            address: format!("{who}@localhost"),
            cert: der,
            email: Some(alias.to_owned()),
            allow_send: false,
            server: None,
            gone: false,
            discoverable: false,
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    for round in 0..5 {
        let alias = format!("shared{round}@example.org");
        let (a, b) = (contact(&format!("a{round}"), &alias), contact(&format!("b{round}"), &alias));
        let (ra, rb) = rt.block_on(async {
            let (qa, qb) = tokio::join!(
                latssiam_bridge::gateway::queue::jetstream::connect(&settings),
                latssiam_bridge::gateway::queue::jetstream::connect(&settings)
            );
            let (qa, qb) = (qa.unwrap(), qb.unwrap());
            let (fa, fb) = (a.fingerprint(), b.fingerprint());
            let (ra, rb) = tokio::join!(qa.share_contact(&fa, Some(&a)), qb.share_contact(&fb, Some(&b)));
            (ra.unwrap(), rb.unwrap())
        });
        assert!(ra.is_ok() != rb.is_ok(), "round {round}: exactly one wins: {ra:?} {rb:?}");
        let lost = if ra.is_ok() { rb } else { ra };
        assert!(lost.unwrap_err().contains("already belongs to another contact"));
    }
    // The race made deterministic: a claim whose contact is still being
    // written (the claim is there, the record not yet) is held, not taken
    // over as stale (both used to win, now and then).
    let late = contact("late", "inflight@example.org");
    let refused = rt.block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(cluster.nats.url()).await.unwrap());
        let aliases = js.get_key_value("latssiam-bridge-aliases").await.unwrap();
        let key: String = b"inflight@example.org".iter().map(|b| format!("{b:02x}")).collect();
        let writer = latssiam::Fingerprint::of(b"a contact being written");
        aliases.create(key, writer.to_string().into()).await.unwrap();
        let q = latssiam_bridge::gateway::queue::jetstream::connect(&settings).await.unwrap();
        q.share_contact(&late.fingerprint(), Some(&late)).await.unwrap()
    });
    assert!(refused.is_err_and(|e| e.contains("already belongs")), "a young claim is held");

    // Alice holds alice@example.org; mallory's record, written straight into
    // the bucket with her alias, does not take it from her on the node.
    cluster.person("alice", &[]);
    let mallory = contact("mallory", "alice@example.org");
    rt.block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(cluster.nats.url()).await.unwrap());
        let kv = js.get_key_value("latssiam-bridge-contacts").await.unwrap();
        let value = serde_json::to_vec(&mallory).unwrap();
        kv.put(mallory.fingerprint().to_string(), value.into()).await.unwrap();
        // And a record whose key is not its certificate's fingerprint.
        let alice_fp = latssiam::Fingerprint::of(b"not alice");
        kv.put(alice_fp.to_string(), serde_json::to_vec(&contact("eve", "eve@example.org")).unwrap().into())
            .await
            .unwrap();
    });
    let ignored = wait_for(Duration::from_secs(10), || {
        let log = cluster.log(0);
        (log.contains("not taken") && log.contains("not its key's")).then_some(())
    });
    assert!(ignored.is_some(), "{}", cluster.log(0));
    let msg = cluster.path().join("m.eml");
    std::fs::write(&msg, "From: x@remote.example\r\nTo: alice@example.org\r\nSubject: flood 2\r\n\r\nhi\r\n").unwrap();
    assert!(cluster.smtp_send(0, "alice@example.org", &msg).starts_with("accepted 250"));
    let got = wait_for(Duration::from_secs(30), || cluster.delivered("alice").get(&2).copied());
    assert_eq!(got, Some(1), "{}", cluster.log(0));
    assert!(
        !cluster.smtp_send(0, "eve@example.org", &msg).starts_with("accepted"),
        "eve's misfiled record was ignored"
    );
}

#[test]
fn a_node_with_the_embedded_home_server_is_refused_at_start() {
    // Hostile review 2, finding 6: each node's embedded server would be a
    // mailbox store of its own, answered 250 for before it was durable.
    let cluster = Cluster::new();
    let config = cluster.settings_file("embedded", "");
    let out = common::run(cluster.path(), &["run", "--config", config.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs an external home.server"), "{err}");
}

#[test]
fn a_due_time_far_ahead_is_not_obeyed_so_a_job_cannot_be_frozen() {
    use latssiam_bridge::gateway::queue::{Origin, Target};
    // Hostile review 2, finding 5: a job's due time came from the wall clock
    // of the node that wrote it (or from whoever wrote the record), and was
    // obeyed however far ahead: a node whose clock ran a day ahead froze the
    // others' jobs for a day. Now a due time beyond queue.max_retry_secs is
    // taken as due now.
    let mut cluster = Cluster::new();
    cluster.add_node("");
    cluster.person("alice", &[]);
    let pem = std::fs::read(cluster.path().join("alice/cert.pem")).unwrap();
    let fp = latssiam::Fingerprint::of(&latssiam::identity::certificate_from_pem_or_der(&pem).unwrap());
    let settings =
        latssiam_bridge::gateway::config::Settings::load(Some(&cluster.settings_file("writer", ""))).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let q = latssiam_bridge::gateway::queue::jetstream::connect(&settings).await.unwrap();
        let body = b"From: x@remote.example\r\nTo: alice@example.org\r\nSubject: flood 4\r\n\r\nhi\r\n";
        let target = Target::Latssiam { fingerprint: fp.to_string(), address: "alice@example.org".into() };
        let id = q.new_message_id().unwrap();
        q.enqueue(id, body, vec![target], &Origin::Smtp { from: "x@remote.example".into() }).await.unwrap();
        let mut claimed = q.claim(1).await.unwrap();
        let (job_id, mut job) = claimed.pop().unwrap();
        // Deferred by a node whose clock runs ten days ahead.
        job.due_ms += 10 * 24 * 3600 * 1000;
        q.defer(job_id, &job).await.unwrap();
    });
    cluster.start(0);
    let got = wait_for(Duration::from_secs(20), || cluster.delivered("alice").get(&4).copied());
    assert_eq!(got, Some(1), "{}", cluster.log(0));
}
