//! A gateway process with its smarthost (aiosmtpd) in a temporary directory.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::dns::Dns;
use super::{eml_files, files_with, free_port, identity, ok, wait_for, Process, BIN};

pub fn support(script: &str) -> String {
    format!("{}/tests/support/{script}", env!("CARGO_MANIFEST_DIR"))
}

/// Sends `n` numbered messages from `from` to `rcpt` over `sessions` SMTP
/// sessions to 127.0.0.1:`port` (`smtp_flood.py`); how many got a `250`.
pub fn smtp_flood(port: u16, from: &str, rcpt: &str, n: u32, sessions: u32) -> usize {
    let out = Command::new("python3")
        .args([&support("smtp_flood.py"), "127.0.0.1", &port.to_string(), from, rcpt])
        .args([n.to_string(), sessions.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).matches("ok ").count()
}

/// A reference server for `bobhost` on 127.0.0.1:`port` (data in `bobsrv`),
/// as a remote LATSSIAM server; a rig routes `bobhost` there with [`Rig::with_bobhost`].
pub fn bob_server(dir: &Path, port: u16) -> Process {
    let listen = format!("127.0.0.1:{port}");
    Process::start(
        dir,
        BIN,
        &["server", "--listen", &listen, "--data-dir", "bobsrv", "--host", "bobhost", "--register-password", "sesame"],
        &[("LATSSIAM_LOG", "warn")],
    )
}

/// A gateway, its smarthost and a working directory.
pub struct Rig {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub gateway: Option<Process>,
    pub _smarthost: Process,
    pub home: String,
    pub home_port: u16,
    pub http_port: u16,
    pub smtp_port: u16,
    pub gateway_fp: String,
    pub env: Vec<(&'static str, &'static str)>,
    /// The DNS server the gateway asks (every SMTP test needs one: inbound mail is authenticated).
    pub dns: Dns,
}

impl Rig {
    pub fn new(extra: &str) -> Self {
        Self::with_env(extra, &[])
    }

    /// A rig whose gateway runs with these extra environment variables.
    pub fn with_env(extra: &str, env: &[(&'static str, &'static str)]) -> Self {
        Self::with_smarthost(extra, env, "smarthost.py")
    }

    /// A rig whose smarthost is `script` (in tests/support; arguments PORT OUTDIR).
    pub fn with_smarthost(extra: &str, env: &[(&'static str, &'static str)], script: &str) -> Self {
        Self::with_all(extra, env, script, "")
    }

    /// A rig that routes `bobhost` to a reference server of its own (see
    /// [`bob_server`]), where bob@bobhost has a mailbox and is a contact with
    /// `email`; returns the rig, the server process and its `HOST:PORT`.
    pub fn with_bobhost(email: &str) -> (Self, Process, String) {
        let port = free_port();
        let rig = Self::new(&format!("[routes]\nbobhost = \"127.0.0.1:{port}\"\n"));
        let server = bob_server(rig.path(), port);
        let home = format!("localhost:{port}");
        identity(rig.path(), "bob@bobhost", "bob");
        let out = ok(
            rig.path(),
            &["register", "--identity", "bob", "--server", &home, "--password", "sesame", "--pins", "pins"],
        );
        assert!(out.starts_with("10 "), "{out}");
        rig.contact("bob", &["--email", email]);
        (rig, server, home)
    }

    /// A rig whose DNS server serves `zone` (BIND syntax).
    pub fn with_zone(extra: &str, zone: &str) -> Self {
        Self::with_all(extra, &[], "smarthost.py", zone)
    }

    fn with_all(extra: &str, env: &[(&'static str, &'static str)], script: &str, zone: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let dns = Dns::start(dir.path(), zone);
        let (smtp_port, http_port, home_port, smarthost_port) = (free_port(), free_port(), free_port(), free_port());
        let gemini_port = free_port();
        let smarthost =
            Process::start(dir.path(), "python3", &[&support(script), &smarthost_port.to_string(), "relayed"], &[]);
        assert_eq!(smarthost.first_line.trim(), "ready");
        let config = dir.path().join("gateway.toml");
        std::fs::write(
            &config,
            format!(
                r#"[gateway]
data_dir = "gw"
domains = ["example.org"]
hostname = "gw.example.org"
[home]
listen = "127.0.0.1:{home_port}"
host = "localhost"
register_password = "sesame"
accept_deadline_secs = 30
[smtp]
listen = "127.0.0.1:{smtp_port}"
[smarthost]
host = "127.0.0.1"
port = {smarthost_port}
[http]
listen = "127.0.0.1:{http_port}"
[gemini]
listen = "127.0.0.1:{gemini_port}"
[queue]
first_retry_secs = 1
max_retry_secs = 2
[dns]
nameservers = ["{nameserver}"]
timeout_secs = 1
"#,
                nameserver = dns.nameserver()
            ),
        )
        .unwrap();
        merge_settings(&config, extra);
        let mut rig = Rig {
            dir,
            config,
            gateway: None,
            _smarthost: smarthost,
            home: format!("localhost:{home_port}"),
            home_port,
            http_port,
            smtp_port,
            gateway_fp: String::new(),
            env: env.to_vec(),
            dns,
        };
        rig.start();
        rig
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The gateway's data dir (`gateway.data_dir` of its settings file).
    pub fn data_dir(&self) -> PathBuf {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let value = text.lines().find_map(|l| l.strip_prefix("data_dir = ")).unwrap().trim().trim_matches('"');
        self.path().join(value)
    }

    pub fn start(&mut self) {
        let mut env = vec![("LATSSIAM_LOG", "info")];
        env.extend_from_slice(&self.env);
        let gw = Process::start_logging(
            self.path(),
            BIN,
            &["run", "--config", self.config.to_str().unwrap()],
            &env,
            Some(&self.path().join("gateway.log")),
        );
        // "gateway FP smtp ADDR home ADDR http ADDR"
        let words: Vec<&str> = gw.first_line.split_whitespace().collect();
        assert_eq!(words.first(), Some(&"gateway"), "{}", gw.first_line);
        self.gateway_fp = words[1].to_owned();
        self.gateway = Some(gw);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path().join("gateway.log")).unwrap_or_default()
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let mut v = args.to_vec();
        v.extend(["--config", self.config.to_str().unwrap()]);
        ok(self.path(), &v)
    }

    /// A person with a mailbox on the gateway's home server; returns the fingerprint.
    pub fn person(&self, name: &str) -> String {
        let fp = identity(self.path(), &format!("{name}@localhost"), name);
        let out = ok(
            self.path(),
            &["register", "--identity", name, "--server", &self.home, "--password", "sesame", "--pins", "pins"],
        );
        assert!(out.starts_with("10 "), "{out}");
        fp
    }

    pub fn contact(&self, name: &str, extra: &[&str]) {
        let cert = format!("{name}/cert.pem");
        let mut args = vec!["contacts", "add", "--cert", &cert];
        args.extend_from_slice(extra);
        let out = self.cli(&args);
        assert!(out.starts_with("added "), "{out}");
    }

    pub fn smtp_send(&self, from: &str, rcpts: &str, message: &[u8]) -> String {
        self.smtp_send_from("127.0.0.1", from, rcpts, message)
    }

    /// As [`Rig::smtp_send`], from the client address `source` (any 127.x.y.z).
    pub fn smtp_send_from(&self, source: &str, from: &str, rcpts: &str, message: &[u8]) -> String {
        let file = self.path().join(format!("msg-{}.eml", free_port()));
        std::fs::write(&file, message).unwrap();
        let out = Command::new("python3")
            .args([
                &support("smtp_send.py"),
                "127.0.0.1",
                &self.smtp_port.to_string(),
                from,
                rcpts,
                file.to_str().unwrap(),
                "--source",
                source,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `fetch` as `who`; returns the files and what fetch printed.
    pub fn fetch(&self, who: &str, deadline: u64) -> (Vec<PathBuf>, String) {
        let out_dir = format!("{who}-inbox");
        let out = ok(
            self.path(),
            &[
                "fetch",
                "--identity",
                who,
                "--server",
                &self.home,
                "--deadline",
                &deadline.to_string(),
                "--out-dir",
                &out_dir,
                "--pins",
                "pins",
            ],
        );
        (eml_files(&self.path().join(out_dir)), out)
    }

    /// The `send` command as `who` through the home server, of `file` to `to`
    /// (a certificate file or fingerprint), with `extra` arguments; what it printed.
    pub fn send_file(&self, who: &str, to: &str, file: &str, extra: &[&str]) -> String {
        let mut args = vec!["send", "--identity", who, "--server", &self.home, "--to", to, "--pins", "pins"];
        args.extend_from_slice(extra);
        args.push(file);
        ok(self.path(), &args)
    }

    /// SENDs `message`, signed, as `who` to the gateway's mailbox on the home server.
    pub fn send_to_gateway(&self, who: &str, message: &[u8]) -> latssiam::wire::Code {
        let identity = std::sync::Arc::new(latssiam::Identity::load(&self.path().join(who)).unwrap());
        let gateway_cert = std::fs::read(self.data_dir().join("identity/cert.pem")).unwrap();
        let gateway_cert = latssiam::identity::certificate_from_pem_or_der(&gateway_cert).unwrap();
        let sealed = latssiam::crypto::seal(message, &gateway_cert).unwrap();
        let signature = latssiam::crypto::sign(&sealed, &identity).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let addr = format!("127.0.0.1:{}", self.home_port).parse().unwrap();
            let pins = latssiam::tls::MemoryPins::default();
            let mut c = latssiam::client::Client::connect(addr, "localhost", Some(identity), &pins).await.unwrap();
            let status = c.send(self.gateway_fp.parse().unwrap(), &sealed, Some(&signature)).await.unwrap();
            c.quit().await;
            status.code()
        })
    }

    /// The gateway's resident memory (VmRSS), in KiB.
    pub fn rss_kib(&self) -> u64 {
        let pid = self.gateway.as_ref().unwrap().child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// What the smarthost received, in order.
    pub fn relayed(&self) -> Vec<serde_json::Value> {
        files_with(&self.path().join("relayed"), "json")
            .iter()
            .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
            .collect()
    }

    pub fn wait_relayed(&self, n: usize) -> Vec<serde_json::Value> {
        wait_for(Duration::from_secs(30), || Some(self.relayed()).filter(|r| r.len() >= n))
            .unwrap_or_else(|| panic!("smarthost got {:?}; log:\n{}", self.relayed(), self.log()))
    }

    pub fn http_get(&self, path: &str) -> String {
        http_get(self.http_port, path)
    }

    /// Waits up to 30 s until the metric `name` is at least `n`, and returns its value then.
    pub fn wait_metric(&self, name: &str, n: u64) -> u64 {
        wait_for(Duration::from_secs(30), || Some(self.metric(name)).filter(|&v| v >= n))
            .unwrap_or_else(|| panic!("{name} stayed below {n}; log:\n{}", self.log()))
    }

    pub fn metric(&self, name: &str) -> u64 {
        let body = self.http_get("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {name} in {body}"))
    }
}

/// Adds `extra` (TOML) to the settings file: the lines of a section the file
/// already has go into it (replacing a key it has), lines before any section
/// header go into `[queue]`, other sections are appended.
fn merge_settings(config: &Path, extra: &str) {
    // A leading newline, so the first section is found like the others.
    let mut text = format!("\n{}", std::fs::read_to_string(config).unwrap());
    let mut section = String::from("[queue]");
    let mut appended = String::new();
    let mut pending: Vec<(String, String)> = Vec::new();
    for line in extra.lines() {
        if line.starts_with('[') {
            section = line.trim().to_owned();
            if !text.contains(&format!("\n{section}\n")) {
                appended.push_str(line);
                appended.push('\n');
            }
            continue;
        }
        if text.contains(&format!("\n{section}\n")) && !section.starts_with("[[") {
            pending.push((section.clone(), line.to_owned()));
        } else {
            appended.push_str(line);
            appended.push('\n');
        }
    }
    for (section, line) in pending.into_iter().rev() {
        let at = text.find(&format!("\n{section}\n")).unwrap() + section.len() + 2;
        // A key the section has already is replaced, not repeated (TOML refuses that).
        let end = text[at..].find("\n[").map_or(text.len(), |i| at + i + 1);
        let key = line.split('=').next().unwrap_or_default().trim();
        let existing =
            text[at..end].lines().find(|l| !key.is_empty() && l.split('=').next().unwrap_or_default().trim() == key);
        match existing.map(str::to_owned) {
            Some(old) => {
                let from = at + text[at..end].find(&old).unwrap();
                text.replace_range(from..from + old.len(), &line);
            }
            None => text.insert_str(at, &format!("{line}\n")),
        }
    }
    text.push_str(&appended);
    std::fs::write(config, &text[1..]).unwrap();
}

pub fn http_get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// alice (a contact allowed to send) and bob, both on the gateway's home
/// server, and alice's sendmail settings in `sendmail.toml` (bob reached
/// directly, every other address through the gateway).
pub fn sendmail_rig() -> Rig {
    let rig = Rig::new("");
    rig.person("alice");
    rig.contact("alice", &["--email", "alice@example.org", "--allow-send"]);
    rig.person("bob");
    let settings = format!(
        "identity = \"alice\"\npins = \"pins\"\ngateway = \"gw/identity/cert.pem\"\ngateway_server = \"{home}\"\n\
[recipients]\n\"bob@localhost\" = \"bob/cert.pem\"\n[routes]\nlocalhost = \"{home}\"\n",
        home = rig.home
    );
    std::fs::write(rig.path().join("sendmail.toml"), settings).unwrap();
    rig
}
