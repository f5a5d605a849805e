//! A private Postfix instance in a temporary directory (Debian's `postfix`
//! package, started with `postfix -c DIR`): its own config, queue and data
//! directories, SMTP on one loopback port, nothing else. A system Postfix on
//! port 25, running or not, is left alone: nothing here reads or writes
//! /etc/postfix (but the package's own postfix-files), /var/spool/postfix or
//! /var/lib/postfix.
//!
//! example.org as in docker/: Bob has a Maildir (virtual(8)), the people of
//! `latssiam` go to the gateway through the "latssiam" transport of
//! docker/postfix/master.cf with docker/postfix/latssiam_status.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::common::wait_for;

pub const POSTFIX: &str = "/usr/sbin/postfix";

pub struct Postfix {
    pub root: tempfile::TempDir,
    pub port: u16,
}

impl Postfix {
    /// Why a private instance cannot run here, if it cannot.
    pub fn unavailable() -> Option<String> {
        if !Path::new(POSTFIX).exists() {
            return Some(format!("{POSTFIX} is missing (apt-get install postfix)"));
        }
        // The master process must start as root (it drops to mail_owner).
        let uid =
            Command::new("id").arg("-u").output().ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
        if uid.as_deref() != Some("0") {
            return Some("a Postfix instance needs root to start".to_owned());
        }
        None
    }

    /// Starts an instance whose smtpd listens on 127.0.0.1:`port`; `latssiam` lists the
    /// addresses sent to the gateway at 127.0.0.1:`gateway_port`.
    pub fn start(port: u16, gateway_port: u16, latssiam: &[&str]) -> Self {
        let root = tempfile::Builder::new().prefix("postfix-").tempdir().unwrap();
        let r = root.path();
        set_mode(r, 0o755);
        let (etc, spool, data, mail, tables) =
            (r.join("etc"), r.join("spool"), r.join("data"), r.join("mail"), r.join("etc/tables"));
        for d in [&etc, &spool, &data, &mail, &tables] {
            std::fs::create_dir_all(d).unwrap();
            set_mode(d, 0o755);
        }
        // data_directory belongs to mail_owner, as post-install makes /var/lib/postfix.
        let (uid, gid) = (id("-u", "postfix"), id("-g", "postfix"));
        std::os::unix::fs::chown(&data, Some(uid), Some(gid)).unwrap();
        // Bob's mail is delivered as nobody.
        let (nobody, nogroup) = (id("-u", "nobody"), id("-g", "nobody"));
        std::os::unix::fs::chown(&mail, Some(nobody), Some(nogroup)).unwrap();

        let docker = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/postfix");
        std::fs::copy(docker.join("latssiam_status"), etc.join("latssiam_status")).unwrap();
        std::fs::write(tables.join("vmailbox"), "bob@example.org\texample.org/bob/\n").unwrap();
        std::fs::write(tables.join("virtual"), "postmaster@example.org\tbob@example.org\n").unwrap();
        let people: String = latssiam.iter().map(|a| format!("{a}\tlatssiam:[127.0.0.1]:{gateway_port}\n")).collect();
        std::fs::write(tables.join("latssiam"), people).unwrap();
        let (etc_s, t) = (etc.display().to_string(), tables.display());
        std::fs::write(
            etc.join("main.cf"),
            format!(
                "compatibility_level = 3.6\n\
                 queue_directory = {spool}\n\
                 data_directory = {data}\n\
                 mail_owner = postfix\n\
                 setgid_group = postdrop\n\
                 syslog_name = postfix-latssiam-test\n\
                 maillog_file = {log}\n\
                 maillog_file_prefixes = {root}\n\
                 myhostname = mail.example.org\n\
                 mydomain = example.org\n\
                 myorigin = $mydomain\n\
                 inet_interfaces = 127.0.0.1\n\
                 inet_protocols = ipv4\n\
                 mynetworks = 127.0.0.0/8\n\
                 mydestination =\n\
                 alias_maps =\n\
                 alias_database =\n\
                 local_recipient_maps =\n\
                 local_transport = error:5.1.1 no local delivery\n\
                 virtual_mailbox_domains = example.org\n\
                 virtual_mailbox_base = {mail}\n\
                 virtual_uid_maps = static:{nobody}\n\
                 virtual_gid_maps = static:{nogroup}\n\
                 virtual_alias_maps = texthash:{t}/virtual\n\
                 virtual_mailbox_maps = texthash:{t}/vmailbox, texthash:{t}/latssiam\n\
                 transport_maps = texthash:{t}/latssiam\n\
                 smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n\
                 smtpd_recipient_restrictions =\n\
                 smtp_tls_security_level = may\n\
                 latssiam_destination_recipient_limit = 100\n\
                 queue_run_delay = 1s\n\
                 minimal_backoff_time = 1s\n\
                 maximal_backoff_time = 2s\n",
                spool = spool.display(),
                data = data.display(),
                log = r.join("maillog").display(),
                root = r.display(),
                mail = mail.display(),
            ),
        )
        .unwrap();
        // docker/postfix/master.cf without its two smtpd listeners, and one of our own.
        let shipped = std::fs::read_to_string(docker.join("master.cf")).unwrap();
        let services = &shipped[shipped.find("\npickup").unwrap() + 1..];
        let services = services.replace("/etc/postfix/latssiam_status", &format!("{etc_s}/latssiam_status"));
        std::fs::write(etc.join("master.cf"), format!("127.0.0.1:{port} inet n - n - - smtpd\n{services}")).unwrap();

        let pf = Self { root, port };
        let out = pf.postfix(&["start"]);
        if !out.status.success() {
            // Before its log is open, postfix(1) reports only to syslog, or to a terminal.
            let tty = Command::new("script")
                .args(["-qc", &format!("{POSTFIX} -c {etc_s} check"), "/dev/null"])
                .stdin(Stdio::null())
                .output()
                .map(|o| text(&o))
                .unwrap_or_default();
            panic!("postfix -c {etc_s} start failed:\n{}{tty}{}", text(&out), pf.log());
        }
        wait_for(Duration::from_secs(20), || std::net::TcpStream::connect(("127.0.0.1", port)).ok())
            .unwrap_or_else(|| panic!("the private Postfix does not listen on {port}:\n{}", pf.log()));
        pf
    }

    pub fn config_dir(&self) -> PathBuf {
        self.root.path().join("etc")
    }

    /// `postfix -c DIR ARGS`.
    pub fn postfix(&self, args: &[&str]) -> Output {
        self.command(POSTFIX, args)
    }

    /// `postqueue -c DIR -p`.
    pub fn queue(&self) -> String {
        text(&self.command("/usr/sbin/postqueue", &["-p"]))
    }

    /// `postqueue -c DIR -f`: deliver what is deferred now.
    pub fn flush(&self) {
        let out = self.command("/usr/sbin/postqueue", &["-f"]);
        assert!(out.status.success(), "postqueue -f: {}", text(&out));
    }

    fn command(&self, program: &str, args: &[&str]) -> Output {
        Command::new(program).arg("-c").arg(self.config_dir()).args(args).stdin(Stdio::null()).output().unwrap()
    }

    /// The instance's log (maillog_file).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("maillog")).unwrap_or_default()
    }

    /// Bob's Maildir, one string per message, oldest first.
    pub fn bob_mail(&self) -> Vec<String> {
        let dir = self.root.path().join("mail/example.org/bob/new");
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(dir).into_iter().flatten().filter_map(|e| Some(e.ok()?.path())).collect();
        files.sort();
        files.iter().filter_map(|p| std::fs::read_to_string(p).ok()).collect()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let pid_file = self.root.path().join("spool/pid/master.pid");
        let pid = std::fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse::<u32>().ok());
        let _ = self.postfix(&["stop"]);
        // Wait for the master (and so its children) to go before the directory does.
        if let Some(pid) = pid {
            let gone =
                wait_for(Duration::from_secs(10), || (!Path::new(&format!("/proc/{pid}")).exists()).then_some(()));
            if gone.is_none() {
                let _ = self.postfix(&["abort"]);
                let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            }
        }
    }
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn set_mode(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
}

/// `id FLAG USER` as a number.
fn id(flag: &str, user: &str) -> u32 {
    let out = Command::new("id").args([flag, user]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or_else(|_| panic!("no user {user}: {}", text(&out)))
}
