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
pub mod contacts;
pub mod db;
pub mod discovery;
pub mod hourly;
pub mod http;
pub mod irc;
pub mod mail;
pub mod metrics;
pub mod outbox;
pub mod poller;
pub mod queue;
pub mod sink;
pub mod worker;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bridge_smtp::smarthost::{Security as SmarthostSecurity, Smarthost, SmarthostConfig};
use bridge_smtp::ListenerConfig;
use latssiam::client::{split_host_port, Client, Resolver};
use latssiam::server::{Server, ServerConfig};
use latssiam::wire::{Code, Password};
use latssiam::{Address, Identity};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::pins::SledPins;
use config::{Security, Settings};
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
    /// The delivery queue.
    pub queue: queue::Queue,
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
///
/// # Errors
/// Start-up failures (settings, a port in use, the data dir held by another process).
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<()> {
    settings.check_run()?;
    let data_dir = settings.gateway.data_dir.clone();
    latssiam::files::private_umask();
    latssiam::files::private_data_dir(&data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
    let min_free = settings.queue.min_free_mb.saturating_mul(1 << 20);
    let store = Store::open_keeping(&settings.queue_dir(), min_free).with_context(|| {
        format!("cannot open the queue in {} (is another gateway running on it?)", settings.queue_dir().display())
    })?;
    let pins = SledPins::open(store.db())?;
    let tasks = tokio_util::task::TaskTracker::new();
    let queue = match settings.queue.backend {
        config::QueueBackend::Sled => queue::Queue::Sled(Arc::clone(&store)),
        config::QueueBackend::Jetstream => {
            let shared = Arc::new(queue::jetstream::connect(&settings).await?);
            tasks.spawn(warn_unless_nats_syncs(settings.nats_varz()));
            store.share_state(Arc::clone(&shared));
            pins.share(Arc::clone(&shared));
            shared
                .mirror(Arc::clone(&store), pins.clone(), shutdown.clone())
                .await
                .context("cannot read the shared contacts, subscriptions and pins")?;
            queue::Queue::JetStream(shared)
        }
    };
    let mut routes = settings.routes.clone();

    // The gateway's identity lives on its home server's host.
    let home_host = if settings.home.server.is_empty() {
        settings.home.host.clone()
    } else {
        split_host_port(&settings.home.server).0.to_owned()
    };
    let gateway_address = Address::new("gateway", &home_host)?;
    let identity = Arc::new(load_or_create_identity(&data_dir.join("identity"), &gateway_address, "latssiam-bridge")?);

    // The home server: configured, or embedded.
    let mut local = None;
    let mut home_store = None;
    // The Gemini capsule presents the embedded home server's identity (the
    // host's server), or the gateway's when the home server is elsewhere.
    let mut capsule_identity = Arc::clone(&identity);
    let (home_addr, password) = if settings.home.server.is_empty() {
        let host = home_host.clone();
        let server_address = Address::new("server", &host)?;
        let server_id = load_or_create_identity(&data_dir.join("home/identity"), &server_address, &host)?;
        let password = match settings.home.register_password.as_str() {
            "" => random_password()?,
            p => Password::new(p)?,
        };
        let mut config = ServerConfig::new(&host, data_dir.join("home"));
        config.listen = settings.home.listen;
        config.register_password = Some(password.clone());
        config.max_unread_per_sender = settings.home.max_unread_per_sender;
        config.max_unread_per_mailbox = settings.home.max_unread_per_mailbox;
        config.min_free = min_free;
        // The gateway delivers everything for its people here: it is not rate-limited.
        config.rate_exempt.insert(identity.fingerprint());
        // The home server keeps its mailboxes in the gateway's database, so
        // that one fsync covers a message's SMTP `250` and its `31` alike. A
        // data dir from before this kept them in a database of their own in
        // home/: that one stays in use while it holds the mailboxes.
        let legacy = data_dir.join("home/conf").exists()
            && store.db().open_tree(format!("{HOME_TREES}mailboxes")).map(|t| t.is_empty()).unwrap_or(false);
        let store_of_home = if legacy {
            info!("The embedded home server keeps its own database in home/ (made by an earlier version).");
            latssiam::server::store::Store::open(&data_dir.join("home"))
        } else {
            latssiam::server::store::Store::in_db(store.db().clone(), store.flusher(), HOME_TREES)
        }
        .context("cannot open the embedded home server's store")?;
        home_store = Some(Arc::clone(&store_of_home));
        capsule_identity = Arc::new(server_id);
        let server = Server::with_store(config, Arc::clone(&capsule_identity), store_of_home)
            .context("cannot start the embedded home server")?;
        // In-process delivery makes the mailbox write durable with the
        // gateway's fsync: only when both live in one database.
        if settings.home.local_delivery && !legacy {
            local = Some((host.to_ascii_lowercase(), server.local_delivery()));
        }
        let listener = server.bind().await.with_context(|| format!("home.listen {}", settings.home.listen))?;
        let addr = listener.local_addr()?;
        let token = server.shutdown_token();
        let stop = shutdown.clone();
        tasks.spawn(async move {
            stop.cancelled().await;
            token.cancel();
        });
        tasks.spawn(server.serve(listener));
        routes.entry(host.to_ascii_lowercase()).or_insert_with(|| addr.to_string());
        if settings.home.register_password.is_empty() {
            info!(%addr, "The embedded home server serves {host}; no home.register_password is set, so only the gateway registers there (a random password each start).");
        } else {
            info!(
                %addr,
                password = Settings::register_password_source(),
                "People register their mailboxes on the embedded home server as NAME@{host}, with the password from {}.",
                Settings::register_password_source()
            );
        }
        (addr, Some(password))
    } else {
        let candidates = Resolver::new(routes.clone()).resolve_server(&settings.home.server).await;
        let addr = candidates
            .with_context(|| format!("home.server {}", settings.home.server))?
            .first()
            .map(|(_, a)| *a)
            .with_context(|| format!("home.server: no address for {}", settings.home.server))?;
        let password = match settings.home.register_password.as_str() {
            "" => None,
            p => Some(Password::new(p)?),
        };
        (addr, password)
    };

    let sh = &settings.smarthost;
    let smarthost = Smarthost::new(&SmarthostConfig {
        host: sh.host.clone(),
        port: sh.port,
        security: match sh.security {
            Security::None => SmarthostSecurity::None,
            Security::Starttls => SmarthostSecurity::StartTls,
            Security::Tls => SmarthostSecurity::Tls,
        },
        credentials: (!sh.username.is_empty()).then(|| (sh.username.clone(), sh.password.clone())),
        hello_name: settings.gateway.hostname.clone(),
        accept_invalid_certs: sh.accept_invalid_certs,
        timeout: Duration::from_secs(sh.timeout_secs),
        max_connections: sh.max_connections,
    })
    .map_err(|e| anyhow::anyhow!("smarthost: {e}"))?;

    let joiner = latssiam::fragment::Joiner::new(
        store.db().open_tree("partials")?,
        settings.smtp.max_message_size + latssiam::fragment::TRACE_ROOM,
    );
    let progress = store.db().open_tree("fragment_progress")?;
    // One DNS resolver (and its cache) for MX/A discovery and authentication.
    let dns = latssiam::client::dns_resolver(&settings.nameservers(), Duration::from_secs(settings.dns.timeout_secs))
        .map_err(|e| anyhow::anyhow!("dns.nameservers: {e}"))?;
    let metrics = Arc::new(Metrics::default());
    let border = auth::Border::new(&settings, dns.clone(), Arc::clone(&metrics)).map_err(|e| anyhow::anyhow!(e))?;
    // Counted across restarts, and with the shared queue across nodes.
    let counter: Option<Arc<dyn hourly::SharedCounter>> = match &queue {
        queue::Queue::JetStream(q) => Some(Arc::clone(q) as Arc<dyn hourly::SharedCounter>),
        queue::Queue::Sled(_) => None,
    };
    let bounces = Arc::new(hourly::HourlyLimit::open(store.db(), "bounces", counter.clone())?);
    let relayed = Arc::new(hourly::HourlyLimit::open(store.db(), "relayed", counter.clone())?);
    let origins =
        Arc::new(hourly::HourlyLimit::open(store.db(), "origins", counter)?.per(Duration::from_secs(24 * 3600)));
    tasks.spawn(Arc::clone(&origins).sweep(shutdown.clone()));
    tasks.spawn(Arc::clone(&bounces).sweep(shutdown.clone()));
    tasks.spawn(Arc::clone(&relayed).sweep(shutdown.clone()));
    let gw = Arc::new(Gateway {
        joiner,
        progress,
        border,
        large_bodies: tokio::sync::Semaphore::new(worker::LARGE_BODIES_MIB as usize),
        resolver: Resolver::new(routes).with_dns(dns),
        settings: settings.clone(),
        store: Arc::clone(&store),
        queue,
        identity,
        pins,
        smarthost,
        metrics,
        home: (home_host, home_addr),
        destinations: worker::Destinations::default(),
        bounces,
        relayed,
        origins,
        local,
        home_store,
        pool: worker::Pool::default(),
    });
    if let Some(password) = &password {
        if let Err(e) = register(&gw, password).await {
            warn!(error = %e, "Cannot register the gateway's mailbox; the poller will keep trying to ACCEPT.");
        }
    }

    // Listeners: SMTP, metrics, admin.
    let announced = match settings.smtp.oversize {
        config::Oversize::Fragment => settings.smtp.max_message_size,
        config::Oversize::Reject | config::Oversize::StripAttachments => mail::MAX_PLAINTEXT,
    };
    let mut smtp_config = ListenerConfig::new(settings.gateway.hostname.clone(), announced);
    if settings.smtp.oversize == config::Oversize::StripAttachments {
        smtp_config.read_limit = settings.smtp.max_message_size;
    }
    smtp_config.max_recipients = settings.smtp.max_recipients;
    smtp_config.command_timeout = Duration::from_secs(settings.smtp.command_timeout_secs);
    smtp_config.data_timeout = Duration::from_secs(settings.smtp.data_timeout_secs);
    smtp_config.min_data_rate = settings.smtp.min_data_rate;
    smtp_config.max_connections = settings.smtp.max_connections;
    smtp_config.client_limits = bridge_smtp::listener::ClientLimits {
        max_connections: settings.smtp.max_connections_per_client,
        connection_rate: settings.smtp.client_connection_rate_limit,
        message_rate: settings.smtp.client_message_rate_limit,
        recipient_rate: settings.smtp.client_recipient_rate_limit,
        exempt: settings.smtp_limit_exempt()?,
    };
    smtp_config.junk_command_limit = settings.smtp.junk_command_limit;
    smtp_config.max_session = Duration::from_secs(settings.smtp.max_session_secs.max(1));
    smtp_config.tls = Some(smtp_tls(&settings)?);
    let smtp = tokio::net::TcpListener::bind(settings.smtp.listen)
        .await
        .with_context(|| format!("smtp.listen {}", settings.smtp.listen))?;
    let http = tokio::net::TcpListener::bind(settings.http.listen)
        .await
        .with_context(|| format!("http.listen {}", settings.http.listen))?;
    let public = match settings.http.public_listen.as_str() {
        "" => None,
        a => Some(tokio::net::TcpListener::bind(a).await.with_context(|| format!("http.public_listen {a}"))?),
    };
    // The socket is made under umask 077 inside the 0700 data dir: no other
    // user can reach it, not even in the moment before it is made 0600.
    let socket = settings.admin_socket();
    let _ = std::fs::remove_file(&socket);
    let admin = tokio::net::UnixListener::bind(&socket).with_context(|| format!("cannot bind {}", socket.display()))?;
    let own_uid = {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot chmod {}", socket.display()))?;
        std::fs::metadata(&socket).with_context(|| format!("cannot stat {}", socket.display()))?.uid()
    };

    let smtp_addr = smtp.local_addr()?;
    let http_addr = http.local_addr()?;
    tasks.spawn(bridge_smtp::serve(
        smtp,
        Arc::new(smtp_config),
        Arc::new(sink::SmtpSink(Arc::clone(&gw))),
        shutdown.clone(),
    ));
    let monitor = metrics::Monitor { metrics: Arc::clone(&gw.metrics), store: Arc::clone(&store), home: gw.home.1 };
    tasks.spawn(http::serve(http, Arc::new(monitor), "http.listen", 0, shutdown.clone()));
    tasks.spawn(admin::serve(admin, Arc::clone(&store), gw.queue.jetstream().cloned(), own_uid, shutdown.clone()));
    tasks.spawn(worker::run(Arc::clone(&gw), shutdown.clone()));
    tasks.spawn(poller::run(Arc::clone(&gw), shutdown.clone()));
    if !settings.irc.server.is_empty() {
        tasks.spawn(irc::run(Arc::clone(&gw), irc_config(&settings), shutdown.clone()));
    }
    // One line on stdout for scripts and tests.
    let mut extra = String::new();
    if !settings.gemini.listen.is_empty() {
        let listener = tokio::net::TcpListener::bind(&settings.gemini.listen)
            .await
            .with_context(|| format!("gemini.listen {}", settings.gemini.listen))?;
        extra.push_str(&format!(" gemini {}", listener.local_addr()?));
        let own = gw.identity.address().map(|a| (a.to_string().to_ascii_lowercase(), gw.identity.cert_der().to_vec()));
        let capsule = discovery::Capsule { store: gw.home_store.clone(), own: own.into_iter().collect() };
        let tls = latssiam::gemini::server_tls(&capsule_identity).context("gemini.listen: TLS")?;
        let limits = latssiam::gemini::Limits {
            requests_per_minute: settings.gemini.requests_per_minute,
            ..latssiam::gemini::Limits::default()
        };
        tasks.spawn(latssiam::gemini::serve(listener, tls, Arc::new(capsule), limits, shutdown.clone()));
    }
    if let Some(public) = public {
        extra.push_str(&format!(" webfinger {}", public.local_addr()?));
        tasks.spawn(http::serve(
            public,
            Arc::new(discovery::Discovery(Arc::clone(&gw))),
            "http.public_listen",
            settings.http.lookups_per_minute,
            shutdown.clone(),
        ));
    }
    println!("gateway {} smtp {smtp_addr} home {} http {http_addr}{extra}", gw.identity.fingerprint(), gw.home.1);
    info!(%smtp_addr, home = %gw.home.1, %http_addr, fingerprint = %gw.identity.fingerprint(), "Gateway running.");
    tasks.close();
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
    let _ = std::fs::remove_file(&socket);
    drop(gw);
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
