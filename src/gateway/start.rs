//! `latssiam-bridge run`, step by step: the gateway's state (data dir,
//! database, queue), its identity, the home server, the gateway's own parts,
//! the listeners, then the tasks that serve them (SMTP, HTTP, admin,
//! worker, poller, IRC, Gemini). Each step is one function, so that
//! [`super::run`] reads as the list of them and gives each its own error
//! context.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bridge_smtp::smarthost::{Security as SmarthostSecurity, Smarthost, SmarthostConfig};
use bridge_smtp::ListenerConfig;
use latssiam::client::{split_host_port, Resolver};
use latssiam::server::{Server, ServerConfig};
use latssiam::wire::Password;
use latssiam::{Address, Identity};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::config::{self, Security, Settings};
use super::db::Store;
use super::metrics::Metrics;
use super::{
    admin, auth, discovery, hourly, http, irc, load_or_create_identity, mail, poller, queue, random_password, sink,
    worker, Gateway, HOME_TREES,
};
use crate::pins::SledPins;

/// The node's state: its database, TOFU pins and queue.
pub struct State {
    pub store: Arc<Store>,
    pins: SledPins,
    queue: Arc<dyn queue::JobQueue>,
    cluster: Option<Arc<dyn queue::Cluster>>,
    /// The shared queue itself, for the admin socket's operations on it.
    jetstream: Option<Arc<queue::jetstream::JetQueue>>,
}

/// Opens the data dir (0700, under umask 077) and the node's database, and
/// the queue: sled, or JetStream with the shared contacts, subscriptions and
/// pins mirrored before any mail is taken.
pub async fn open_state(settings: &Settings, tasks: &TaskTracker, shutdown: &CancellationToken) -> Result<State> {
    let data_dir = &settings.gateway.data_dir;
    latssiam::files::private_umask();
    latssiam::files::private_data_dir(data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
    let min_free = settings.queue.min_free_mb.saturating_mul(1 << 20);
    let store = Store::open_keeping(&settings.queue_dir(), min_free).with_context(|| {
        format!("cannot open the queue in {} (is another gateway running on it?)", settings.queue_dir().display())
    })?;
    let pins = SledPins::open(store.db())?;
    let state = match settings.queue.backend {
        config::QueueBackend::Sled => State {
            queue: Arc::new(queue::sled::SledQueue::new(Arc::clone(&store))),
            cluster: None,
            jetstream: None,
            store,
            pins,
        },
        config::QueueBackend::Jetstream => {
            let shared = Arc::new(queue::jetstream::connect(settings).await?);
            tasks.spawn(super::warn_unless_nats_syncs(settings.nats_varz()));
            store.share_state(Arc::clone(&shared) as Arc<dyn super::db::SharedRecords>);
            pins.share(Arc::clone(&shared) as Arc<dyn crate::pins::SharedPins>);
            shared
                .mirror(Arc::clone(&store), pins.clone(), shutdown.clone())
                .await
                .context("cannot read the shared contacts, subscriptions and pins")?;
            State {
                queue: Arc::clone(&shared) as Arc<dyn queue::JobQueue>,
                cluster: Some(Arc::clone(&shared) as Arc<dyn queue::Cluster>),
                jetstream: Some(shared),
                store,
                pins,
            }
        }
    };
    Ok(state)
}

/// The host of the gateway's home server: the embedded one's, or the
/// configured server's.
fn home_host(settings: &Settings) -> String {
    if settings.home.server.is_empty() {
        settings.home.host.clone()
    } else {
        split_host_port(&settings.home.server).0.to_owned()
    }
}

/// The gateway's identity, `gateway@<home host>`, made on first start.
pub fn identity(settings: &Settings) -> Result<Arc<Identity>> {
    let address = Address::new("gateway", &home_host(settings))?;
    let dir = settings.gateway.data_dir.join("identity");
    Ok(Arc::new(load_or_create_identity(&dir, &address, "latssiam-bridge")?))
}

/// The home server as the gateway uses it.
pub struct Home {
    /// Where it is.
    addr: SocketAddr,
    /// The password the gateway registers its mailbox with, if it has one.
    pub password: Option<Password>,
    /// The embedded server's host and in-process delivery (`home.local_delivery`).
    local: Option<(String, latssiam::server::LocalDelivery)>,
    /// The embedded server's mailboxes.
    store: Option<Arc<latssiam::server::store::Store>>,
    /// Who the Gemini capsule presents itself as: the embedded server (the
    /// host's server), or the gateway when the home server is elsewhere.
    capsule_identity: Arc<Identity>,
}

/// The home server: the configured one (resolved), or the reference server
/// run in-process on the gateway's database (`home.server` empty), which is
/// then started and routed to.
pub async fn home_server(
    settings: &Settings,
    state: &State,
    identity: &Arc<Identity>,
    routes: &mut HashMap<String, String>,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<Home> {
    if !settings.home.server.is_empty() {
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
        return Ok(Home { addr, password, local: None, store: None, capsule_identity: Arc::clone(identity) });
    }
    let data_dir = &settings.gateway.data_dir;
    let host = home_host(settings);
    let server_address = Address::new("server", &host)?;
    let server_id = Arc::new(load_or_create_identity(&data_dir.join("home/identity"), &server_address, &host)?);
    let password = match settings.home.register_password.as_str() {
        "" => random_password()?,
        p => Password::new(p)?,
    };
    let mut config = ServerConfig::new(&host, data_dir.join("home"));
    config.listen = settings.home.listen;
    config.register_password = Some(password.clone());
    config.max_unread_per_sender = settings.home.max_unread_per_sender;
    config.max_unread_per_mailbox = settings.home.max_unread_per_mailbox;
    config.min_free = settings.queue.min_free_mb.saturating_mul(1 << 20);
    // The gateway delivers everything for its people here: it is not rate-limited.
    config.rate_exempt.insert(identity.fingerprint());
    // The home server keeps its mailboxes in the gateway's database, so
    // that one fsync covers a message's SMTP `250` and its `31` alike. A
    // data dir from before this kept them in a database of their own in
    // home/: that one stays in use while it holds the mailboxes.
    let store = &state.store;
    let legacy = data_dir.join("home/conf").exists()
        && store.db().open_tree(format!("{HOME_TREES}mailboxes")).map(|t| t.is_empty()).unwrap_or(false);
    let store_of_home = if legacy {
        info!("The embedded home server keeps its own database in home/ (made by an earlier version).");
        latssiam::server::store::Store::open(&data_dir.join("home"))
    } else {
        latssiam::server::store::Store::in_db(
            store.db().clone(),
            store.flusher(),
            HOME_TREES,
            &settings.queue_dir().join("home-bodies"),
        )
    }
    .context("cannot open the embedded home server's store")?;
    let server = Server::with_store(config, Arc::clone(&server_id), Arc::clone(&store_of_home))
        .context("cannot start the embedded home server")?;
    // In-process delivery makes the mailbox write durable with the
    // gateway's fsync: only when both live in one database.
    let local = (settings.home.local_delivery && !legacy).then(|| (host.to_ascii_lowercase(), server.local_delivery()));
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
    Ok(Home { addr, password: Some(password), local, store: Some(store_of_home), capsule_identity: server_id })
}

fn smarthost(settings: &Settings) -> Result<Smarthost> {
    let sh = &settings.smarthost;
    Smarthost::new(&SmarthostConfig {
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
    .map_err(|e| anyhow::anyhow!("smarthost: {e}"))
}

/// The gateway's own parts, as its tasks share them: smarthost, DNS and
/// authentication, the fragment joiner, the limits counted across restarts
/// (and nodes), the resolver with the home server's route.
pub fn gateway(
    settings: &Settings,
    state: &State,
    identity: Arc<Identity>,
    home: &Home,
    routes: HashMap<String, String>,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<Arc<Gateway>> {
    let smarthost = smarthost(settings)?;
    let store = &state.store;
    let joiner = latssiam::fragment::Joiner::new(
        store.db().open_tree("partials")?,
        settings.smtp.max_message_size + latssiam::fragment::TRACE_ROOM,
    );
    let progress = store.db().open_tree("fragment_progress")?;
    // One DNS resolver (and its cache) for MX/A discovery and authentication.
    let dns = latssiam::client::dns_resolver(&settings.nameservers(), Duration::from_secs(settings.dns.timeout_secs))
        .map_err(|e| anyhow::anyhow!("dns.nameservers: {e}"))?;
    let metrics = Arc::new(Metrics::default());
    let border = auth::Border::new(settings, dns.clone(), Arc::clone(&metrics)).map_err(|e| anyhow::anyhow!(e))?;
    // Counted across restarts, and with the shared queue across nodes.
    let counter: Option<Arc<dyn hourly::SharedCounter>> =
        state.cluster.clone().map(|c| c as Arc<dyn hourly::SharedCounter>);
    let bounces = Arc::new(hourly::HourlyLimit::open(store.db(), "bounces", counter.clone())?);
    let relayed = Arc::new(hourly::HourlyLimit::open(store.db(), "relayed", counter.clone())?);
    let origins =
        Arc::new(hourly::HourlyLimit::open(store.db(), "origins", counter)?.per(Duration::from_secs(24 * 3600)));
    for limit in [&bounces, &relayed, &origins] {
        tasks.spawn(Arc::clone(limit).sweep(shutdown.clone()));
    }
    Ok(Arc::new(Gateway {
        joiner,
        progress,
        border,
        large_bodies: tokio::sync::Semaphore::new(worker::LARGE_BODIES_MIB as usize),
        resolver: Resolver::new(routes).with_dns(dns),
        settings: settings.clone(),
        store: Arc::clone(store),
        queue: Arc::clone(&state.queue),
        cluster: state.cluster.clone(),
        identity,
        pins: state.pins.clone(),
        smarthost,
        metrics,
        home: (home_host(settings), home.addr),
        destinations: worker::Destinations::default(),
        in_session: worker::InSession::default(),
        bounces,
        relayed,
        origins,
        local: home.local.clone(),
        home_store: home.store.clone(),
        pool: worker::Pool::default(),
    }))
}

/// Registers the gateway's mailbox on its home server, when it has a
/// password for it; a failure is logged (the poller keeps trying to `ACCEPT`).
pub async fn register(gw: &Gateway, password: Option<&Password>) {
    if let Some(password) = password {
        if let Err(e) = super::register(gw, password).await {
            warn!(error = %e, "Cannot register the gateway's mailbox; the poller will keep trying to ACCEPT.");
        }
    }
}

/// The listeners, bound before anything is served (a port in use stops
/// the start with its key named).
pub struct Listeners {
    pub smtp: tokio::net::TcpListener,
    pub http: tokio::net::TcpListener,
    pub public: Option<tokio::net::TcpListener>,
    /// The admin socket, and the uid it answers (besides root).
    pub admin: (tokio::net::UnixListener, u32),
}

/// Binds SMTP, `http.listen`, `http.public_listen` and the admin socket.
pub async fn listeners(settings: &Settings) -> Result<Listeners> {
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
    Ok(Listeners { smtp, http, public, admin: (admin, own_uid) })
}

/// The SMTP listener's settings (and its STARTTLS identity, made on first start).
pub fn smtp_config(settings: &Settings) -> Result<ListenerConfig> {
    let s = &settings.smtp;
    let announced = match s.oversize {
        config::Oversize::Fragment => s.max_message_size,
        config::Oversize::Reject | config::Oversize::StripAttachments => mail::MAX_PLAINTEXT,
    };
    let mut c = ListenerConfig::new(settings.gateway.hostname.clone(), announced);
    if s.oversize == config::Oversize::StripAttachments {
        c.read_limit = s.max_message_size;
    }
    c.max_recipients = s.max_recipients;
    c.command_timeout = Duration::from_secs(s.command_timeout_secs);
    c.data_timeout = Duration::from_secs(s.data_timeout_secs);
    c.min_data_rate = s.min_data_rate;
    c.set_data_memory(s.data_memory_mib);
    c.spill_dir = Some(settings.queue_dir().join("spool"));
    c.max_connections = s.max_connections;
    c.client_limits = bridge_smtp::listener::ClientLimits {
        max_connections: s.max_connections_per_client,
        connection_rate: s.client_connection_rate_limit,
        message_rate: s.client_message_rate_limit,
        recipient_rate: s.client_recipient_rate_limit,
        exempt: settings.smtp_limit_exempt()?,
    };
    c.junk_command_limit = s.junk_command_limit;
    c.max_session = Duration::from_secs(s.max_session_secs.max(1));
    c.tls = Some(super::smtp_tls(settings)?);
    Ok(c)
}

/// Serves SMTP into the gateway's sink; the address it listens on.
pub fn smtp(
    gw: &Arc<Gateway>,
    mut config: ListenerConfig,
    listener: tokio::net::TcpListener,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<SocketAddr> {
    let addr = listener.local_addr()?;
    // Message data goes to the queue's filesystem only while it keeps queue.min_free_mb.
    let store = Arc::clone(&gw.store);
    config.spill_room = Some(Arc::new(move || store.room().is_ok()));
    let sink = Arc::new(sink::SmtpSink(Arc::clone(gw)));
    tasks.spawn(bridge_smtp::serve(listener, Arc::new(config), sink, shutdown.clone()));
    Ok(addr)
}

/// Serves `/metrics` and `/healthz` on `http.listen`; the address.
pub fn monitor(
    gw: &Gateway,
    listener: tokio::net::TcpListener,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<SocketAddr> {
    let addr = listener.local_addr()?;
    let monitor =
        super::metrics::Monitor { metrics: Arc::clone(&gw.metrics), store: Arc::clone(&gw.store), home: gw.home.1 };
    tasks.spawn(http::serve(listener, Arc::new(monitor), "http.listen", 0, shutdown.clone()));
    Ok(addr)
}

/// Serves the admin socket.
pub fn admin(
    state: &State,
    (listener, own_uid): (tokio::net::UnixListener, u32),
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) {
    let shared = state.jetstream.clone();
    tasks.spawn(admin::serve(listener, Arc::clone(&state.store), shared, own_uid, shutdown.clone()));
}

/// Starts the delivery worker.
pub fn workers(gw: &Arc<Gateway>, tasks: &TaskTracker, shutdown: &CancellationToken) {
    tasks.spawn(worker::run(Arc::clone(gw), shutdown.clone()));
}

/// Starts the poller (contacts' messages from the home server).
pub fn poller(gw: &Arc<Gateway>, tasks: &TaskTracker, shutdown: &CancellationToken) {
    tasks.spawn(poller::run(Arc::clone(gw), shutdown.clone()));
}

/// Starts the IRC bot, if `irc.server` is set.
pub fn irc(gw: &Arc<Gateway>, tasks: &TaskTracker, shutdown: &CancellationToken) {
    if !gw.settings.irc.server.is_empty() {
        tasks.spawn(irc::run(Arc::clone(gw), super::irc_config(&gw.settings), shutdown.clone()));
    }
}

/// Serves the Gemini capsule, if `gemini.listen` is set: `" gemini ADDR"`
/// for the start line, or nothing.
pub async fn gemini(gw: &Gateway, home: &Home, tasks: &TaskTracker, shutdown: &CancellationToken) -> Result<String> {
    let listen = &gw.settings.gemini.listen;
    if listen.is_empty() {
        return Ok(String::new());
    }
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("gemini.listen {listen}"))?;
    let addr = listener.local_addr()?;
    let own = gw.identity.address().map(|a| (a.to_string().to_ascii_lowercase(), gw.identity.cert_der().to_vec()));
    let capsule = discovery::Capsule {
        store: gw.home_store.clone(),
        own: own.into_iter().collect(),
        pastes: Some(Arc::clone(&gw.store)),
    };
    let tls = latssiam::gemini::server_tls(&home.capsule_identity).context("gemini.listen: TLS")?;
    let limits = latssiam::gemini::Limits {
        requests_per_minute: gw.settings.gemini.requests_per_minute,
        ..latssiam::gemini::Limits::default()
    };
    tasks.spawn(latssiam::gemini::serve(listener, tls, Arc::new(capsule), limits, shutdown.clone()));
    Ok(format!(" gemini {addr}"))
}

/// Serves WebFinger on `http.public_listen`, if bound: `" webfinger ADDR"`
/// for the start line, or nothing.
pub fn webfinger(
    gw: &Arc<Gateway>,
    listener: Option<tokio::net::TcpListener>,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<String> {
    let Some(listener) = listener else { return Ok(String::new()) };
    let addr = listener.local_addr()?;
    tasks.spawn(http::serve(
        listener,
        Arc::new(discovery::Discovery(Arc::clone(gw))),
        "http.public_listen",
        gw.settings.http.lookups_per_minute,
        shutdown.clone(),
    ));
    Ok(format!(" webfinger {addr}"))
}
