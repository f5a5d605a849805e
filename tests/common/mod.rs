//! Helpers shared by the end-to-end tests: the built binary, child processes
//! that are killed when dropped, identities, free ports.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod dns;
pub mod irc;
pub mod mail;
pub mod nats;
pub mod rig;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_latssiam-bridge");

pub fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN).args(args).current_dir(dir).stdin(Stdio::null()).output().unwrap()
}

pub fn ok(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A child process, killed when dropped, with the first line it printed.
pub struct Process {
    pub child: Child,
    pub first_line: String,
}

impl Process {
    /// Starts `program args` in `dir` and waits for its first line on stdout.
    pub fn start(dir: &Path, program: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_logging(dir, program, args, env, None)
    }

    /// As [`Process::start`], appending stderr to `log` if given.
    pub fn start_logging(dir: &Path, program: &str, args: &[&str], env: &[(&str, &str)], log: Option<&Path>) -> Self {
        let stderr = match log {
            Some(p) => Stdio::from(std::fs::OpenOptions::new().create(true).append(true).open(p).unwrap()),
            None => Stdio::inherit(),
        };
        let mut child = Command::new(program)
            .args(args)
            .current_dir(dir)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let mut first_line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut first_line).unwrap();
        if first_line.is_empty() {
            let log = log.and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default();
            panic!(
                "{program} {args:?} exited without a word{}",
                if log.is_empty() { String::new() } else { format!(":\n{log}") }
            );
        }
        Self { child, first_line }
    }

    /// Sends a signal by name and waits for the exit.
    pub fn signal(&mut self, sig: &str) -> std::process::ExitStatus {
        Command::new("kill").args(["-s", sig, &self.child.id().to_string()]).status().unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A new identity in `dir/out`; returns its fingerprint.
pub fn identity(dir: &Path, address: &str, out: &str) -> String {
    ok(dir, &["identity", "new", "--address", address, "--out", out]).trim().to_owned()
}

/// The `.eml` files in `dir`, sorted.
pub fn eml_files(dir: &Path) -> Vec<PathBuf> {
    files_with(dir, "eml")
}

/// The files in `dir` with extension `ext`, sorted.
pub fn files_with(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|r| r.map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == ext)).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// A port that was free a moment ago, and never handed out before by this
/// test process (the kernel may give the same ephemeral port twice in a row
/// once the probing socket is closed, and a rig asks for several at once).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut given = GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Polls `f` every 50 ms until it returns Some, for at most `limit`.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A tmpfs of `size` at a new temporary directory, unmounted when dropped;
/// `None` where mounting is not allowed (not root).
pub struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    pub fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(Self(dir))
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// Fills the disk with one file; returns its path.
    pub fn fill(&self) -> std::path::PathBuf {
        let path = self.0.path().join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 64 * 1024];
        while std::io::Write::write_all(&mut f, &block).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// strace attached to every thread of a running process, writing its
/// `fdatasync`, `fsync` and `sync_file_range` calls (with `-y`, each names
/// its file) to a file; detached when dropped.
pub struct SyncTrace {
    strace: Child,
    file: PathBuf,
}

/// What a [`SyncTrace`] saw.
pub struct SyncCalls {
    pub text: String,
}

impl SyncCalls {
    /// Whether an fdatasync of a file whose path holds `within` and ends
    /// with `suffix` returned 0. With `-f`, a call that another thread's
    /// call interrupts in the trace is written as `PID fdatasync(FD<path>
    /// <unfinished ...>` when it starts and `PID <... fdatasync resumed>) = 0`
    /// when it returns: only the second says it is done.
    pub fn synced(&self, within: &str, suffix: &str) -> bool {
        let names = |l: &str| l.contains(within) && l.contains(&format!("{suffix}>"));
        let mut started = std::collections::HashSet::new();
        for line in self.text.lines() {
            let (pid, call) = line.split_once(' ').unwrap_or(("", line));
            let call = call.trim_start();
            if call.starts_with("fdatasync(") && names(call) {
                if call.ends_with("<unfinished ...>") {
                    started.insert(pid);
                } else if call.ends_with("= 0") {
                    return true;
                }
            } else if call.starts_with("<... fdatasync resumed>") && call.ends_with("= 0") && started.contains(pid) {
                return true;
            }
        }
        false
    }
}

impl SyncTrace {
    /// Attaches to `pid`, writing to `file`; `None`, having said `SKIPPED`
    /// and why, if this machine cannot watch a process's system calls (the
    /// caller skips).
    pub fn attach(pid: u32, file: &Path) -> Option<Self> {
        let unavailable = match Command::new("strace").args(["-qq", "-o", "/dev/null", "true"]).output() {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(format!("strace cannot trace here: {}", String::from_utf8_lossy(&o.stderr).trim())),
            Err(e) => Some(format!("no strace: {e}")),
        };
        if let Some(why) = unavailable {
            eprintln!("SKIPPED: {why}");
            return None;
        }
        let strace = Command::new("strace")
            .args(["-f", "-qq", "-y", "-e", "trace=fdatasync,fsync,sync_file_range", "-o"])
            .arg(file)
            .args(["-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let trace = Self { strace, file: file.to_owned() };
        wait_for(Duration::from_secs(20), || all_threads_traced(pid).then_some(()))
            .expect("strace did not attach to every thread");
        Some(trace)
    }

    /// The calls so far: a call that returned before the process answered
    /// has its line (or its `resumed` line) in it.
    pub fn calls(&self) -> SyncCalls {
        SyncCalls { text: std::fs::read_to_string(&self.file).unwrap_or_default() }
    }
}

impl Drop for SyncTrace {
    fn drop(&mut self) {
        let _ = self.strace.kill();
        let _ = self.strace.wait();
    }
}

/// Whether every thread of `pid` is being traced.
fn all_threads_traced(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("status"))
            .is_ok_and(|s| s.lines().any(|l| l.strip_prefix("TracerPid:").is_some_and(|v| v.trim() != "0")))
    })
}
