//! IRC for the tests: a real IRC server (Debian's ngircd, or InspIRCd 3
//! with its IRCv3 modules, from `tests/support/inspircd.conf`) on a
//! loopback port, and a person on it: a raw connection that answers PINGs
//! and records every line it hears.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::wait_for;

/// A person on IRC.
pub struct IrcPerson {
    pub stream: TcpStream,
    heard: Arc<Mutex<Vec<String>>>,
}

impl IrcPerson {
    /// Connects to 127.0.0.1:`port` as `nick`, joins `channel` and waits for its names.
    pub fn connect(port: u16, nick: &str, channel: &str) -> Self {
        Self::connect_with(port, nick, channel, &[])
    }

    /// As [`IrcPerson::connect`], asking for IRCv3 `caps` (granted where the server has them).
    pub fn connect_with(port: u16, nick: &str, channel: &str, caps: &[&str]) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let heard = Arc::new(Mutex::new(Vec::new()));
        let (reader, mut writer) = (stream.try_clone().unwrap(), stream.try_clone().unwrap());
        let h = Arc::clone(&heard);
        std::thread::spawn(move || {
            for line in BufReader::new(reader).split(b'\n') {
                let Ok(line) = line else { return };
                let line = String::from_utf8_lossy(&line).trim_end().to_owned();
                if let Some(arg) = line.strip_prefix("PING ") {
                    let _ = writer.write_all(format!("PONG {arg}\r\n").as_bytes());
                }
                h.lock().unwrap().push(line);
            }
        });
        let mut p = Self { stream, heard };
        if !caps.is_empty() {
            p.send(&format!("CAP LS 302\r\nCAP REQ :{}\r\nCAP END\r\n", caps.join(" ")));
        }
        // InspIRCd takes a JOIN only once registration is complete (451 before).
        p.send(&format!("NICK {nick}\r\nUSER {nick} 0 * :{nick}\r\n"));
        p.wait_heard(|l| untagged(l).split(' ').nth(1) == Some("001"), "the welcome");
        p.send(&format!("JOIN {channel}\r\n"));
        p.wait_heard(|l| l.contains(" 366 "), "end of NAMES");
        p
    }

    /// Sends raw IRC text.
    pub fn send(&mut self, text: &str) {
        self.stream.write_all(text.as_bytes()).unwrap();
    }

    /// Every line heard so far.
    pub fn lines(&self) -> Vec<String> {
        self.heard.lock().unwrap().clone()
    }

    /// Waits up to a minute for a line `f` accepts.
    pub fn wait_heard(&self, f: impl Fn(&str) -> bool, what: &str) -> String {
        wait_for(Duration::from_secs(60), || self.lines().into_iter().find(|l| f(l)))
            .unwrap_or_else(|| panic!("never heard {what}: {:#?}", self.lines()))
    }
}

/// `line` without its IRCv3 tags.
pub fn untagged(line: &str) -> &str {
    match line.strip_prefix('@') {
        Some(rest) => rest.split_once(' ').map_or("", |(_, l)| l),
        None => line,
    }
}

/// Which IRC server a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// Debian's ngircd: no IRCv3 beyond `multi-prefix`.
    Ngircd,
    /// Debian's InspIRCd 3 with server-time, message-tags, msgid and echo-message.
    Inspircd,
}

/// An IRC server process on `port`; killed when dropped.
pub struct Ircd {
    child: Child,
}

impl Ircd {
    /// Starts `server` on `port`, its files in `dir`.
    pub fn start(server: Server, dir: &Path, port: u16) -> Self {
        let ircd = match server {
            Server::Ngircd => Self::ngircd(dir, port),
            Server::Inspircd => Self::inspircd(dir, port),
        };
        wait_for(Duration::from_secs(10), || TcpStream::connect(("127.0.0.1", port)).ok())
            .unwrap_or_else(|| panic!("{server:?} did not start"));
        ircd
    }

    fn inspircd(dir: &Path, port: u16) -> Self {
        let template = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/inspircd.conf"))
            .expect("tests/support/inspircd.conf");
        let conf = dir.join("inspircd.conf");
        std::fs::write(&conf, template.replace("@PORT@", &port.to_string()).replace("@DIR@", dir.to_str().unwrap()))
            .unwrap();
        std::fs::write(dir.join("inspircd.motd"), "latssiam-bridge tests\n").unwrap();
        let bin = if Path::new("/usr/sbin/inspircd").exists() { "/usr/sbin/inspircd" } else { "inspircd" };
        let child = Command::new(bin)
            .args(["--config", conf.to_str().unwrap(), "--nofork", "--nopid", "--runasroot"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("inspircd must be installed (apt-get install inspircd)");
        Self { child }
    }
}

impl Drop for Ircd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Ircd {
    fn ngircd(dir: &Path, port: u16) -> Self {
        let conf = dir.join("ngircd.conf");
        std::fs::write(
            &conf,
            format!(
                "[Global]\nName = irc.test\nInfo = test\nListen = 127.0.0.1\nPorts = {port}\n\
                 [Limits]\nMaxNickLength = 30\nPingTimeout = 120\nPongTimeout = 20\nMaxConnectionsIP = 0\n\
                 [Options]\nDNS = no\nIdent = no\nPAM = no\nRequireAuthPing = no\n"
            ),
        )
        .unwrap();
        let bin = if Path::new("/usr/sbin/ngircd").exists() { "/usr/sbin/ngircd" } else { "ngircd" };
        let child = Command::new(bin)
            .args(["-n", "-f", conf.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ngircd must be installed (apt-get install ngircd)");
        Self { child }
    }
}
