//! The gateway core: settings, the sled queue and contacts, the delivery
//! worker, the ACCEPT poller, the SMTP sink, metrics and the admin socket.
//!
//! Data flow (ARCHITECTURE.md): SMTP `DATA` -> [`sink`] -> queue (flushed,
//! then `250`) -> [`worker`] -> `SEND` to the recipient's server; the home
//! server's `ACCEPT` -> [`poller`] -> queue (flushed, then `31`) -> [`worker`]
//! -> smarthost.

pub mod admin;
pub mod auth;
pub mod config;
pub mod contact;
pub mod contacts;
pub mod db;
pub mod discovery;
pub mod hourly;
pub mod http;
pub mod irc;
pub mod irc_state;
pub mod mail;
pub mod metrics;
pub mod outbox;
pub mod poller;
pub mod queue;
pub mod sink;
mod start;
pub mod target;
pub mod worker;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bridge_smtp::smarthost::Smarthost;
use latssiam::client::{Client, Resolver};
use latssiam::wire::{Code, Password};
use latssiam::{Address, Identity};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::pins::SledPins;
use config::Settings;
use db::Store;
use metrics::Metrics;

/// The prefix of the embedded home server's trees in the gateway's database.
const HOME_TREES: &str = "home.";

/// Everything the gateway's tasks share.
pub struct Gateway {
    /// The settings it started with.
    pub settings: Settings,
    /// Contacts, pins, the IRC outbox (and the queue with the sled backend).
    pub store: Arc<Store>,
    /// The delivery queue and the IRC outbox.
    pub queue: Arc<dyn queue::JobQueue>,
    /// With several nodes on one shared queue: leases, shared fragment sets, shared counters.
    pub cluster: Option<Arc<dyn queue::Cluster>>,
    /// The gateway's LATSSIAM identity.
    pub identity: Arc<Identity>,
    /// Finds LATSSIAM servers.
    pub resolver: Resolver,
    /// TOFU pins of LATSSIAM servers.
    pub pins: SledPins,
    /// The relay for mail going out.
    pub smarthost: Smarthost,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The home server: name to pin it under, and address.
    pub home: (String, SocketAddr),
    /// Deliveries in flight per destination.
    pub destinations: worker::Destinations,
    /// Deliveries during SMTP sessions in flight per destination.
    pub in_session: worker::InSession,
    /// Failure reports per address and hour.
    pub bounces: Arc<hourly::HourlyLimit>,
    /// Messages per origin and person and day (see `gateway.max_per_origin_per_day`).
    pub origins: Arc<hourly::HourlyLimit>,
    /// Messages relayed per contact and hour.
    pub relayed: Arc<hourly::HourlyLimit>,
    /// The embedded home server's store (for WebFinger and the capsule).
    pub home_store: Option<Arc<latssiam::server::store::Store>>,
    /// The embedded home server's host and in-process delivery, with
    /// `home.local_delivery`.
    pub local: Option<(String, latssiam::server::LocalDelivery)>,
    /// Partial sets from contacts (PROFILE section 8), in the node's database.
    pub joiner: latssiam::fragment::Joiner,
    /// The last fragment the recipient's server took, per job being sent in fragments.
    pub progress: sled::Tree,
    /// SPF/DKIM/DMARC on mail coming in, DKIM signatures on mail going out.
    pub border: auth::Border,
    /// MiB of large bodies the worker may hold at once ([`worker::LARGE_BODIES_MIB`]).
    pub large_bodies: tokio::sync::Semaphore,
    pool: worker::Pool,
}

/// Loads an identity from `dir`, or makes one for `address` there.
///
/// # Errors
/// If it can neither be loaded nor made.
pub fn load_or_create_identity(dir: &Path, address: &Address, name: &str) -> Result<Identity> {
    if dir.join("cert.pem").exists() {
        return Identity::load(dir).with_context(|| format!("cannot load the identity in {}", dir.display()));
    }
    let id = Identity::generate(address, Some(name), false)?;
    id.save(dir).with_context(|| format!("cannot save an identity in {}", dir.display()))?;
    info!(fingerprint = %id.fingerprint(), dir = %dir.display(), address = %address, "Created an identity.");
    Ok(id)
}

fn smtp_tls(s: &Settings) -> Result<Arc<rustls::ServerConfig>> {
    let identity = if s.smtp.tls_cert.as_os_str().is_empty() {
        let address = Address::new("postmaster", &s.gateway.hostname)?;
        load_or_create_identity(&s.gateway.data_dir.join("smtp-tls"), &address, &s.gateway.hostname)?
    } else {
        let read = |p: &Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        Identity::from_pem(&read(&s.smtp.tls_cert)?, &read(&s.smtp.tls_key)?).context("smtp.tls_cert/tls_key")?
    };
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(vec![identity.cert_der().clone()], identity.key_der().clone_key())
        .context("smtp.tls_cert/tls_key")?;
    Ok(Arc::new(config))
}

fn irc_config(s: &Settings) -> bridge_irc::IrcConfig {
    let i = &s.irc;
    let non_empty = |v: &str| (!v.is_empty()).then(|| v.to_owned());
    bridge_irc::IrcConfig {
        server: i.server.clone(),
        port: i.port,
        tls: i.tls,
        tls_fingerprint: non_empty(&i.tls_fingerprint),
        nick: i.nick.clone(),
        alt_nicks: i.alt_nicks.clone(),
        sasl: non_empty(&i.sasl_user).map(|u| (u, i.sasl_password.clone())),
        nickserv_password: non_empty(&i.nickserv_password),
        channels: i.channels.iter().map(|c| (c.name.clone(), non_empty(&c.key))).collect(),
        burst: i.burst,
        lines_per_second: i.lines_per_second,
        ping_interval: Duration::from_secs(i.ping_interval_secs.max(5)),
        reconnect_min: Duration::from_secs(i.reconnect_min_secs.max(1)),
        reconnect_max: Duration::from_secs(i.reconnect_max_secs.max(1)),
        timeout: Duration::from_secs(i.timeout_secs.max(1)),
    }
}

fn random_password() -> Result<Password> {
    let mut bytes = [0u8; 24];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| anyhow::anyhow!("no randomness"))?;
    let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(Password::new(&text)?)
}

/// Registers the gateway's mailbox on its home server (`10`, `11` and `12` are fine).
async fn register(gw: &Gateway, password: &Password) -> Result<()> {
    let (name, addr) = &gw.home;
    let mut client = Client::connect(*addr, name, Some(Arc::clone(&gw.identity)), &gw.pins).await?;
    let status = client.register(password).await?;
    client.quit().await;
    match status.code() {
        Code::RegistrationComplete | Code::RegistrationRefused | Code::RegistrationPending => {
            info!(status = %status, "Gateway mailbox registration on the home server.");
            Ok(())
        }
        _ => bail!("the home server answered the gateway's registration with {status}"),
    }
}

/// `latssiam-bridge run`: starts everything and runs until SIGTERM/Ctrl-C.
/// Start-up is a list of named steps ([`start`]), each with its own error
/// context; then the gateway runs until `shutdown` or a queue store that
/// cannot write.
///
/// # Errors
/// Start-up failures (settings, a port in use, the data dir held by another process).
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<()> {
    settings.check_run()?;
    let tasks = tokio_util::task::TaskTracker::new();
    let state = start::open_state(&settings, &tasks, &shutdown).await.context("start-up: the gateway's state")?;
    let identity = start::identity(&settings).context("start-up: the gateway's identity")?;
    let mut routes = settings.routes.clone();
    let home = start::home_server(&settings, &state, &identity, &mut routes, &tasks, &shutdown)
        .await
        .context("start-up: the home server")?;
    let gw = start::gateway(&settings, &state, identity, &home, routes, &tasks, &shutdown)
        .context("start-up: the gateway's parts")?;
    start::register(&gw, home.password.as_ref()).await;
    // The SMTP settings are checked (and the STARTTLS identity made) before anything is bound.
    let smtp_config = start::smtp_config(&settings).context("start-up: SMTP")?;
    let listeners = start::listeners(&settings).await.context("start-up: the listeners")?;
    let smtp = start::smtp(&gw, smtp_config, listeners.smtp, &tasks, &shutdown)?;
    let http = start::monitor(&gw, listeners.http, &tasks, &shutdown)?;
    start::admin(&state, listeners.admin, &tasks, &shutdown);
    start::workers(&gw, &tasks, &shutdown);
    start::poller(&gw, &tasks, &shutdown);
    start::irc(&gw, &tasks, &shutdown);
    let gemini = start::gemini(&gw, &home, &tasks, &shutdown).await.context("start-up: the Gemini capsule")?;
    let webfinger = start::webfinger(&gw, listeners.public, &tasks, &shutdown)?;
    let line = format!("smtp {smtp} home {} http {http}{gemini}{webfinger}", gw.home.1);
    // One line on stdout for scripts and tests.
    println!("gateway {} {line}", gw.identity.fingerprint());
    info!(smtp_addr = %smtp, home = %gw.home.1, http_addr = %http, fingerprint = %gw.identity.fingerprint(), "Gateway running.");
    tasks.close();
    let store = Arc::clone(&state.store);
    tokio::select! {
        () = shutdown.cancelled() => info!("Shutdown requested; finishing work in flight."),
        () = store.failed.notified() => {
            // Everything still answers 451 or leaves messages on the home
            // server meanwhile: nothing unstored is acknowledged.
            tracing::error!(error = store.broken().unwrap_or_default(), "The queue store cannot write; stopping so that a restart opens it anew.");
            shutdown.cancel();
        }
    }
    if tokio::time::timeout(Duration::from_secs(30), tasks.wait()).await.is_err() {
        warn!("Some tasks did not finish within 30 s; their jobs stay queued.");
    }
    let _ = std::fs::remove_file(settings.admin_socket());
    drop((gw, state, home));
    if let Some(e) = store.broken() {
        bail!("the queue store failed ({e}); start the gateway again once the disk has room: sled does not recover from a write error while it runs");
    }
    Ok(())
}

/// Warns when the NATS server does not fsync every JetStream write: it then
/// acknowledges a publish (and so our `250`) up to `sync_interval` (two
/// minutes by default) before the write is on disk, and a power cut loses
/// it. Read from the monitoring endpoint's `/varz`, where reachable.
async fn warn_unless_nats_syncs(varz: String) {
    let body = match tokio::time::timeout(Duration::from_secs(10), discovery::get(&varz)).await {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => {
            return info!(error = %e, "Cannot read the NATS server's /varz; its sync_interval is not checked.")
        }
        Err(_) => return info!(%varz, "No answer from the NATS server's /varz; its sync_interval is not checked."),
    };
    let varz: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let config = &varz["jetstream"]["config"];
    if config["sync_always"].as_bool() != Some(true) {
        warn!(
            sync_interval_secs = config["sync_interval"].as_u64().unwrap_or_default() / 1_000_000_000,
            "The NATS server acknowledges JetStream writes before it fsyncs them (no `jetstream {{ sync_interval: \
             always }}`): a power cut can lose mail the gateway answered 250 for."
        );
    } else {
        info!("The NATS server fsyncs every JetStream write before it acknowledges it.");
    }
}
