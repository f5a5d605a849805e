//! The SMTP listener: ESMTP with SIZE, 8BITMIME, PIPELINING, SMTPUTF8,
//! ENHANCEDSTATUSCODES and STARTTLS, commands parsed by `smtp-proto`.
//!
//! Limits (RFC 5321 section 4.5.3): command lines of at most 1000 octets
//! including CRLF (`500 5.5.2`); a text line in `DATA` may be longer, as
//! Postfix accepts it (real mail has them), bounded only by the message size;
//! at most `max_recipients` recipients (`452 4.5.3`), a message of at most
//! `read_limit` octets (`552 5.3.4`), and timeouts while waiting for a
//! command or for data (`421 4.4.2`).
//!
//! Defences against hostile clients, each bounded whatever the peer sends or
//! refuses to read:
//! - Replies to pipelined commands are written together when the client's
//!   input runs dry, or as soon as [`MAX_PENDING_REPLIES`] octets are waiting;
//!   every write must finish within `command_timeout` or the session ends.
//! - A bare LF or bare CR in `DATA` never ends the message (only
//!   `<CR><LF>.<CR><LF>` does); a message that contains one is refused with
//!   `550 5.5.2` and the session is closed (Postfix's
//!   `smtpd_forbid_bare_newline = reject`), so no second transaction can be
//!   smuggled inside one.
//! - Per client address ([`ClientLimits`], Postfix's anvil): simultaneous
//!   connections, connections per minute and messages per minute, with
//!   `421 4.7.0` beyond them; the global `max_connections` stays for everyone.
//! - Per session: `junk_command_limit` NOOP/RSET/VRFY/HELP/HELO/EHLO before each
//!   further one counts as an error, [`MAX_ERRORS`] errors, and `max_session`.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smtp_proto::{Error as ParseError, Request};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::{Authenticator, Envelope, Reply, Sink};

/// The longest command or text line, CRLF included (RFC 5321 4.5.3.1.4 and .6;
/// the command limit is raised from 512 to 1000 to leave room for extension
/// parameters).
pub const MAX_LINE: usize = 1000;

/// After this many errors in one session the client is disconnected (as
/// Postfix's `smtpd_hard_error_limit`).
const MAX_ERRORS: u32 = 20;

/// The enhanced status of the refusal of a message with a bare LF or CR.
const BARE_NEWLINE: [u8; 3] = [5, 5, 2];

/// Replies waiting for a pipelining client are written once they reach this
/// many octets, even if the client's input has not run dry.
pub const MAX_PENDING_REPLIES: usize = 8 * 1024;

/// Most client addresses tracked at once; past it, idle entries are dropped,
/// and if none is idle new clients are refused until some are.
const MAX_TRACKED_CLIENTS: usize = 100_000;

/// Clients being told `421` at once (each for at most 5 s); beyond them a
/// connection is closed unanswered.
const MAX_REFUSING: usize = 64;

/// Limits per client address.
#[derive(Clone, Debug)]
pub struct ClientLimits {
    /// Simultaneous sessions from one address (0: no limit).
    pub max_connections: usize,
    /// New connections per minute from one address (0: no limit).
    pub connection_rate: u32,
    /// `MAIL FROM` commands per minute from one address (0: no limit).
    pub message_rate: u32,
    /// `RCPT TO` commands per minute from one address (0: no limit):
    /// each answer says whether someone is here, so a directory cannot be
    /// walked at thousands a second (Postfix's `smtpd_client_recipient_rate_limit`).
    pub recipient_rate: u32,
    /// Networks the limits do not apply to, as (address, prefix length).
    pub exempt: Vec<(IpAddr, u8)>,
}

impl Default for ClientLimits {
    fn default() -> Self {
        Self { max_connections: 50, connection_rate: 0, message_rate: 0, recipient_rate: 0, exempt: Vec::new() }
    }
}

impl ClientLimits {
    fn exempts(&self, ip: IpAddr) -> bool {
        self.exempt.iter().any(|&(net, bits)| in_network(ip, net, bits))
    }
}

/// Parses `ADDRESS` or `ADDRESS/BITS` (IPv4 or IPv6).
///
/// # Errors
/// A message naming what is wrong.
pub fn parse_network(s: &str) -> Result<(IpAddr, u8), String> {
    let (addr, bits) = match s.split_once('/') {
        Some((a, b)) => (a, Some(b)),
        None => (s, None),
    };
    let addr: IpAddr = addr.trim().parse().map_err(|_| format!("{s:?} is not an address or CIDR block"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let bits = match bits {
        None => max,
        Some(b) => {
            b.trim().parse::<u8>().ok().filter(|&b| b <= max).ok_or_else(|| format!("{s:?}: bad prefix length"))?
        }
    };
    Ok((addr, bits))
}

/// The key a client address is counted under: IPv4 as is (also when mapped
/// into IPv6), IPv6 by its /64, which one host usually has whole.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
        v4 => v4,
    }
}

/// Whether `ip` is in the network `net/bits` (an IPv4-mapped IPv6 address counts as IPv4).
pub fn in_network(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    let ip = match (ip, net) {
        (IpAddr::V6(v6), IpAddr::V4(_)) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        _ => ip,
    };
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// One client address's counts.
#[derive(Default)]
struct Client {
    sessions: usize,
    window: Option<Instant>,
    connections: u32,
    messages: u32,
    recipients: u32,
}

impl Client {
    fn roll(&mut self, now: Instant) {
        if self.window.is_none_or(|w| now.duration_since(w) >= Duration::from_secs(60)) {
            self.window = Some(now);
            self.connections = 0;
            self.messages = 0;
            self.recipients = 0;
        }
    }

    fn idle(&self, now: Instant) -> bool {
        self.sessions == 0 && self.window.is_none_or(|w| now.duration_since(w) >= Duration::from_secs(60))
    }
}

/// The per-address counters (Postfix's anvil), shared by all sessions.
pub struct Anvil {
    limits: ClientLimits,
    clients: Mutex<HashMap<IpAddr, Client>>,
    /// Sessions per IPv6 /48 (a site): at most `max_connections *`
    /// [`SITE_FACTOR`], so one site cannot fill the listener from many /64s.
    sites: Mutex<HashMap<IpAddr, usize>>,
}

/// How many clients' worth of sessions one IPv6 site (/48) may hold.
pub const SITE_FACTOR: usize = 4;

/// The site an address belongs to: its IPv6 /48 (`None` for IPv4).
pub fn site_key(ip: IpAddr) -> Option<IpAddr> {
    match client_key(ip) {
        IpAddr::V6(v6) => Some(IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 80) - 1)))),
        IpAddr::V4(_) => None,
    }
}

/// Why a client was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Too many simultaneous sessions from the address.
    Connections,
    /// Too many connections in the last minute.
    ConnectionRate,
    /// Too many messages in the last minute.
    MessageRate,
    /// Too many addresses are tracked (a flood from many addresses).
    Busy,
    /// Too many simultaneous sessions from the address's IPv6 /48.
    SiteConnections,
    /// The listener is at `max_connections`.
    Full,
    /// Too many recipients in the last minute.
    RecipientRate,
}

impl Refused {
    fn reply(self) -> Reply {
        let text = match self {
            Refused::Connections => "Too many connections from your address; try again later",
            Refused::SiteConnections => "Too many connections from your network; try again later",
            Refused::Full => "Too many connections; try again later",
            Refused::RecipientRate => "Too many recipients from your address per minute; try again later",
            Refused::ConnectionRate => "Too many connections from your address per minute; try again later",
            Refused::MessageRate => "Too many messages from your address per minute; try again later",
            Refused::Busy => "Server busy; try again later",
        };
        if self == Refused::RecipientRate {
            // Per recipient, not for the session: 450 4.7.1 as Postfix answers it.
            return Reply::new(450, [4, 7, 1], text);
        }
        Reply::new(421, [4, 7, 0], text)
    }
}

/// A session counted against its client address; uncounted when dropped.
pub struct Admission {
    anvil: Arc<Anvil>,
    ip: Option<IpAddr>,
    site: Option<IpAddr>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut clients = self.anvil.clients.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(c) = clients.get_mut(&ip) {
                c.sessions = c.sessions.saturating_sub(1);
            }
        }
        if let Some(site) = self.site {
            let mut sites = self.anvil.sites.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(n) = sites.get_mut(&site) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    sites.remove(&site);
                }
            }
        }
    }
}

impl Anvil {
    /// Counters under `limits`.
    pub fn new(limits: ClientLimits) -> Arc<Self> {
        Arc::new(Self { limits, clients: Mutex::new(HashMap::new()), sites: Mutex::new(HashMap::new()) })
    }

    /// Counts a new session from `ip`, or says why it is refused.
    ///
    /// # Errors
    /// [`Refused`] when a limit is reached.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admission, Refused> {
        if self.limits.exempts(ip) {
            return Ok(Admission { anvil: Arc::clone(self), ip: None, site: None });
        }
        let site = site_key(ip);
        let ip = client_key(ip);
        let now = Instant::now();
        let mut clients = self.clients.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if clients.len() >= MAX_TRACKED_CLIENTS && !clients.contains_key(&ip) {
            // A flood from many addresses: forget the idle ones, then (losing
            // their rate counts) those without a session.
            clients.retain(|_, c| !c.idle(now));
            if clients.len() >= MAX_TRACKED_CLIENTS / 2 {
                clients.retain(|_, c| c.sessions > 0);
            }
            if clients.len() >= MAX_TRACKED_CLIENTS {
                return Err(Refused::Busy);
            }
        }
        let c = clients.entry(ip).or_default();
        c.roll(now);
        let l = &self.limits;
        if l.max_connections > 0 && c.sessions >= l.max_connections {
            return Err(Refused::Connections);
        }
        if l.connection_rate > 0 && c.connections >= l.connection_rate {
            return Err(Refused::ConnectionRate);
        }
        let site = match site {
            Some(site) if l.max_connections > 0 => {
                let mut sites = self.sites.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let n = sites.entry(site).or_default();
                if *n >= l.max_connections.saturating_mul(SITE_FACTOR) {
                    return Err(Refused::SiteConnections);
                }
                *n += 1;
                Some(site)
            }
            _ => None,
        };
        c.connections += 1;
        c.sessions += 1;
        Ok(Admission { anvil: Arc::clone(self), ip: Some(ip), site })
    }

    /// Counts a message (`MAIL FROM`) from `ip`.
    ///
    /// # Errors
    /// [`Refused::MessageRate`] beyond the limit.
    pub fn message(&self, ip: IpAddr) -> Result<(), Refused> {
        self.count(ip, self.limits.message_rate, |c| &mut c.messages, Refused::MessageRate)
    }

    /// Counts a recipient (`RCPT TO`) from `ip`.
    ///
    /// # Errors
    /// [`Refused::RecipientRate`] beyond the limit.
    pub fn recipient(&self, ip: IpAddr) -> Result<(), Refused> {
        self.count(ip, self.limits.recipient_rate, |c| &mut c.recipients, Refused::RecipientRate)
    }

    /// Counts one event of a session from `ip` in its minute, `refused`
    /// beyond `per_minute` (0: no limit).
    fn count(
        &self,
        ip: IpAddr,
        per_minute: u32,
        counter: fn(&mut Client) -> &mut u32,
        refused: Refused,
    ) -> Result<(), Refused> {
        if per_minute == 0 || self.limits.exempts(ip) {
            return Ok(());
        }
        let mut clients = self.clients.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(c) = clients.get_mut(&client_key(ip)) else { return Ok(()) };
        c.roll(Instant::now());
        let n = counter(c);
        if *n >= per_minute {
            return Err(refused);
        }
        *n += 1;
        Ok(())
    }
}

/// Listener settings.
#[derive(Clone)]
pub struct ListenerConfig {
    /// The name in the greeting and the EHLO reply.
    pub hostname: String,
    /// The SIZE advertised: the largest message the sink can take.
    pub size_limit: usize,
    /// The most octets read in `DATA`; more is refused with `552 5.3.4`.
    /// Equal to `size_limit` unless the sink can shrink messages.
    pub read_limit: usize,
    /// Most recipients per transaction.
    pub max_recipients: usize,
    /// Wait for a command, and for each write to the client.
    pub command_timeout: Duration,
    /// Wait for each chunk of message data.
    pub data_timeout: Duration,
    /// The slowest a client may send message data, in octets per second
    /// (Postfix's `smtpd_min_data_rate`): `DATA` may last `data_timeout`
    /// plus one second per this many octets received, then `421 4.4.2`.
    /// A keep-alive line every few minutes cannot hold a session. 0: off.
    pub min_data_rate: u64,
    /// Most simultaneous sessions.
    pub max_connections: usize,
    /// Limits per client address.
    pub client_limits: ClientLimits,
    /// NOOP, RSET, VRFY, HELP, HELO and EHLO allowed per session before each
    /// further one counts as an error (reset by an accepted message).
    pub junk_command_limit: u32,
    /// The longest a session may last.
    pub max_session: Duration,
    /// STARTTLS, if configured.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Message data all sessions may hold in memory at once, in MiB (each
    /// session's first MiB aside); beyond it a message goes on in a file in
    /// `spill_dir`, or, without one, gets `452 4.3.1`.
    pub data_memory: Arc<Semaphore>,
    /// The permits `data_memory` was made with ([`ListenerConfig::set_data_memory`] sets both).
    pub data_memory_mib: usize,
    /// MiB of message data all sessions may have in spill files at once;
    /// beyond it `452 4.3.1`.
    pub spill_mib: Arc<Semaphore>,
    /// Whether the spill directory's filesystem has room (the queue's free
    /// space check); a message that would spill without it gets `452 4.3.1`.
    pub spill_room: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
    /// Where message data goes on once `data_memory` is used up: an
    /// unlinked file per message (nothing is left behind by a crash), read
    /// back into memory once the message is whole, when `data_memory` has
    /// room for it, so that the sink still gets one buffer.
    pub spill_dir: Option<std::path::PathBuf>,
    /// Sessions open now (kept by [`serve`]): at nine tenths of
    /// `max_connections` the listener is under stress, and, as Postfix does
    /// then, every wait for the client is [`STRESS_TIMEOUT`] at most and a
    /// second junk command counts as an error, so that clients that hold a
    /// session doing nothing make room for those that send mail.
    pub sessions: Arc<std::sync::atomic::AtomicUsize>,
    /// Submission (RFC 4954): with an authenticator, `AUTH PLAIN LOGIN` is
    /// offered (over TLS, or without it where `auth_without_tls`) and `MAIL`
    /// needs a successful `AUTH` first.
    pub auth: Option<Arc<dyn Authenticator>>,
    /// Whether a password may come without TLS (a loopback listener).
    pub auth_without_tls: bool,
    /// Implicit TLS (RFC 8314, the submissions port 465): the TLS handshake
    /// comes first, before the greeting, and STARTTLS is not offered. Needs
    /// `tls`; a listener without it closes every connection.
    pub implicit_tls: bool,
}

/// Failed `AUTH` attempts one session may make before it is closed.
pub const MAX_AUTH_FAILURES: u32 = 3;

/// The longest wait for a client while the listener is under stress
/// (Postfix's `smtpd_timeout` under stress, 10 s).
pub const STRESS_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits for `read` at most `wait`, and, once the listener is under stress,
/// at most [`STRESS_TIMEOUT`] (also for a wait that began before the stress
/// did: it is looked at every second, without dropping the read).
async fn waited<F: std::future::Future>(config: &ListenerConfig, wait: Duration, read: F) -> Result<F::Output, ()> {
    let started = Instant::now();
    let mut read = std::pin::pin!(read);
    loop {
        let left = wait.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(());
        }
        match tokio::time::timeout(left.min(Duration::from_secs(1)), &mut read).await {
            Ok(v) => return Ok(v),
            Err(_) if config.stressed() && started.elapsed() >= STRESS_TIMEOUT => return Err(()),
            Err(_) => {}
        }
    }
}

/// Message data written to a spill file at a time.
const SPILL_CHUNK: usize = 256 * 1024;

/// The default [`ListenerConfig::spill_mib`]: 1 GiB.
pub const SPILL_MIB: usize = 1024;

/// Message data in a file, for a message past the memory budget: created in
/// the spill directory and unlinked at once, so that it lives exactly as
/// long as its handle.
struct Spill {
    file: tokio::fs::File,
    len: usize,
    /// A permit of the disk budget for each MiB written (and the one being written).
    held: Vec<tokio::sync::OwnedSemaphorePermit>,
    budget: Arc<Semaphore>,
}

impl Spill {
    /// A spill file in `config.spill_dir` holding `first`; `None` without a
    /// directory, without room on its filesystem or in the disk budget, or
    /// when it cannot be made.
    async fn start(config: &ListenerConfig, first: &[u8]) -> Option<Self> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = config.spill_dir.as_deref();
        if config.spill_room.as_ref().is_some_and(|room| !room()) {
            warn!("No room on the queue's filesystem for message data; message deferred.");
            return None;
        }
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir?.join(format!(".smtp-data-{}-{n}", std::process::id()));
        let file = tokio::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path).await;
        let file = match file {
            Ok(f) => f,
            Err(e) => {
                warn!(error = %e, path = %path.display(), "Cannot make a file for message data.");
                return None;
            }
        };
        // Unlinked at once: the file lives exactly as long as its handle.
        if let Err(e) = tokio::fs::remove_file(&path).await {
            warn!(error = %e, path = %path.display(), "Cannot unlink a file for message data; not used.");
            return None;
        }
        let mut spill = Self { file, len: 0, held: Vec::new(), budget: Arc::clone(&config.spill_mib) };
        spill.write(first).await.ok()?;
        Some(spill)
    }

    /// Appends `data`; an error also when the disk budget is used up.
    async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        use tokio::io::AsyncWriteExt as _;
        while self.len + data.len() > self.held.len() * MIB {
            let permit = Arc::clone(&self.budget).try_acquire_owned().map_err(|_| {
                io::Error::new(io::ErrorKind::StorageFull, "the budget for message data in files is used up")
            })?;
            self.held.push(permit);
        }
        self.file.write_all(data).await?;
        self.len += data.len();
        Ok(())
    }

    /// Everything written, then `rest`, in one buffer.
    async fn finish(mut self, rest: Vec<u8>) -> io::Result<Vec<u8>> {
        use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _, AsyncWriteExt as _};
        self.file.flush().await?;
        self.file.seek(io::SeekFrom::Start(0)).await?;
        let mut whole = Vec::with_capacity(self.len + rest.len());
        (&mut self.file).take(self.len as u64).read_to_end(&mut whole).await?;
        if whole.len() != self.len {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "message data file shorter than written"));
        }
        whole.extend_from_slice(&rest);
        Ok(whole)
    }
}

/// The unit of [`ListenerConfig::data_memory`].
pub const MIB: usize = 1 << 20;

/// The default [`ListenerConfig::data_memory`]: 256 MiB.
pub const DATA_MEMORY_MIB: usize = 256;

impl ListenerConfig {
    /// The memory budget for message data: `mib` MiB (at least 1, so that
    /// a message that went to a file can always come back).
    pub fn set_data_memory(&mut self, mib: usize) {
        self.data_memory_mib = mib.max(1);
        self.data_memory = Arc::new(Semaphore::new(self.data_memory_mib));
    }

    /// Whether nine tenths of the session slots are taken.
    pub fn stressed(&self) -> bool {
        self.sessions.load(std::sync::atomic::Ordering::Relaxed).saturating_mul(10)
            >= self.max_connections.saturating_mul(9)
    }

    /// Settings with RFC 5321 defaults and no TLS.
    pub fn new(hostname: impl Into<String>, size_limit: usize) -> Self {
        Self {
            hostname: hostname.into(),
            size_limit,
            read_limit: size_limit,
            max_recipients: 100,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            min_data_rate: 500,
            max_connections: 200,
            client_limits: ClientLimits::default(),
            junk_command_limit: 100,
            max_session: Duration::from_secs(3600),
            tls: None,
            data_memory: Arc::new(Semaphore::new(DATA_MEMORY_MIB)),
            data_memory_mib: DATA_MEMORY_MIB,
            spill_dir: None,
            spill_mib: Arc::new(Semaphore::new(SPILL_MIB)),
            spill_room: None,
            sessions: Arc::default(),
            auth: None,
            auth_without_tls: false,
            implicit_tls: false,
        }
    }
}

/// Accepts sessions until `shutdown`, then waits for the open ones to end
/// (each is told `421` at its next command).
pub async fn serve<S: Sink>(
    listener: TcpListener,
    config: Arc<ListenerConfig>,
    sink: Arc<S>,
    shutdown: CancellationToken,
) {
    if config.implicit_tls && config.tls.is_none() {
        warn!("SMTP listener with implicit TLS but no TLS configured: every connection will be closed.");
    }
    let limit = Arc::new(Semaphore::new(config.max_connections.max(1)));
    // Clients told 421 at once, beyond which a connection is closed unanswered.
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let anvil = Anvil::new(config.client_limits.clone());
    let tracker = TaskTracker::new();
    loop {
        // Accepted first, then counted: a full listener answers 421 and closes
        // at once instead of leaving clients in the kernel's backlog with no
        // greeting (where a health check, too, would wait for one).
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shutdown.cancelled() => break,
        };
        let (mut tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "SMTP accept failed; backing off.");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (admission, permit) = match Arc::clone(&limit).try_acquire_owned() {
            Ok(permit) => (anvil.admit(peer.ip()), Some(permit)),
            Err(_) => (Err(Refused::Full), None),
        };
        let refusal = match admission {
            Ok(admission) => {
                let (config, sink, shutdown, anvil) =
                    (Arc::clone(&config), Arc::clone(&sink), shutdown.clone(), Arc::clone(&anvil));
                config.sessions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracker.spawn(async move {
                    if let Err(e) = run_session(tcp, peer, &config, &*sink, Some(&anvil), &shutdown).await {
                        debug!(%peer, error = %e, "SMTP session ended with an error.");
                    }
                    config.sessions.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    drop((admission, permit));
                });
                continue;
            }
            Err(why) => why,
        };
        if config.implicit_tls {
            // A client on a TLS port cannot read a 421 in the clear.
            info!(%peer, reason = ?refusal, "SMTP client over its limits; closed.");
            continue;
        }
        let Ok(slot) = Arc::clone(&refusing).try_acquire_owned() else {
            // Flooded beyond what is worth answering.
            continue;
        };
        tracker.spawn(async move {
            info!(%peer, reason = ?refusal, "SMTP client over its limits; refused with 421.");
            let line = format!("{}\r\n", refusal.reply());
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                tcp.write_all(line.as_bytes()).await?;
                tcp.shutdown().await
            })
            .await;
            drop((slot, permit));
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// Runs one SMTP session over `io` (a connected client) until it ends:
/// greeting, commands, STARTTLS if configured, `QUIT`, a limit or `shutdown`.
/// `anvil` counts its messages against the client address.
///
/// # Errors
/// An I/O error or a timeout of the stream.
pub async fn run_session<IO, S>(
    io: IO,
    peer: SocketAddr,
    config: &ListenerConfig,
    sink: &S,
    anvil: Option<&Anvil>,
    shutdown: &CancellationToken,
) -> io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
    S: Sink,
{
    let mut state = Session::new(peer, config, sink, anvil);
    let greeting = format!("220 {} ESMTP latssiam-bridge\r\n", config.hostname);
    if config.implicit_tls {
        let Some(stream) = handshake(io, peer, config, config.command_timeout.min(state.remaining()), shutdown).await
        else {
            return Ok(());
        };
        state.tls = true;
        return match state.run(BufReader::new(stream), Some(greeting), shutdown).await? {
            Outcome::Closed | Outcome::StartTls(_) => Ok(()),
        };
    }
    let io = match state.run(BufReader::new(io), Some(greeting), shutdown).await? {
        Outcome::Closed => return Ok(()),
        Outcome::StartTls(io) => io,
    };
    let Some(stream) = handshake(io, peer, config, config.command_timeout.min(state.remaining()), shutdown).await
    else {
        return Ok(());
    };
    state.tls = true;
    // RFC 3207: the client starts over with EHLO; whatever it pipelined before is gone.
    state.helo = None;
    state.authed = None;
    state.reset();
    match state.run(BufReader::new(stream), None, shutdown).await? {
        Outcome::Closed | Outcome::StartTls(_) => Ok(()),
    }
}

/// The longest a TLS handshake may take: the same 30 s as `local`'s IMAP
/// (the reference server allows 10 s; a mail client on a slow link may
/// need more).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// The TLS handshake (STARTTLS, or implicit TLS) within `wait` and
/// [`HANDSHAKE_TIMEOUT`], cut short under stress as every wait for a client
/// is, and by `shutdown`; `None` when there is no TLS configured, or the
/// handshake failed, took too long or was cut short.
async fn handshake<IO>(
    io: IO,
    peer: SocketAddr,
    config: &ListenerConfig,
    wait: Duration,
    shutdown: &CancellationToken,
) -> Option<tokio_rustls::server::TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let tls = config.tls.clone()?;
    let accept = waited(config, wait.min(HANDSHAKE_TIMEOUT), tokio_rustls::TlsAcceptor::from(tls).accept(io));
    let done = tokio::select! {
        done = accept => done,
        () = shutdown.cancelled() => return None,
    };
    match done {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "TLS handshake failed.");
            None
        }
        Err(()) => {
            debug!(%peer, "TLS handshake took too long.");
            None
        }
    }
}

enum Outcome<IO> {
    Closed,
    StartTls(IO),
}

/// What reading one line found.
enum Line {
    /// A line (without its line end).
    Ok(Vec<u8>),
    /// The line was longer than the limit; it has been consumed.
    TooLong,
    /// The client closed the connection.
    Eof,
}

/// Reads one line of at most `max` octets including the line end, consuming
/// (and discarding) the rest of a longer one. Never holds more than `max` octets.
async fn read_line<R: AsyncRead + Unpin>(reader: &mut BufReader<R>, max: usize) -> io::Result<Line> {
    let mut line = Vec::new();
    Ok(match read_line_into(reader, max, &mut line).await? {
        Read::Ok(_) => Line::Ok(line),
        Read::TooLong(_) | Read::NoRoom(_) => Line::TooLong,
        Read::Eof => Line::Eof,
    })
}

/// What [`read_line_into`] found.
enum Read {
    /// A line, appended without its line end; whether it ended in CRLF.
    Ok(bool),
    /// Longer than the limit: consumed, nothing appended. Whether it ended in CRLF.
    TooLong(bool),
    /// Past the memory budget in the middle of the line: consumed, nothing
    /// appended. Whether it ended in CRLF.
    NoRoom(bool),
    /// The client closed the connection.
    Eof,
}

/// As [`read_line`], appending the line (without its end) to `out`, so a
/// message is read into one buffer, not line by line into copies.
async fn read_line_into<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    max: usize,
    out: &mut Vec<u8>,
) -> io::Result<Read> {
    read_line_budgeted(reader, max, out, None).await
}

/// A memory budget a buffer grows against: a permit for each MiB of it past the first.
type Budget<'a> = (&'a Arc<Semaphore>, &'a mut Vec<tokio::sync::OwnedSemaphorePermit>);

/// As [`read_line_into`], taking a permit of `budget` for each MiB of the
/// line past its first (so that one long line is within the budget like any
/// data, while the caller accounts for whole lines); [`Read::NoRoom`] when
/// there is none left.
async fn read_line_budgeted<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    max: usize,
    out: &mut Vec<u8>,
    mut budget: Option<Budget<'_>>,
) -> io::Result<Read> {
    let start = out.len();
    let mut too_long = false;
    let mut no_room = false;
    let mut taken = 0usize;
    // Whether the previous chunk ended in CR (a CRLF split across two reads).
    let mut last_cr = false;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            out.truncate(start);
            return Ok(Read::Eof);
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..=i], true),
            None => (buf, false),
        };
        let n = chunk.len();
        if let Some((memory, held)) = budget.as_mut().filter(|_| !too_long && !no_room) {
            while out.len() - start + n > (taken + 1) * MIB {
                match Arc::clone(memory).try_acquire_owned() {
                    Ok(permit) => {
                        held.push(permit);
                        taken += 1;
                    }
                    Err(_) => {
                        no_room = true;
                        out.truncate(start);
                        break;
                    }
                }
            }
        }
        if !too_long && !no_room {
            if out.len() - start + n > max {
                too_long = true;
                out.truncate(start);
            } else {
                out.extend_from_slice(chunk);
            }
        }
        let ends_crlf = done && (if n >= 2 { chunk[n - 2] == b'\r' } else { last_cr });
        last_cr = chunk.last() == Some(&b'\r');
        reader.consume(n);
        if done {
            if too_long {
                return Ok(Read::TooLong(ends_crlf));
            }
            if no_room {
                return Ok(Read::NoRoom(ends_crlf));
            }
            out.pop();
            let crlf = out.len() > start && out.last() == Some(&b'\r');
            if crlf {
                out.pop();
            }
            return Ok(Read::Ok(crlf));
        }
    }
}

struct Session<'a, S> {
    peer: SocketAddr,
    config: &'a ListenerConfig,
    sink: &'a S,
    anvil: Option<&'a Anvil>,
    helo: Option<String>,
    tls: bool,
    from: Option<String>,
    recipients: Vec<String>,
    errors: u32,
    junk: u32,
    started: Instant,
    out: Vec<u8>,
    /// The user a successful AUTH named.
    authed: Option<String>,
    auth_failures: u32,
}

fn reply(code: u16, status: [u8; 3], text: &str) -> Reply {
    Reply::new(code, status, text)
}

impl<'a, S: Sink> Session<'a, S> {
    fn new(peer: SocketAddr, config: &'a ListenerConfig, sink: &'a S, anvil: Option<&'a Anvil>) -> Self {
        Self {
            peer,
            config,
            sink,
            anvil,
            helo: None,
            tls: false,
            from: None,
            recipients: Vec::new(),
            errors: 0,
            junk: 0,
            started: Instant::now(),
            out: Vec::new(),
            authed: None,
            auth_failures: 0,
        }
    }

    /// What is left of the session's lifetime.
    fn remaining(&self) -> Duration {
        self.config.max_session.saturating_sub(self.started.elapsed())
    }

    /// Counts a command that moves no mail; past the limit each one is an error.
    fn junk(&mut self) {
        self.junk += 1;
        let limit = if self.config.stressed() { 1 } else { self.config.junk_command_limit };
        if self.junk > limit {
            self.errors += 1;
        }
    }

    fn reset(&mut self) {
        self.from = None;
        self.recipients.clear();
    }

    fn push(&mut self, r: &Reply) {
        if !r.is_positive() && r.code != 354 {
            self.errors += 1;
        }
        self.out.extend_from_slice(format!("{r}\r\n").as_bytes());
    }

    /// Writes the pending replies, within `command_timeout`: a client that
    /// does not read cannot hold the session.
    async fn flush<IO: AsyncWrite + Unpin>(&mut self, io: &mut IO) -> io::Result<()> {
        if !self.out.is_empty() {
            let write = async {
                io.write_all(&self.out).await?;
                io.flush().await
            };
            tokio::time::timeout(self.config.command_timeout.min(self.remaining().max(Duration::from_secs(1))), write)
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the client does not read its replies"))??;
            self.out.clear();
        }
        Ok(())
    }

    /// Answers `reply`, writes everything pending and ends the session.
    async fn close<IO: AsyncWrite + Unpin>(&mut self, io: &mut IO, reply: &Reply) -> io::Result<Outcome<IO>> {
        self.push(reply);
        self.flush(io).await?;
        let _ = tokio::time::timeout(Duration::from_secs(5), io.shutdown()).await;
        Ok(Outcome::Closed)
    }

    async fn run<IO: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        mut io: BufReader<IO>,
        greeting: Option<String>,
        shutdown: &CancellationToken,
    ) -> io::Result<Outcome<IO>> {
        if let Some(g) = greeting {
            self.out.extend_from_slice(g.as_bytes());
        }
        loop {
            // Pipelining: answer once everything the client sent is handled,
            // or once enough replies wait (a client that never lets its input
            // run dry must not grow them without bound).
            if io.buffer().is_empty() || self.out.len() >= MAX_PENDING_REPLIES {
                self.flush(io.get_mut()).await?;
            }
            // Under stress one error ends a session (Postfix's smtpd_hard_error_limit then).
            if self.errors >= if self.config.stressed() { 1 } else { MAX_ERRORS } {
                return self.close(io.get_mut(), &reply(421, [4, 7, 0], "Too many errors; closing")).await;
            }
            let remaining = self.remaining();
            if remaining.is_zero() {
                return self.close(io.get_mut(), &reply(421, [4, 4, 2], "Session too long; closing")).await;
            }
            let line = tokio::select! {
                l = waited(self.config, self.config.command_timeout.min(remaining), read_line(&mut io, MAX_LINE)) => l,
                () = shutdown.cancelled() => {
                    return self.close(io.get_mut(), &reply(421, [4, 3, 2], "Shutting down; try again later")).await;
                }
            };
            let line = match line {
                Err(_) if self.remaining().is_zero() => {
                    return self.close(io.get_mut(), &reply(421, [4, 4, 2], "Session too long; closing")).await;
                }
                Err(_) => return self.close(io.get_mut(), &reply(421, [4, 4, 2], "Timeout; closing")).await,
                Ok(r) => r?,
            };
            let mut line = match line {
                Line::Eof => return Ok(Outcome::Closed),
                Line::TooLong => {
                    self.push(&reply(500, [5, 5, 2], "Line too long"));
                    continue;
                }
                // Commands may end in a bare LF (read as CRLF); only DATA must not.
                Line::Ok(l) => l,
            };
            line.extend_from_slice(b"\r\n");
            let request = match Request::parse(&mut line.iter()) {
                Ok(r) => r.into_owned(),
                Err(e) => {
                    let r = parse_error(&e);
                    self.push(&r);
                    continue;
                }
            };
            match request {
                Request::Ehlo { host } => {
                    self.junk();
                    self.reset();
                    self.helo = Some(host);
                    self.ehlo();
                }
                Request::Helo { host } => {
                    self.junk();
                    self.reset();
                    self.helo = Some(host);
                    let r = reply(250, [2, 0, 0], &self.config.hostname);
                    self.push(&r);
                }
                Request::Lhlo { .. } => self.push(&reply(500, [5, 5, 1], "This is SMTP, not LMTP")),
                Request::Mail { from } => {
                    if let Some(Err(why)) = self.anvil.map(|a| a.message(self.peer.ip())) {
                        info!(peer = %self.peer, reason = ?why, "SMTP client over its message rate; closing.");
                        return self.close(io.get_mut(), &why.reply()).await;
                    }
                    let r = if self.helo.is_none() {
                        reply(503, [5, 5, 1], "Send EHLO or HELO first")
                    } else if self.config.auth.is_some() && self.authed.is_none() {
                        reply(530, [5, 7, 0], "Authentication required")
                    } else if self.from.is_some() {
                        reply(503, [5, 5, 1], "Nested MAIL command")
                    } else if from.size > self.config.size_limit {
                        reply(552, [5, 3, 4], &format!("Message too large; at most {} octets", self.config.size_limit))
                    } else {
                        self.from = Some(from.address);
                        reply(250, [2, 1, 0], "Ok")
                    };
                    self.push(&r);
                }
                Request::Rcpt { to } => {
                    let rate = self.anvil.map_or(Ok(()), |a| a.recipient(self.peer.ip()));
                    let r = match &self.from {
                        None => reply(503, [5, 5, 1], "Need MAIL before RCPT"),
                        Some(_) if rate.is_err() => {
                            info!(peer = %self.peer, "SMTP client over its recipient rate.");
                            Refused::RecipientRate.reply()
                        }
                        Some(_) if self.recipients.len() >= self.config.max_recipients => {
                            reply(452, [4, 5, 3], "Too many recipients; send the rest in another transaction")
                        }
                        Some(from) => match self.sink.recipient(from, &to.address).await {
                            Ok(()) => {
                                self.recipients.push(to.address);
                                reply(250, [2, 1, 5], "Ok")
                            }
                            Err(r) => r,
                        },
                    };
                    self.push(&r);
                }
                Request::Data => {
                    if self.from.is_none() {
                        self.push(&reply(503, [5, 5, 1], "Need MAIL before DATA"));
                    } else if self.recipients.is_empty() {
                        self.push(&reply(554, [5, 5, 1], "No valid recipients"));
                    } else {
                        self.push(&reply(354, [2, 0, 0], "End data with <CR><LF>.<CR><LF>"));
                        self.flush(io.get_mut()).await?;
                        let r = self.data(&mut io).await?;
                        self.reset();
                        if (r.code == 550 && r.status == BARE_NEWLINE) || r.code == 421 {
                            return self.close(io.get_mut(), &r).await;
                        }
                        if r.is_positive() {
                            self.junk = 0;
                        }
                        self.push(&r);
                    }
                }
                Request::Bdat { .. } => self.push(&reply(502, [5, 5, 1], "BDAT is not offered; use DATA")),
                Request::Rset => {
                    self.junk();
                    self.reset();
                    self.push(&reply(250, [2, 0, 0], "Ok"));
                }
                Request::Noop { .. } => {
                    self.junk();
                    self.push(&reply(250, [2, 0, 0], "Ok"));
                }
                Request::Vrfy { .. } => {
                    self.junk();
                    self.push(&reply(252, [2, 5, 0], "Send some mail and see"));
                }
                Request::Help { .. } => {
                    self.junk();
                    self.push(&reply(214, [2, 0, 0], "See RFC 5321"));
                }
                Request::Quit => return self.close(io.get_mut(), &reply(221, [2, 0, 0], "Bye")).await,
                Request::StartTls => {
                    if self.tls {
                        self.push(&reply(503, [5, 5, 1], "Already under TLS"));
                    } else if self.config.tls.is_none() {
                        self.push(&reply(454, [4, 7, 0], "TLS not available"));
                    } else {
                        self.push(&reply(220, [2, 0, 0], "Ready to start TLS"));
                        self.flush(io.get_mut()).await?;
                        // Dropping the reader drops whatever was pipelined after STARTTLS.
                        return Ok(Outcome::StartTls(io.into_inner()));
                    }
                }
                Request::Auth { mechanism, initial_response } if self.config.auth.is_some() => {
                    let r = self.auth(&mut io, mechanism, initial_response).await?;
                    if self.auth_failures >= MAX_AUTH_FAILURES {
                        return self
                            .close(io.get_mut(), &reply(421, [4, 7, 0], "Too many failed logins; closing"))
                            .await;
                    }
                    self.push(&r);
                }
                Request::Auth { .. }
                | Request::Expn { .. }
                | Request::Etrn { .. }
                | Request::Atrn { .. }
                | Request::Burl { .. } => self.push(&reply(502, [5, 5, 1], "Command not implemented")),
            }
        }
    }

    fn ehlo(&mut self) {
        let mut lines = vec![self.config.hostname.clone(), format!("SIZE {}", self.config.size_limit)];
        lines.extend(["8BITMIME", "PIPELINING", "SMTPUTF8", "ENHANCEDSTATUSCODES"].map(String::from));
        if self.config.tls.is_some() && !self.tls {
            lines.push("STARTTLS".into());
        }
        if self.config.auth.is_some() && (self.tls || self.config.auth_without_tls) {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        let last = lines.len() - 1;
        for (i, l) in lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            self.out.extend_from_slice(format!("250{sep}{l}\r\n").as_bytes());
        }
    }

    /// One `AUTH` exchange (PLAIN, with or without an initial response, or
    /// LOGIN); the reply to send.
    async fn auth<IO: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut BufReader<IO>,
        mechanism: u64,
        initial: String,
    ) -> io::Result<Reply> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let Some(auth) = self.config.auth.clone() else {
            return Ok(reply(502, [5, 5, 1], "Command not implemented"));
        };
        if self.authed.is_some() {
            return Ok(reply(503, [5, 5, 1], "Already authenticated"));
        }
        if !self.tls && !self.config.auth_without_tls {
            return Ok(reply(538, [5, 7, 11], "Encryption required; use STARTTLS first"));
        }
        if self.from.is_some() {
            return Ok(reply(503, [5, 5, 1], "AUTH is not allowed during a transaction"));
        }
        // The next line of the exchange, decoded; None for "*" (cancelled) or bad base64.
        async fn answer<IO: AsyncRead + AsyncWrite + Unpin, S: Sink>(
            s: &mut Session<'_, S>,
            io: &mut BufReader<IO>,
            challenge: &str,
        ) -> io::Result<Result<Vec<u8>, Reply>> {
            s.out.extend_from_slice(format!("334 {challenge}\r\n").as_bytes());
            s.flush(io.get_mut()).await?;
            let wait = s.config.command_timeout.min(s.remaining());
            let line = match waited(s.config, wait, read_line(io, MAX_LINE)).await {
                Ok(l) => l?,
                Err(()) => return Ok(Err(reply(421, [4, 4, 2], "Timeout"))),
            };
            Ok(match line {
                Line::Ok(l) if l.trim_ascii() == b"*" => Err(reply(501, [5, 0, 0], "Authentication cancelled")),
                Line::Ok(l) => base64::engine::general_purpose::STANDARD
                    .decode(l.trim_ascii())
                    .map_err(|_| reply(501, [5, 5, 2], "Cannot decode the response")),
                Line::TooLong => Err(reply(500, [5, 5, 6], "Authentication exchange line too long")),
                Line::Eof => Err(reply(421, [4, 4, 2], "Connection closed")),
            })
        }
        let (user, password) = if mechanism == smtp_proto::AUTH_PLAIN {
            let data = if initial.is_empty() {
                match answer(self, io, "").await? {
                    Ok(d) => d,
                    Err(r) => return Ok(r),
                }
            } else if initial == "=" {
                Vec::new()
            } else {
                match b64.decode(initial.trim()) {
                    Ok(d) => d,
                    Err(_) => return Ok(reply(501, [5, 5, 2], "Cannot decode the response")),
                }
            };
            let mut it = data.split(|&b| b == 0);
            match (it.next(), it.next(), it.next(), it.next()) {
                (Some(authz), Some(user), Some(pass), None) if authz.is_empty() || authz == user => {
                    (user.to_vec(), pass.to_vec())
                }
                _ => {
                    self.auth_failures += 1;
                    return Ok(reply(535, [5, 7, 8], "Authentication credentials invalid"));
                }
            }
        } else if mechanism == smtp_proto::AUTH_LOGIN {
            let user = if initial.is_empty() {
                match answer(self, io, "VXNlcm5hbWU6").await? {
                    Ok(d) => d,
                    Err(r) => return Ok(r),
                }
            } else {
                match b64.decode(initial.trim()) {
                    Ok(d) => d,
                    Err(_) => return Ok(reply(501, [5, 5, 2], "Cannot decode the response")),
                }
            };
            let password = match answer(self, io, "UGFzc3dvcmQ6").await? {
                Ok(d) => d,
                Err(r) => return Ok(r),
            };
            (user, password)
        } else {
            return Ok(reply(504, [5, 5, 4], "Unrecognized authentication type; use PLAIN or LOGIN"));
        };
        let name = String::from_utf8_lossy(&user).into_owned();
        if auth.check(user, password).await {
            info!(peer = %self.peer, user = %name, "SMTP client authenticated.");
            self.authed = Some(name);
            Ok(reply(235, [2, 7, 0], "Authentication successful"))
        } else {
            self.auth_failures += 1;
            info!(peer = %self.peer, "SMTP authentication failed.");
            Ok(reply(535, [5, 7, 8], "Authentication credentials invalid"))
        }
    }

    /// Reads message data up to `<CR><LF>.<CR><LF>`, then hands it to the sink.
    async fn data<IO: AsyncRead + Unpin>(&mut self, io: &mut BufReader<IO>) -> io::Result<Reply> {
        let mut message = Vec::new();
        let (mut too_big, mut bare, mut no_room) = (false, false, false);
        // Once the memory budget is used up: the file the rest goes to, and what it holds.
        let mut spill: Option<Spill> = None;
        // Each MiB past the first is taken from the listener's budget for
        // message data in memory, and given back when this message is done.
        let mut held = Vec::new();
        // The DATA command line ended the previous line.
        let mut after_crlf = true;
        let (started, mut received) = (Instant::now(), 0u64);
        loop {
            let mut wait = self.config.data_timeout.min(self.remaining());
            let mut by_rate = false;
            if let Some(earned) = received.checked_div(self.config.min_data_rate) {
                let deadline = self.config.data_timeout + Duration::from_secs(earned);
                let left = deadline.saturating_sub(started.elapsed());
                by_rate = left < wait;
                wait = wait.min(left);
            }
            let too_slow = || {
                info!(peer = %self.peer, received, "SMTP client sends message data too slowly; closing.");
                Ok(reply(421, [4, 4, 2], "Message data too slow; closing"))
            };
            if wait.is_zero() {
                return too_slow();
            }
            // A line may take what is left of the message (and a dot and CRLF);
            // past the limit the rest is read and dropped.
            let dropping = too_big || bare || no_room;
            let kept = spill.as_ref().map_or(0, |s| s.len) + message.len();
            let room = if dropping { MAX_LINE } else { self.config.read_limit.saturating_sub(kept) + 3 };
            // Past the first MiB the buffer grows a MiB at a time, not by
            // doubling (a 9 MB message would hold 16 MB).
            if message.len() >= MIB && message.capacity() - message.len() < MIB / 4 {
                message.reserve_exact(MIB);
            }
            let start = message.len();
            // A long line takes from the memory budget as it arrives (not
            // once whole), unless this message is already past caring.
            let budget = (!dropping).then_some((&self.config.data_memory, &mut held));
            let Ok(line) = waited(self.config, wait, read_line_budgeted(io, room, &mut message, budget)).await else {
                return if by_rate { too_slow() } else { Ok(reply(421, [4, 4, 2], "Timeout in DATA; closing")) };
            };
            let line = line?;
            // What arrived: the line as stored (before any truncation below) and its end.
            received += message.len().saturating_sub(start) as u64 + 2;
            match line {
                Read::Eof => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed in DATA")),
                Read::TooLong(crlf) => {
                    too_big |= !dropping;
                    bare |= !crlf;
                    after_crlf = crlf;
                }
                Read::NoRoom(crlf) => {
                    no_room = true;
                    message = Vec::new();
                    held.clear();
                    bare |= !crlf;
                    after_crlf = crlf;
                }
                // Only a dot alone between two CRLFs ends the data.
                Read::Ok(true) if after_crlf && &message[start..] == b"." => {
                    message.truncate(start);
                    break;
                }
                Read::Ok(crlf) => {
                    if !crlf || message[start..].contains(&b'\r') {
                        bare = true;
                    }
                    after_crlf = crlf;
                    if message.get(start) == Some(&b'.') {
                        message.remove(start);
                    }
                    if spill.as_ref().map_or(0, |s| s.len) + message.len() + 2 > self.config.read_limit {
                        too_big = true;
                    }
                    if too_big || bare || no_room {
                        message.truncate(start);
                    } else {
                        message.extend_from_slice(b"\r\n");
                    }
                    while !no_room && spill.is_none() && message.len() > (held.len() + 1) * MIB {
                        match Arc::clone(&self.config.data_memory).try_acquire_owned() {
                            Ok(permit) => held.push(permit),
                            Err(_) => match Spill::start(self.config, &message).await {
                                Some(s) => {
                                    debug!(peer = %self.peer, "Message data in memory is at its limit; the rest goes to a file.");
                                    spill = Some(s);
                                    message = Vec::new();
                                    held.clear();
                                }
                                None => {
                                    no_room = true;
                                    message = Vec::new();
                                }
                            },
                        }
                    }
                    if let Some(s) = spill.as_mut().filter(|_| message.len() >= SPILL_CHUNK) {
                        if s.write(&message).await.is_err() {
                            no_room = true;
                        }
                        message.clear();
                        // What a long line took while it arrived is in the file now.
                        held.clear();
                    }
                }
            }
            if dropping && !message.is_empty() {
                message = Vec::new();
            }
        }
        if bare {
            warn!(peer = %self.peer, "Bare <LF> or <CR> in DATA (SMTP smuggling?); message refused.");
            return Ok(reply(550, BARE_NEWLINE, "Message refused: bare <LF> or <CR> received"));
        }
        if too_big {
            return Ok(reply(552, [5, 3, 4], &format!("Message too large; at most {} octets", self.config.size_limit)));
        }
        if no_room {
            warn!(peer = %self.peer, "Message data in memory is at its limit; message deferred.");
            return Ok(reply(452, [4, 3, 1], "Insufficient system storage; try again later"));
        }
        if let Some(s) = spill.take() {
            // Whole now: back into memory once the budget has room for it
            // (those holding it are reading their own messages, or handing
            // them over, and let go within their own timeouts).
            let mib = (s.len + message.len()).div_ceil(MIB).saturating_sub(1).min(self.config.data_memory_mib);
            let budget = Arc::clone(&self.config.data_memory);
            let permits = u32::try_from(mib).unwrap_or(u32::MAX);
            let wait = self.config.command_timeout.min(self.remaining());
            let Ok(Ok(permits)) = waited(self.config, wait, budget.acquire_many_owned(permits)).await else {
                return Ok(reply(451, [4, 3, 0], "Busy with other large messages; try again later"));
            };
            held.push(permits);
            match s.finish(message).await {
                Ok(whole) => message = whole,
                Err(e) => {
                    warn!(peer = %self.peer, error = %e, "Cannot read back message data from its file; message deferred.");
                    return Ok(reply(451, [4, 3, 0], "Local error; try again later"));
                }
            }
        }
        let envelope = Envelope {
            peer: self.peer,
            helo: self.helo.clone().unwrap_or_default(),
            tls: self.tls,
            from: self.from.clone().unwrap_or_default(),
            recipients: self.recipients.clone(),
        };
        let r = self.sink.message(envelope, message).await;
        // The sink logs what it kept; a refusal is logged here.
        if r.is_positive() {
            debug!(peer = %self.peer, code = r.code, "SMTP message handled.");
        } else {
            info!(peer = %self.peer, code = r.code, "SMTP message refused.");
        }
        Ok(r)
    }
}

fn parse_error(e: &ParseError) -> Reply {
    match e {
        ParseError::UnknownCommand => reply(500, [5, 5, 1], "Command not recognized"),
        ParseError::InvalidSenderAddress => reply(501, [5, 1, 7], "Bad sender address syntax"),
        ParseError::InvalidRecipientAddress => reply(501, [5, 1, 3], "Bad recipient address syntax"),
        ParseError::SyntaxError { syntax } => reply(501, [5, 5, 4], &format!("Syntax: {syntax}")),
        ParseError::InvalidParameter { param } => reply(501, [5, 5, 4], &format!("Invalid parameter {param}")),
        ParseError::UnsupportedParameter { param } => {
            reply(555, [5, 5, 4], &format!("Unsupported parameter {}", param.chars().take(64).collect::<String>()))
        }
        ParseError::ResponseTooLong => reply(500, [5, 5, 2], "Line too long"),
        ParseError::NeedsMoreData { .. } | ParseError::InvalidResponse { .. } => reply(501, [5, 5, 4], "Syntax error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepts `@example.org` and keeps every message it is given.
    #[derive(Default)]
    struct Keep(Mutex<Vec<Vec<u8>>>);

    impl Sink for Keep {
        async fn recipient(&self, _from: &str, to: &str) -> Result<(), Reply> {
            if to.ends_with("@example.org") {
                Ok(())
            } else {
                Err(Reply::new(550, [5, 7, 1], "no"))
            }
        }

        async fn message(&self, _envelope: Envelope, data: Vec<u8>) -> Reply {
            self.0.lock().unwrap().push(data);
            Reply::new(250, [2, 0, 0], "Ok")
        }
    }

    fn peer() -> SocketAddr {
        "192.0.2.1:2525".parse().unwrap()
    }

    /// Runs a session on `input` (then end of input); returns the replies and what the sink kept.
    async fn converse(config: &ListenerConfig, input: &[u8]) -> (String, Vec<Vec<u8>>) {
        let (client, server) = tokio::io::duplex((1 << 20).max(input.len() + 4096));
        let sink = Keep::default();
        let (mut r, mut w) = tokio::io::split(client);
        w.write_all(input).await.unwrap();
        w.shutdown().await.unwrap();
        let stop = CancellationToken::new();
        let session = run_session(server, peer(), config, &sink, None, &stop);
        let mut out = Vec::new();
        let (result, _) = tokio::join!(session, tokio::io::AsyncReadExt::read_to_end(&mut r, &mut out));
        result.unwrap();
        (String::from_utf8_lossy(&out).into_owned(), sink.0.into_inner().unwrap())
    }

    const HEAD: &[u8] = b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n";

    #[tokio::test]
    async fn a_bare_lf_never_ends_data_and_smuggling_is_refused() {
        let config = ListenerConfig::new("mx.test", 10_000);
        let mut input = HEAD.to_vec();
        input.extend_from_slice(
            b"Subject: hi\r\n\r\nhi\n.\r\nMAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n\
              From: ceo@bank.example\r\n\r\nsmuggled\r\n.\r\nQUIT\r\n",
        );
        let (replies, kept) = converse(&config, &input).await;
        assert!(kept.is_empty(), "nothing is delivered: {kept:?}");
        assert!(replies.contains("550 5.5.2"), "{replies}");
        // The session ends with the refusal: the smuggled commands were never read as commands.
        assert!(!replies.contains("221"), "{replies}");
        assert_eq!(replies.matches("354").count(), 1, "{replies}");
    }

    #[tokio::test]
    async fn a_bare_cr_in_data_is_refused_and_proper_crlf_mail_passes() {
        let config = ListenerConfig::new("mx.test", 10_000);
        let mut input = HEAD.to_vec();
        input.extend_from_slice(b"hi\r.\r\nMAIL FROM:<e@x>\r\n.\r\n");
        let (replies, kept) = converse(&config, &input).await;
        assert!(kept.is_empty() && replies.contains("550 5.5.2"), "{replies}");

        let mut input = HEAD.to_vec();
        input.extend_from_slice(b"Subject: ok\r\n\r\n..dot\r\nline\r\n.\r\nQUIT\r\n");
        let (replies, kept) = converse(&config, &input).await;
        assert_eq!(kept, vec![b"Subject: ok\r\n\r\n.dot\r\nline\r\n".to_vec()], "{replies}");
        assert!(replies.contains("221"), "{replies}");
    }

    #[tokio::test]
    async fn junk_commands_end_the_session() {
        let mut config = ListenerConfig::new("mx.test", 10_000);
        config.junk_command_limit = 5;
        let input = b"NOOP\r\n".repeat(1000);
        let (replies, _) = converse(&config, &input).await;
        assert_eq!(replies.matches("250 2.0.0 Ok").count(), 5 + MAX_ERRORS as usize, "{replies}");
        assert!(replies.ends_with("421 4.7.0 Too many errors; closing\r\n"), "{replies}");
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_is_dropped_after_the_write_timeout() {
        let mut config = ListenerConfig::new("mx.test", 10_000);
        config.command_timeout = Duration::from_millis(500);
        config.junk_command_limit = u32::MAX;
        // A tiny pipe that the client never reads; it keeps its input from running dry.
        let (client, server) = tokio::io::duplex(256);
        let (_r, mut w) = tokio::io::split(client);
        let writer = tokio::spawn(async move {
            for _ in 0..100_000 {
                if w.write_all(b"HELP\r\nHELP\r\nHE").await.is_err() || w.write_all(b"LP\r\n").await.is_err() {
                    break;
                }
            }
        });
        let sink = Keep::default();
        let started = Instant::now();
        let result = run_session(server, peer(), &config, &sink, None, &CancellationToken::new()).await;
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(30));
        writer.abort();
    }

    #[test]
    fn the_anvil_limits_one_address_and_not_another() {
        let anvil = Anvil::new(ClientLimits {
            max_connections: 2,
            connection_rate: 3,
            message_rate: 1,
            recipient_rate: 2,
            exempt: vec![parse_network("10.0.0.0/8").unwrap()],
        });
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let first = anvil.admit(a).unwrap();
        let _second = anvil.admit(a).unwrap();
        assert_eq!(anvil.admit(a).err(), Some(Refused::Connections));
        let _other = anvil.admit(b).unwrap();
        drop(first);
        let _third = anvil.admit(a).unwrap();
        // Three connections this minute: the rate stops the fourth even with a free slot.
        drop(_third);
        assert_eq!(anvil.admit(a).err(), Some(Refused::ConnectionRate));
        assert!(anvil.message(a).is_ok());
        assert_eq!(anvil.message(a), Err(Refused::MessageRate));
        // Recipients per minute, answered 450 4.7.1 (not a hang-up).
        assert!(anvil.recipient(a).is_ok() && anvil.recipient(a).is_ok());
        assert_eq!(anvil.recipient(a), Err(Refused::RecipientRate));
        assert_eq!(Refused::RecipientRate.reply().code, 450);
        assert!(anvil.recipient(b).is_ok());
        for _ in 0..10 {
            std::mem::forget(anvil.admit("10.1.2.3".parse().unwrap()).unwrap());
        }
        assert!(anvil.message("::ffff:10.0.0.1".parse().unwrap()).is_ok());
        // One IPv6 /64 is one client.
        let v6 = Anvil::new(ClientLimits { max_connections: 1, ..ClientLimits::default() });
        let _a = v6.admit("2001:db8::1".parse().unwrap()).unwrap();
        assert_eq!(v6.admit("2001:db8::2:3".parse().unwrap()).err(), Some(Refused::Connections));
        assert!(v6.admit("2001:db8:0:1::1".parse().unwrap()).is_ok());
        // One /48 (a site) holds at most SITE_FACTOR clients' worth, however
        // many /64s it uses; another site is served, and a session that ends
        // gives its place back.
        let site = Anvil::new(ClientLimits { max_connections: 2, ..ClientLimits::default() });
        let held: Vec<_> =
            (0..20).filter_map(|i| site.admit(format!("2001:db8:1:{i:x}::1").parse().unwrap()).ok()).collect();
        assert_eq!(held.len(), 2 * SITE_FACTOR);
        assert_eq!(site.admit("2001:db8:1:ff::1".parse().unwrap()).err(), Some(Refused::SiteConnections));
        assert!(site.admit("2001:db8:2::1".parse().unwrap()).is_ok());
        drop(held);
        assert!(site.admit("2001:db8:1:ff::1".parse().unwrap()).is_ok());
    }

    #[tokio::test]
    async fn message_data_in_memory_is_bounded_across_sessions() {
        // A budget of 1 MiB beyond each session's first: a 3 MiB message cannot
        // be held (452 4.3.1), a second message after it is still read whole,
        // and long lines arrive intact, dot-stuffing undone.
        let mut config = ListenerConfig::new("mx.test", 8 << 20);
        config.data_memory = Arc::new(Semaphore::new(1));
        let mut input = HEAD.to_vec();
        let line = format!("{}\r\n", "y".repeat(5000));
        for _ in 0..(3 * MIB / line.len()) {
            input.extend_from_slice(line.as_bytes());
        }
        input.extend_from_slice(b".\r\nRSET\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n");
        input.extend_from_slice(format!("..dot\r\n{line}.\r\nQUIT\r\n").as_bytes());
        let (replies, kept) = converse(&config, &input).await;
        assert!(replies.contains("452 4.3.1"), "{replies}");
        assert_eq!(kept.len(), 1, "{replies}");
        assert_eq!(kept[0], format!(".dot\r\n{line}").into_bytes());
        assert_eq!(config.data_memory.available_permits(), 1, "given back");
    }

    #[tokio::test]
    async fn past_the_memory_budget_message_data_goes_to_a_file_and_arrives_whole() {
        // The same budget with a spill directory: the 3 MiB message is kept
        // (in an unlinked file while it arrives), octet for octet, dot-stuffing
        // undone; a message too large for the listener is still refused; the
        // budget is given back and no file is left.
        let dir = tempfile::tempdir().unwrap();
        let mut config = ListenerConfig::new("mx.test", 4 << 20);
        config.data_memory = Arc::new(Semaphore::new(1));
        config.data_memory_mib = 1;
        config.spill_dir = Some(dir.path().to_owned());
        let mut input = HEAD.to_vec();
        let mut expected = Vec::new();
        for i in 0..(3 * MIB / 5000) {
            let line = format!("{}{}\r\n", if i % 7 == 0 { ".." } else { "" }, "z".repeat(4998));
            input.extend_from_slice(line.as_bytes());
            expected.extend_from_slice(line.strip_prefix('.').unwrap_or(&line).as_bytes());
        }
        input.extend_from_slice(b".\r\nRSET\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n");
        for _ in 0..(5 * MIB / 5000) {
            input.extend_from_slice(format!("{}\r\n", "w".repeat(4998)).as_bytes());
        }
        input.extend_from_slice(b".\r\nQUIT\r\n");
        let (replies, kept) = converse(&config, &input).await;
        assert!(!replies.contains("452"), "{replies}");
        assert!(replies.contains("552 5.3.4"), "the 5 MiB one is too large: {replies}");
        assert_eq!(kept.len(), 1, "{replies}");
        assert!(kept[0] == expected, "{} octets kept, {} sent", kept[0].len(), expected.len());
        assert_eq!(config.data_memory.available_permits(), 1, "given back");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing left behind");
    }

    #[tokio::test]
    async fn files_of_message_data_are_bounded_too() {
        // 1 MiB of disk for spilled data, or no room on the filesystem: a
        // message that needs more is deferred (452 4.3.1), nothing is kept.
        let dir = tempfile::tempdir().unwrap();
        let mut input = HEAD.to_vec();
        for _ in 0..(4 * MIB / 5000) {
            input.extend_from_slice(format!("{}\r\n", "q".repeat(4998)).as_bytes());
        }
        input.extend_from_slice(b".\r\nQUIT\r\n");
        let mut config = ListenerConfig::new("mx.test", 8 << 20);
        config.set_data_memory(1);
        config.spill_dir = Some(dir.path().to_owned());
        config.spill_mib = Arc::new(Semaphore::new(1));
        let (replies, kept) = converse(&config, &input).await;
        assert!(replies.contains("452 4.3.1") && kept.is_empty(), "{replies}");
        assert_eq!(config.spill_mib.available_permits(), 1, "given back");
        config.spill_mib = Arc::new(Semaphore::new(SPILL_MIB));
        config.spill_room = Some(Arc::new(|| false));
        let (replies, kept) = converse(&config, &input).await;
        assert!(replies.contains("452 4.3.1") && kept.is_empty(), "{replies}");
        config.spill_room = Some(Arc::new(|| true));
        let (replies, kept) = converse(&config, &input).await;
        assert!(replies.contains("250 ") && kept.len() == 1, "{replies}");
    }

    #[tokio::test]
    async fn one_long_line_is_within_the_memory_budget_as_it_arrives() {
        // A 3 MiB line (no line end before it is whole): with a budget of 1
        // MiB it cannot be held, and is deferred as it arrives: it is never
        // whole in memory (read whole first, it would have gone to the spill
        // file and been accepted); with room it arrives intact.
        let dir = tempfile::tempdir().unwrap();
        let mut input = HEAD.to_vec();
        let line = "L".repeat(3 * MIB);
        input.extend_from_slice(format!("{line}\r\n.\r\nQUIT\r\n").as_bytes());
        let mut config = ListenerConfig::new("mx.test", 8 << 20);
        config.set_data_memory(1);
        config.spill_dir = Some(dir.path().to_owned());
        let (replies, kept) = converse(&config, &input).await;
        assert!(replies.contains("452 4.3.1") && kept.is_empty(), "{replies}");
        assert_eq!(config.data_memory.available_permits(), 1, "given back");
        config.set_data_memory(4);
        let (replies, kept) = converse(&config, &input).await;
        assert_eq!(kept.len(), 1, "{replies}");
        assert!(kept[0] == format!("{line}\r\n").into_bytes());
        assert_eq!(config.data_memory.available_permits(), 4, "given back");
    }

    #[tokio::test]
    async fn an_overlong_line_ending_in_a_bare_lf_does_not_end_data_early() {
        let config = ListenerConfig::new("mx.test", 10_000);
        let mut input = HEAD.to_vec();
        input.extend_from_slice(&vec![b'x'; 1200]);
        input.extend_from_slice(
            b"\n.\r\nMAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nevil\r\n.\r\nQUIT\r\n",
        );
        let (replies, kept) = converse(&config, &input).await;
        assert!(kept.is_empty(), "{kept:?}");
        assert!(replies.contains("550 5.5.2") && !replies.contains("221"), "{replies}");
        assert_eq!(replies.matches("354").count(), 1, "{replies}");
    }

    #[test]
    fn networks_parse_and_match() {
        let (n, b) = parse_network("127.0.0.0/8").unwrap();
        assert!(in_network("127.9.9.9".parse().unwrap(), n, b));
        assert!(!in_network("128.0.0.1".parse().unwrap(), n, b));
        assert!(in_network("::ffff:127.0.0.2".parse().unwrap(), n, b));
        let (n, b) = parse_network("::1").unwrap();
        assert!(in_network("::1".parse().unwrap(), n, b) && !in_network("::2".parse().unwrap(), n, b));
        let (n, b) = parse_network("0.0.0.0/0").unwrap();
        assert!(in_network("8.8.8.8".parse().unwrap(), n, b));
        assert!(parse_network("10.0.0.0/33").is_err() && parse_network("nope").is_err());
    }

    #[tokio::test]
    async fn read_line_caps_and_recovers() {
        let input: &[u8] = b"short\r\nxxxxxxxxxxxxxxxxxxxx\r\nbare lf\nend";
        let mut r = BufReader::with_capacity(4, input);
        let mut out = b"kept ".to_vec();
        assert!(matches!(read_line_into(&mut r, 10, &mut out).await.unwrap(), Read::Ok(true)));
        assert_eq!(out, b"kept short");
        assert!(matches!(read_line_into(&mut r, 10, &mut out).await.unwrap(), Read::TooLong(true)));
        assert_eq!(out, b"kept short", "nothing of a long line is kept");
        assert!(matches!(read_line(&mut r, 10).await.unwrap(), Line::Ok(l) if l == b"bare lf"));
        assert!(matches!(read_line_into(&mut r, 10, &mut out).await.unwrap(), Read::Eof));
        assert_eq!(out, b"kept short", "nor of a line cut by EOF");
    }
}
