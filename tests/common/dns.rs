//! A real authoritative DNS server on loopback for the tests
//! (tests/support/dns_server.py, dnslib): zones from BIND-style text,
//! NXDOMAIN for every name it does not hold, stoppable and restartable on
//! the same port.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use super::rig::support;
use super::Process;

/// The DNS server of one test.
pub struct Dns {
    zone: PathBuf,
    address: String,
    dir: PathBuf,
    /// Its UDP and TCP port on 127.0.0.1.
    pub port: u16,
    process: Option<Process>,
}

impl Dns {
    /// Serves `zone` (BIND syntax; may be empty: everything is NXDOMAIN).
    pub fn start(dir: &Path, zone: &str) -> Self {
        Self::start_on(dir, zone, "127.0.0.1")
    }

    /// As [`Dns::start`], listening on `address` (e.g. the host's, for containers).
    pub fn start_on(dir: &Path, zone: &str, address: &str) -> Self {
        let zone_file = dir.join(format!("zone-{}.txt", super::free_port()));
        std::fs::write(&zone_file, zone).unwrap();
        let mut dns = Dns {
            zone: zone_file,
            address: address.to_owned(),
            dir: dir.to_path_buf(),
            // A port no other part of the test is handed (the kernel's own
            // pick could be one the rig has chosen but not bound yet).
            port: super::free_port(),
            process: None,
        };
        dns.run();
        dns
    }

    fn run(&mut self) {
        let port = self.port.to_string();
        let zone = self.zone.to_str().unwrap().to_owned();
        let args = [&support("dns_server.py"), "--zone", &zone, "--port", &port, "--address", &self.address];
        let p = Process::start(&self.dir, "python3", &args, &[]);
        let words: Vec<&str> = p.first_line.split_whitespace().collect();
        assert_eq!(words.first(), Some(&"ready"), "{}", p.first_line);
        self.port = words[1].parse().unwrap();
        self.process = Some(p);
    }

    /// "ADDRESS:PORT", for `[dns] nameservers`.
    pub fn nameserver(&self) -> String {
        format!("{}:{}", self.address, self.port)
    }

    /// Stops answering (the port is closed).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.signal("TERM");
        }
    }

    /// Answers again, on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }
}
