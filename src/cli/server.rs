//! `latssiam-bridge server`: run the reference LATSSIAM server, and the
//! operator's commands on its data directory.
//!
//! Settings come from the embedded defaults, then `--config FILE` (TOML, keys
//! as in `config/server.toml`), then `LATSSIAM_SERVER__<KEY>` environment
//! variables, then command-line flags. Unknown keys stop start-up.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use latssiam::server::store::{MailboxState, Store};
use latssiam::server::{Rate, Server, ServerConfig};
use latssiam::wire::Password;
use latssiam::{identity::CertInfo, Address, Fingerprint};
use latssiam_bridge::gateway::load_or_create_identity;
use serde::Deserialize;
use tracing::info;

const DEFAULTS: &str = include_str!("../../config/server.toml");

#[derive(Args)]
pub struct ServerArgs {
    #[command(subcommand)]
    action: Option<ServerAction>,
    #[command(flatten)]
    options: ServerOptions,
}

impl ServerArgs {
    /// Whether this runs the server (not one of its operator commands).
    pub fn serves(&self) -> bool {
        self.action.is_none()
    }
}

#[derive(Args, Clone, Default)]
pub struct ServerOptions {
    /// A TOML file of settings (see config/server.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Where mailboxes are kept.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// The server's identity directory (created on first start if missing).
    #[arg(long)]
    identity: Option<PathBuf>,
    /// The host name the server answers for.
    #[arg(long)]
    host: Option<String>,
    /// Also serve the mailboxes' certificates over Gemini here (the paths
    /// their LATSSIAM URLs name), e.g. 0.0.0.0:1965.
    #[arg(long, value_name = "ADDR:PORT")]
    gemini_listen: Option<SocketAddr>,
    /// The pre-shared registration password.
    #[arg(long)]
    register_password: Option<String>,
    /// Registrations wait for `server approve`.
    #[arg(long)]
    require_approval: bool,
    /// Senders must sign their messages.
    #[arg(long)]
    require_signature: bool,
}

#[derive(Subcommand)]
enum ServerAction {
    /// List mailboxes: address, fingerprint, state, messages waiting.
    Mailboxes,
    /// Approve a pending registration.
    Approve {
        /// The owner's fingerprint.
        fingerprint: Fingerprint,
    },
    /// Mark a mailbox as moved: senders get `35 Mailbox moved HOST`.
    Move {
        /// The owner's fingerprint.
        fingerprint: Fingerprint,
        /// The new host.
        host: String,
    },
}

/// The server's settings file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    listen: SocketAddr,
    data_dir: PathBuf,
    identity: Option<PathBuf>,
    host: String,
    gemini_listen: String,
    domains: Vec<String>,
    register_password: Option<String>,
    require_approval: bool,
    require_signature: bool,
    allowed_senders: Vec<String>,
    max_connections: usize,
    max_connections_per_client: usize,
    idle_timeout_secs: u64,
    max_accept_deadline_secs: u64,
    max_unread_per_sender: u32,
    max_unread_per_mailbox: u32,
    max_message_octets: usize,
    min_free_mb: u64,
    send_rate_per_second: f64,
    send_burst: f64,
    empty_accept_rate_per_second: f64,
    empty_accept_burst: f64,
}

fn settings(opts: &ServerOptions) -> Result<Settings> {
    let mut builder = config::Config::builder().add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
    if let Some(file) = &opts.config {
        builder = builder.add_source(config::File::from(file.as_path()).format(config::FileFormat::Toml));
    }
    builder = builder.add_source(config::Environment::with_prefix("LATSSIAM_SERVER").separator("__"));
    let mut s: Settings = builder.build().and_then(config::Config::try_deserialize).context("bad server settings")?;
    if let Some(v) = opts.listen {
        s.listen = v;
    }
    if let Some(v) = &opts.data_dir {
        s.data_dir = v.clone();
    }
    if let Some(v) = &opts.identity {
        s.identity = Some(v.clone());
    }
    if let Some(v) = &opts.host {
        s.host = v.clone();
    }
    if let Some(v) = opts.gemini_listen {
        s.gemini_listen = v.to_string();
    }
    if let Some(v) = &opts.register_password {
        s.register_password = Some(v.clone());
    }
    s.require_approval |= opts.require_approval;
    s.require_signature |= opts.require_signature;
    if s.host.is_empty() {
        s.host = identity_host(&s.identity_dir())?.unwrap_or_else(|| "localhost".to_owned());
    }
    Ok(s)
}

/// The host of the identity in `dir`, if there is one there.
fn identity_host(dir: &Path) -> Result<Option<String>> {
    let cert = dir.join("cert.pem");
    if !cert.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(&cert).with_context(|| format!("cannot read {}", cert.display()))?;
    let der = latssiam::identity::certificate_from_pem_or_der(&bytes)?;
    let info = latssiam::identity::CertInfo::from_der(&der)?;
    Ok(info.address.map(|a| a.host().to_owned()))
}

impl Settings {
    fn server_config(&self) -> Result<ServerConfig> {
        if !latssiam::identity::is_dns_name(&self.host) {
            bail!("host: {:?} is not a DNS name", self.host);
        }
        if self.max_message_octets > latssiam::wire::MAX_BLOCK_DER {
            bail!("max_message_octets: at most {} (400 lines of base64)", latssiam::wire::MAX_BLOCK_DER);
        }
        let register_password = match self.register_password.as_deref().filter(|p| !p.is_empty()) {
            Some(p) => Some(
                Password::new(p)
                    .context("register_password: 1-54 printable ASCII characters, not starting with a space")?,
            ),
            None => None,
        };
        let mut c = ServerConfig::new(&self.host, &self.data_dir);
        c.listen = self.listen;
        c.domains = self.domains.clone();
        c.register_password = register_password;
        c.require_approval = self.require_approval;
        c.require_signature = self.require_signature;
        if !self.allowed_senders.is_empty() {
            let parsed = self
                .allowed_senders
                .iter()
                .map(|f| f.parse::<Fingerprint>().with_context(|| format!("allowed_senders: {f:?}")))
                .collect::<Result<HashSet<_>>>()?;
            c.allowed_senders = Some(parsed);
        }
        c.max_connections = self.max_connections;
        c.max_connections_per_client = self.max_connections_per_client;
        c.idle_timeout = Duration::from_secs(self.idle_timeout_secs);
        c.max_accept_deadline = Duration::from_secs(self.max_accept_deadline_secs);
        c.max_unread_per_sender = self.max_unread_per_sender;
        c.max_unread_per_mailbox = self.max_unread_per_mailbox;
        c.max_message_octets = self.max_message_octets;
        c.min_free = self.min_free_mb.saturating_mul(1 << 20);
        c.send_rate = Rate { per_second: self.send_rate_per_second, burst: self.send_burst };
        c.empty_accept_rate = Rate { per_second: self.empty_accept_rate_per_second, burst: self.empty_accept_burst };
        Ok(c)
    }

    fn identity_dir(&self) -> PathBuf {
        self.identity.clone().unwrap_or_else(|| self.data_dir.join("identity"))
    }
}

fn open_store(data_dir: &Path) -> Result<Arc<Store>> {
    Store::open(data_dir).with_context(|| {
        format!(
            "cannot open {} (if the server is running, stop it first: the store admits one process)",
            data_dir.display()
        )
    })
}

pub fn run(args: ServerArgs) -> Result<()> {
    let s = settings(&args.options)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start tokio")?;
    match args.action {
        None => runtime.block_on(serve(&s)),
        Some(action) => runtime.block_on(operate(&s, action)),
    }
}

async fn serve(s: &Settings) -> Result<()> {
    let config = s.server_config()?;
    latssiam::files::private_umask();
    latssiam::files::private_data_dir(&s.data_dir)
        .with_context(|| format!("cannot create {}", s.data_dir.display()))?;
    // Generated as server@host on first start.
    let address = Address::new("server", &s.host)?;
    let identity = Arc::new(load_or_create_identity(&s.identity_dir(), &address, &s.host)?);
    let fingerprint = identity.fingerprint();
    let store = open_store(&s.data_dir)?;
    let server = Server::with_store(config, Arc::clone(&identity), Arc::clone(&store))?;
    if !s.gemini_listen.is_empty() {
        let addr: SocketAddr =
            s.gemini_listen.parse().with_context(|| format!("gemini_listen {:?}", s.gemini_listen))?;
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("gemini_listen {addr}"))?;
        let capsule =
            latssiam_bridge::gateway::discovery::Capsule { store: Some(store), own: Vec::new(), pastes: None };
        let tls = latssiam::gemini::server_tls(&identity).context("gemini_listen: TLS")?;
        let local = listener.local_addr().context("gemini listener")?;
        info!(%local, "Gemini capsule serving the mailboxes' certificates.");
        tokio::spawn(latssiam::gemini::serve(
            listener,
            tls,
            Arc::new(capsule),
            Default::default(),
            server.shutdown_token(),
        ));
    }
    let listener = server.bind().await?;
    let local = listener.local_addr().context("listener address")?;
    let token = server.shutdown_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("Shutdown requested; finishing in-flight exchanges.");
        token.cancel();
    });
    // One line on stdout, for scripts and tests: where it listens and who it is.
    println!("listening on {local} as {fingerprint}");
    info!(%local, %fingerprint, "LATSSIAM server listening.");
    server.serve(listener).await;
    info!("Server stopped.");
    Ok(())
}

pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn operate(s: &Settings, action: ServerAction) -> Result<()> {
    let store = open_store(&s.data_dir)?;
    match action {
        ServerAction::Mailboxes => {
            println!("{:<40} {:<64} {:<20} waiting", "address", "fingerprint", "state");
            for (fp, mailbox, waiting) in store.list()? {
                let address = CertInfo::from_der(&mailbox.owner_cert)
                    .ok()
                    .and_then(|i| i.address)
                    .map_or_else(|| "(none)".to_owned(), |a| a.to_string());
                println!("{address:<40} {fp} {:<20} {waiting}", mailbox.state.name());
            }
        }
        ServerAction::Approve { fingerprint } => {
            let Some(mailbox) = store.mailbox(&fingerprint)? else {
                bail!("no mailbox {fingerprint}");
            };
            if mailbox.state != MailboxState::Pending {
                bail!("mailbox {fingerprint} is {}, not pending", mailbox.state.name());
            }
            store.set_state(&fingerprint, MailboxState::Active).await?;
            println!("approved {fingerprint}");
        }
        ServerAction::Move { fingerprint, host } => {
            if !latssiam::identity::is_dns_name(&host) || latssiam::wire::Status::moved(&host).is_err() {
                bail!("{host:?} is not a host name that fits a status line");
            }
            if !store.set_state(&fingerprint, MailboxState::Moved(host.clone())).await? {
                bail!("no mailbox {fingerprint}");
            }
            println!("{fingerprint} moved to {host}");
        }
    }
    Ok(())
}
