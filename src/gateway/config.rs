//! The gateway's settings: `config/default.toml` (embedded), then the file
//! given by `--config`, then `LATSSIAM_BRIDGE__SECTION__KEY` variables.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

const DEFAULTS: &str = include_str!("../../config/default.toml");

/// All settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub gateway: GatewaySettings,
    pub home: HomeSettings,
    pub smtp: SmtpSettings,
    pub smarthost: SmarthostSettings,
    pub http: HttpSettings,
    pub gemini: GeminiSettings,
    pub queue: QueueSettings,
    pub relay: RelaySettings,
    pub irc: IrcSettings,
    pub auth: AuthSettings,
    pub dns: DnsSettings,
    #[serde(default)]
    pub dkim: Vec<DkimKeySettings>,
    pub routes: HashMap<String, String>,
}

/// Inbound email authentication (`[auth]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub verify: bool,
    pub trusted_networks: Vec<String>,
    pub trusted_authserv_ids: Vec<String>,
    pub subject_tag: String,
}

/// DNS for MX/A discovery and authentication (`[dns]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSettings {
    pub nameservers: Vec<String>,
    pub timeout_secs: u64,
}

/// One DKIM signing key (`[[dkim]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimKeySettings {
    pub domain: String,
    pub selector: String,
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IrcSettings {
    pub server: String,
    pub port: u16,
    pub tls: bool,
    pub tls_fingerprint: String,
    pub nick: String,
    pub alt_nicks: Vec<String>,
    pub sasl_user: String,
    pub sasl_password: String,
    pub nickserv_password: String,
    pub burst: f64,
    pub lines_per_second: f64,
    pub ping_interval_secs: u64,
    pub reconnect_min_secs: u64,
    pub reconnect_max_secs: u64,
    pub max_lines: usize,
    pub paste_days: u64,
    pub line_format: String,
    pub zero_width_names: bool,
    pub private_messages_per_minute: u32,
    pub timeout_secs: u64,
    pub lease_secs: u64,
    pub channels: Vec<IrcChannel>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IrcChannel {
    pub name: String,
    #[serde(default)]
    pub key: String,
    pub network: String,
    #[serde(default)]
    pub subscribers: Vec<String>,
    #[serde(default)]
    pub digest_window: u64,
    #[serde(default)]
    pub relay_joins: bool,
}

impl IrcSettings {
    /// The channel bridged as `#name@network`, if any.
    pub fn channel(&self, name: &str, network: &str) -> Option<&IrcChannel> {
        self.channels.iter().find(|c| c.name.eq_ignore_ascii_case(name) && c.network.eq_ignore_ascii_case(network))
    }

    /// Whether `host` is the network of a bridged channel.
    pub fn is_network(&self, host: &str) -> bool {
        !self.server.is_empty() && self.channels.iter().any(|c| c.network.eq_ignore_ascii_case(host))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySettings {
    pub data_dir: PathBuf,
    pub domains: Vec<String>,
    pub hostname: String,
    pub log_format: LogFormat,
    pub max_per_origin_per_day: u32,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HomeSettings {
    pub server: String,
    pub listen: SocketAddr,
    pub host: String,
    pub register_password: String,
    pub accept_deadline_secs: u64,
    pub local_delivery: bool,
    pub max_unread_per_sender: u32,
    pub max_unread_per_mailbox: u32,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Oversize {
    /// Cut into PROFILE section 8 fragments (up to `smtp.max_message_size`).
    Fragment,
    Reject,
    StripAttachments,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpSettings {
    pub listen: SocketAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub max_recipients: usize,
    pub command_timeout_secs: u64,
    pub data_timeout_secs: u64,
    pub min_data_rate: u64,
    pub data_memory_mib: usize,
    pub max_connections: usize,
    pub oversize: Oversize,
    pub max_message_size: usize,
    pub max_connections_per_client: usize,
    pub client_connection_rate_limit: u32,
    pub client_message_rate_limit: u32,
    pub client_recipient_rate_limit: u32,
    pub limit_exempt: Vec<String>,
    pub junk_command_limit: u32,
    pub max_session_secs: u64,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Security {
    None,
    Starttls,
    Tls,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmarthostSettings {
    pub host: String,
    pub port: u16,
    pub security: Security,
    pub username: String,
    pub password: String,
    pub accept_invalid_certs: bool,
    pub timeout_secs: u64,
    pub max_connections: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub listen: SocketAddr,
    /// Empty: off.
    pub public_listen: String,
    pub lookups_per_minute: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeminiSettings {
    /// Empty: off.
    pub listen: String,
    pub requests_per_minute: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSettings {
    pub first_retry_secs: u64,
    pub max_retry_secs: u64,
    pub lifetime_secs: u64,
    pub concurrency: usize,
    pub destination_concurrency: usize,
    pub deliver_in_session: bool,
    pub connect_timeout_secs: u64,
    pub max_bounces_per_hour: u32,
    pub min_free_mb: u64,
    pub backend: QueueBackend,
    pub nats_url: String,
    pub stream: String,
    pub nats_user: String,
    pub nats_password: String,
    pub nats_token: String,
    pub nats_tls_ca: PathBuf,
    pub nats_creds: PathBuf,
    pub nats_tls_cert: PathBuf,
    pub nats_tls_key: PathBuf,
    pub allow_insecure: bool,
    pub nats_monitor_url: String,
    pub nats_replicas: usize,
    pub ack_wait_secs: u64,
}

/// Where the queue lives.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QueueBackend {
    /// In the gateway's own sled database (one node).
    Sled,
    /// On NATS JetStream, shared by every node that names the same stream.
    Jetstream,
}

/// What LATSSIAM contacts may send out through the gateway.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySettings {
    pub from_mismatch: FromMismatch,
    pub max_recipients: usize,
    pub messages_per_hour: u32,
}

/// What to do with a contact's message whose `From:`/`Sender:` is not theirs.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FromMismatch {
    /// Refuse it (`52`) and tell the sender why.
    Reject,
    /// Send it with `From:` set to the contact's address, the original moved to `Reply-To:`.
    Rewrite,
}

/// A secret that may be read from a file named by an environment variable.
enum Secret {
    Register,
    Smarthost,
    Sasl,
    NatsPassword,
    NatsToken,
}

/// The secret whose file the environment variable `var` names, if any.
fn secret_key(var: &str) -> Option<Secret> {
    match var {
        "LATSSIAM_BRIDGE__HOME__REGISTER_PASSWORD_FILE" => Some(Secret::Register),
        "LATSSIAM_BRIDGE__SMARTHOST__PASSWORD_FILE" => Some(Secret::Smarthost),
        "LATSSIAM_BRIDGE__IRC__SASL_PASSWORD_FILE" => Some(Secret::Sasl),
        "LATSSIAM_BRIDGE__QUEUE__NATS_PASSWORD_FILE" => Some(Secret::NatsPassword),
        "LATSSIAM_BRIDGE__QUEUE__NATS_TOKEN_FILE" => Some(Secret::NatsToken),
        _ => None,
    }
}

/// The largest `smtp.max_message_size`: PROFILE section 8's default limit on
/// a joined message, which receivers apply (a larger message would be
/// accepted here and refused by every receiver).
pub const MAX_MESSAGE_SIZE: usize = latssiam::fragment::MAX_JOINED;

impl Settings {
    /// Loads the settings: defaults, then `file`, then the environment.
    ///
    /// # Errors
    /// A message naming the file or key that is wrong.
    pub fn load(file: Option<&Path>) -> Result<Self> {
        let mut builder =
            config::Config::builder().add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(file) = file {
            if !file.is_file() {
                bail!("--config {}: no such file", file.display());
            }
            builder = builder.add_source(config::File::from(file).format(config::FileFormat::Toml));
        }
        // The variables that name a secret's file are read here, not by `config`.
        let (files, env): (Vec<_>, Vec<_>) = std::env::vars().partition(|(k, _)| secret_key(k).is_some());
        builder = builder.add_source(
            config::Environment::with_prefix("LATSSIAM_BRIDGE")
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("gateway.domains")
                .with_list_parse_key("dns.nameservers")
                .with_list_parse_key("auth.trusted_networks")
                .with_list_parse_key("auth.trusted_authserv_ids")
                .try_parsing(true)
                .source(Some(env.into_iter().collect())),
        );
        let mut s: Settings = builder.build().and_then(config::Config::try_deserialize).context("bad settings")?;
        for (var, path) in files {
            let secret = std::fs::read_to_string(&path).with_context(|| format!("{var}: cannot read {path}"))?;
            let secret = secret.strip_suffix('\n').map_or(&*secret, |s| s.strip_suffix('\r').unwrap_or(s)).to_owned();
            match secret_key(&var) {
                Some(Secret::Register) => s.home.register_password = secret,
                Some(Secret::Smarthost) => s.smarthost.password = secret,
                Some(Secret::Sasl) => s.irc.sasl_password = secret,
                Some(Secret::NatsPassword) => s.queue.nats_password = secret,
                Some(Secret::NatsToken) => s.queue.nats_token = secret,
                None => {}
            }
        }
        if s.home.host.is_empty() {
            s.home.host = s.gateway.domains.first().cloned().unwrap_or_default();
        }
        s.check()?;
        Ok(s)
    }

    /// Where `home.register_password` came from, for the start-up message.
    pub fn register_password_source() -> &'static str {
        if std::env::var_os("LATSSIAM_BRIDGE__HOME__REGISTER_PASSWORD_FILE").is_some() {
            "the file named by LATSSIAM_BRIDGE__HOME__REGISTER_PASSWORD_FILE"
        } else if std::env::var_os("LATSSIAM_BRIDGE__HOME__REGISTER_PASSWORD").is_some() {
            "LATSSIAM_BRIDGE__HOME__REGISTER_PASSWORD"
        } else {
            "home.register_password"
        }
    }

    fn check(&self) -> Result<()> {
        if self.gateway.domains.is_empty() {
            bail!("gateway.domains: at least one mail domain is needed");
        }
        for d in &self.gateway.domains {
            if !latssiam::identity::is_dns_name(d) {
                bail!("gateway.domains: {d:?} is not a domain name");
            }
        }
        self.smtp_limit_exempt()?;
        if self.queue.destination_concurrency == 0 {
            bail!("queue.destination_concurrency: must be at least 1");
        }
        if !latssiam::identity::is_dns_name(&self.gateway.hostname) {
            bail!("gateway.hostname: {:?} is not a host name", self.gateway.hostname);
        }
        if !latssiam::identity::is_dns_name(&self.home.host) {
            bail!("home.host: {:?} is not a host name", self.home.host);
        }
        if self.smtp.tls_cert.as_os_str().is_empty() != self.smtp.tls_key.as_os_str().is_empty() {
            bail!("smtp.tls_cert and smtp.tls_key go together");
        }
        if self.queue.first_retry_secs == 0 || self.queue.max_retry_secs < self.queue.first_retry_secs {
            bail!("queue.first_retry_secs must be at least 1 and at most queue.max_retry_secs");
        }
        if self.queue.backend == QueueBackend::Jetstream {
            let valid = !self.queue.stream.is_empty()
                && self.queue.stream.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !valid {
                bail!("queue.stream: {:?} is not a stream name (letters, digits, - and _)", self.queue.stream);
            }
            self.check_nats()?;
        }
        for ns in &self.dns.nameservers {
            if ns.parse::<std::net::SocketAddr>().is_err() {
                bail!("dns.nameservers: {ns:?} is not IP:PORT");
            }
        }
        if self.dns.timeout_secs == 0 {
            bail!("dns.timeout_secs: at least 1");
        }
        for k in &self.dkim {
            if !latssiam::identity::is_dns_name(&k.domain)
                || k.selector.is_empty()
                || !k.selector.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                bail!(
                    "dkim: domain {:?} and selector {:?} must be a domain name and a DNS label",
                    k.domain,
                    k.selector
                );
            }
        }
        if !(1000..=MAX_MESSAGE_SIZE).contains(&self.smtp.max_message_size) {
            bail!("smtp.max_message_size: between 1000 and {MAX_MESSAGE_SIZE} octets");
        }
        if self.queue.concurrency == 0 {
            bail!("queue.concurrency: at least 1");
        }
        for c in &self.irc.channels {
            if !c.name.starts_with(['#', '&']) || c.name.contains([' ', ',', '\x07']) {
                bail!("irc.channels: {:?} is not a channel name", c.name);
            }
            if !latssiam::identity::is_dns_name(&c.network) {
                bail!("irc.channels: network {:?} of {} is not a host name", c.network, c.name);
            }
        }
        if !self.irc.server.is_empty() && (self.irc.lines_per_second <= 0.0 || self.irc.burst < 1.0) {
            bail!("irc.lines_per_second must be positive and irc.burst at least 1");
        }
        for (key, v) in [("http.public_listen", &self.http.public_listen), ("gemini.listen", &self.gemini.listen)] {
            if !v.is_empty() && v.parse::<SocketAddr>().is_err() {
                bail!("{key}: {v:?} is not an address:port");
            }
        }
        if !self.home.register_password.is_empty()
            && latssiam::wire::Password::new(&self.home.register_password).is_err()
        {
            bail!("home.register_password: 1-54 printable ASCII characters, not starting with a space");
        }
        Ok(())
    }

    /// The networks `smtp.limit_exempt` names.
    pub fn smtp_limit_exempt(&self) -> Result<Vec<(std::net::IpAddr, u8)>> {
        self.smtp
            .limit_exempt
            .iter()
            .map(|n| bridge_smtp::listener::parse_network(n).map_err(|e| anyhow::anyhow!("smtp.limit_exempt: {e}")))
            .collect()
    }

    /// Where the gateway's own state (queue, contacts, pins) lives.
    pub fn queue_dir(&self) -> PathBuf {
        self.gateway.data_dir.join("queue")
    }

    /// The admin socket of a running gateway.
    pub fn admin_socket(&self) -> PathBuf {
        self.gateway.data_dir.join("admin.sock")
    }

    /// The DNS servers of `[dns]` (empty: the system's).
    pub fn nameservers(&self) -> Vec<std::net::SocketAddr> {
        self.dns.nameservers.iter().filter_map(|n| n.parse().ok()).collect()
    }

    /// What `run` needs beyond [`Settings::load`]'s checks (the command line
    /// may name a JetStream queue without a home server; a node may not).
    ///
    /// # Errors
    /// A message naming the keys that do not go together.
    pub fn check_run(&self) -> Result<()> {
        // Each node's embedded server would be a mailbox store of its own
        // (mail landing or bouncing by which node took it), and its
        // in-process delivery is made durable by the sled queue's fsync,
        // which this backend does not run before its 250.
        if self.queue.backend == QueueBackend::Jetstream && self.home.server.is_empty() {
            bail!(
                "queue.backend = \"jetstream\" needs an external home.server: the embedded home server is one \
                 node's and is not made durable before a JetStream 250"
            );
        }
        Ok(())
    }

    /// The NATS settings of the JetStream queue: whoever can write to the
    /// account controls the gateway (its contacts, pins and jobs), so a
    /// server off this host needs credentials and TLS unless
    /// `queue.allow_insecure` says the network is trusted otherwise.
    fn check_nats(&self) -> Result<()> {
        let q = &self.queue;
        let servers = nats_servers(&q.nats_url);
        if servers.is_empty() || servers.iter().any(|(_, host)| host.is_empty()) {
            bail!("queue.nats_url: {:?} names no host", q.nats_url);
        }
        if q.nats_tls_cert.as_os_str().is_empty() != q.nats_tls_key.as_os_str().is_empty() {
            bail!("queue.nats_tls_cert and queue.nats_tls_key go together");
        }
        let loopback = servers.iter().all(|(_, host)| {
            host.eq_ignore_ascii_case("localhost")
                || host.parse::<std::net::IpAddr>().is_ok_and(|ip| match ip {
                    std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(v6.is_loopback(), |v4| v4.is_loopback()),
                    v4 => v4.is_loopback(),
                })
        });
        // user:password@ or token@ in the URL itself count as credentials.
        let in_url = q.nats_url.split(',').all(|u| u.split_once("://").map_or(u, |(_, r)| r).contains('@'));
        let credentials = in_url
            || !q.nats_user.is_empty()
            || !q.nats_token.is_empty()
            || !q.nats_creds.as_os_str().is_empty()
            || !q.nats_tls_cert.as_os_str().is_empty();
        let tls = servers.iter().all(|(scheme, _)| scheme.eq_ignore_ascii_case("tls"))
            || !q.nats_tls_ca.as_os_str().is_empty();
        if !(loopback || q.allow_insecure || credentials && tls) {
            bail!(
                "queue.nats_url {}: a NATS server off this host needs credentials (nats_user, nats_token, \
                 nats_creds or a client certificate) and TLS (tls:// or nats_tls_ca), since whoever writes \
                 to its account controls the gateway; queue.allow_insecure = true if the network is trusted",
                q.nats_url
            );
        }
        Ok(())
    }

    /// Where the NATS server's monitoring `/varz` is: `queue.nats_monitor_url`,
    /// or port 8222 on the host of `queue.nats_url`.
    pub fn nats_varz(&self) -> String {
        let q = &self.queue;
        if !q.nats_monitor_url.is_empty() {
            return format!("{}/varz", q.nats_monitor_url.trim_end_matches('/'));
        }
        let host = nats_servers(&q.nats_url).into_iter().next().map(|(_, h)| h).unwrap_or_default();
        let host = if host.contains(':') { format!("[{host}]") } else { host.to_owned() };
        format!("http://{host}:8222/varz")
    }

    /// Whether `domain` is one the gateway answers for.
    pub fn is_local_domain(&self, domain: &str) -> bool {
        self.gateway.domains.iter().any(|d| d.eq_ignore_ascii_case(domain))
    }
}

/// The servers of a NATS URL list (`nats://u:p@host:4222,tls://other`): scheme and host.
fn nats_servers(urls: &str) -> Vec<(&str, &str)> {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|url| {
            let (scheme, rest) = url.split_once("://").unwrap_or(("nats", url));
            let rest = rest.split('/').next().unwrap_or_default();
            let hostport = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
            let host = match hostport.strip_prefix('[').and_then(|h| h.split_once(']')) {
                Some((h, _)) => h,
                None => hostport.rsplit_once(':').map_or(hostport, |(h, _)| h),
            };
            (scheme, host)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load_and_unknown_keys_are_named() {
        let s = Settings::load(None).unwrap();
        assert_eq!(s.smtp.oversize, Oversize::Fragment);
        assert_eq!(s.smtp.max_message_size, 10_240_000);
        assert_eq!(s.queue.first_retry_secs, 300);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[smtp]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n").unwrap();
        let e = format!("{:#}", Settings::load(Some(&f)).unwrap_err());
        assert!(e.contains("bogus"), "{e}");
        std::fs::write(&f, "[smtp]\noversize = \"shrink\"\n").unwrap();
        let e = format!("{:#}", Settings::load(Some(&f)).unwrap_err());
        assert!(e.contains("oversize") || e.contains("shrink"), "{e}");
        std::fs::write(&f, "[routes]\n\"h.example\" = \"127.0.0.1:5\"\n[queue]\nfirst_retry_secs = 2\n").unwrap();
        let s = Settings::load(Some(&f)).unwrap();
        assert_eq!(s.routes.get("h.example").map(String::as_str), Some("127.0.0.1:5"));
        assert_eq!(s.queue.first_retry_secs, 2);
    }

    fn jetstream(extra: &str) -> Result<Settings> {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, format!("[queue]\nbackend = \"jetstream\"\n{extra}")).unwrap();
        Settings::load(Some(&f))
    }

    #[test]
    fn jetstream_needs_an_external_home_server() {
        let e = format!("{:#}", jetstream("").unwrap().check_run().unwrap_err());
        assert!(e.contains("home.server"), "{e}");
        jetstream("[home]\nserver = \"home.example\"\n").unwrap().check_run().unwrap();
        Settings::load(None).unwrap().check_run().unwrap();
    }

    #[test]
    fn a_nats_server_off_this_host_needs_credentials_and_tls() {
        let home = "[home]\nserver = \"home.example\"\n";
        for url in ["nats://10.0.0.5:4222", "nats://nats.internal", "tls://nats.internal:4222"] {
            let e = format!("{:#}", jetstream(&format!("nats_url = \"{url}\"\n{home}")).unwrap_err());
            assert!(e.contains("allow_insecure"), "{url}: {e}");
        }
        // Credentials without TLS are not enough off the host.
        let e = jetstream(&format!("nats_url = \"nats://10.0.0.5\"\nnats_user = \"u\"\n{home}")).unwrap_err();
        assert!(format!("{e:#}").contains("TLS"), "{e:#}");
        for ok in [
            "nats_url = \"nats://127.0.0.1:4222\"\n",
            "nats_url = \"nats://localhost:4222\"\n",
            "nats_url = \"nats://[::1]:4222\"\n",
            "nats_url = \"tls://nats.internal:4222\"\nnats_creds = \"/etc/gw.creds\"\n",
            "nats_url = \"nats://nats.internal\"\nnats_tls_ca = \"/ca.pem\"\nnats_token = \"t\"\n",
            "nats_url = \"nats://10.0.0.5:4222\"\nallow_insecure = true\n",
            "nats_url = \"tls://gw:secret@nats.internal:4222\"\n",
            "nats_url = \"nats://[::ffff:127.0.0.1]:4222\"\n",
        ] {
            jetstream(&format!("{ok}{home}")).unwrap_or_else(|e| panic!("{ok}: {e:#}"));
        }
    }

    #[test]
    fn the_monitoring_url_follows_the_nats_host() {
        let s = jetstream("nats_url = \"nats://u:p@127.0.0.1:4222\"\n[home]\nserver = \"h.example\"\n").unwrap();
        assert_eq!(s.nats_varz(), "http://127.0.0.1:8222/varz");
        let s = jetstream("nats_monitor_url = \"http://127.0.0.1:9/\"\n[home]\nserver = \"h.example\"\n").unwrap();
        assert_eq!(s.nats_varz(), "http://127.0.0.1:9/varz");
    }
}
