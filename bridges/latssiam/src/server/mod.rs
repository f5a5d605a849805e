//! The reference LATSSIAM server: all five verbs of PROFILE.md section 4 over
//! TLS, with durable mailboxes ([`store`]).
//!
//! One task per connection, bounded by a semaphore taken before each accept;
//! one [`CancellationToken`] stops the listener, lets in-flight exchanges
//! finish, answers waiting `ACCEPT`s with `33`, and [`Server::serve`] returns
//! once every session has ended.
//!
//! Concurrent `ACCEPT`s of one mailbox (several gateway nodes polling it) are
//! handed different messages: a message offered to one session is skipped by
//! the others until that session answers it (deleted) or ends without an
//! answer (offered again, waking waiting `ACCEPT`s); see [`store::Offer`].
//!
//! Privacy (after the SMP server's rules): nothing of a message's content, and
//! no sender/recipient pair, is logged at the default level; deleted messages
//! leave nothing behind in the store.

mod bodies;
pub mod store;

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::conn::{Connection, ReadError};
use crate::crypto::{self, CryptoError};
use crate::fingerprint::Fingerprint;
use crate::identity::{CertInfo, Identity};
use crate::tls::{self, ServerStream};
use crate::wire::{Block, Code, Command, Frame, Label, Password, Status, MAX_BLOCK_DER};
use crate::{attest, Address};
use store::{Mailbox, MailboxState, Offer, Store, StoreError, StoredMessage};

pub use crate::limits::Rate;

/// Everything a server needs; every limit is configurable.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where to listen (port 1977 by default).
    pub listen: SocketAddr,
    /// The sled directory.
    pub data_dir: PathBuf,
    /// The host name the server answers for (its CSR names it).
    pub host: String,
    /// The address domains whose mailboxes it hosts (`15` for others); empty = just `host`.
    pub domains: Vec<String>,
    /// The pre-shared registration password; `None` = registration not offered (`15`).
    pub register_password: Option<Password>,
    /// Registrations wait for `server approve` (`12`).
    pub require_approval: bool,
    /// `SEND` is answered `32` and a signature is required.
    pub require_signature: bool,
    /// If set, only these client certificates may `SEND` (`21` for others).
    pub allowed_senders: Option<HashSet<Fingerprint>>,
    /// Clients whose `SEND`s are not rate-limited (a gateway on its own home server).
    pub rate_exempt: HashSet<Fingerprint>,
    /// Most simultaneous connections.
    pub max_connections: usize,
    /// Most simultaneous connections from one client address (IPv6: one
    /// /64); more are closed before the TLS handshake. 0: no limit.
    pub max_connections_per_client: usize,
    /// How long a session may sit silent before `54` and a hang-up.
    pub idle_timeout: Duration,
    /// Longest `ACCEPT` deadline; a longer one is hung up on.
    pub max_accept_deadline: Duration,
    /// Most unread messages one sender may have in one mailbox (`36`).
    pub max_unread_per_sender: u32,
    /// Most unread messages in one mailbox (`36`).
    pub max_unread_per_mailbox: u32,
    /// Largest message DER accepted (`39`); at most the 400-line ceiling.
    pub max_message_octets: usize,
    /// Free space (octets) the data dir's filesystem must keep: below it a
    /// `SEND` is answered `53` (temporary; the sender retries) before
    /// anything is written, since sled refuses every write after it met a
    /// full disk. 0: no check.
    pub min_free: u64,
    /// Per-client rate of `SEND`s (`37`).
    pub send_rate: Rate,
    /// Per-client rate of `ACCEPT`s that find nothing (`37`).
    pub empty_accept_rate: Rate,
}

impl ServerConfig {
    /// Defaults for `host`, keeping data in `data_dir`.
    pub fn new(host: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 1977)),
            data_dir: data_dir.into(),
            host: host.into(),
            domains: Vec::new(),
            register_password: None,
            require_approval: false,
            require_signature: false,
            allowed_senders: None,
            rate_exempt: HashSet::new(),
            max_connections: 4096,
            max_connections_per_client: 256,
            idle_timeout: Duration::from_secs(300),
            max_accept_deadline: Duration::from_secs(900),
            max_unread_per_sender: 1000,
            max_unread_per_mailbox: 10_000,
            max_message_octets: MAX_BLOCK_DER,
            min_free: 32 << 20,
            send_rate: Rate { per_second: 200.0, burst: 1000.0 },
            empty_accept_rate: Rate { per_second: 1.0, burst: 10.0 },
        }
    }

    fn serves(&self, host: &str) -> bool {
        if self.domains.is_empty() {
            return host.eq_ignore_ascii_case(&self.host);
        }
        self.domains.iter().any(|d| d.eq_ignore_ascii_case(host))
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The mailbox store.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The TLS configuration.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The server's own attestation request.
    #[error(transparent)]
    Attestation(#[from] attest::AttestationError),
    /// Binding the listener.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// What went wrong.
        source: std::io::Error,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Limit {
    Send,
    EmptyAccept,
}

struct Shared {
    config: ServerConfig,
    identity: Arc<Identity>,
    store: Arc<Store>,
    csr: Vec<u8>,
    /// `SEND`s and empty `ACCEPT`s per client certificate.
    limiter: crate::limits::Buckets<(Fingerprint, Limit)>,
    shutdown: CancellationToken,
    /// Sessions per client address and site.
    per_client: Arc<crate::limits::PerClient>,
    /// Refusals by the per-client limit, logged at most once a second.
    refusals: crate::limits::LogThrottle,
    free_space: crate::files::FreeSpace,
    /// Wrong registration passwords: each answered later than the last.
    wrong_passwords: crate::limits::FailureDelay,
    /// Wrong registration passwords per client address (and site) and
    /// minute; a client with none left is refused before its password is
    /// compared.
    wrong_password_clients: crate::limits::Lookups,
    /// Registrations with the right password per client address (and site)
    /// and minute: each may write and flush a mailbox record.
    registering_clients: crate::limits::Lookups,
}

pub use crate::limits::client_key;

impl Shared {
    /// The mailbox of `owner` if it is active; otherwise the status to answer
    /// (`34`, `35`, `38`, or `53` if the store cannot be read).
    fn active_mailbox(&self, owner: &Fingerprint) -> Result<Mailbox, Status> {
        let mailbox = self.store.mailbox(owner).map_err(|e| {
            warn!(error = %e, "Store read failed.");
            Status::of(Code::InternalError)
        })?;
        let Some(m) = mailbox else { return Err(Status::of(Code::NoMailbox)) };
        match &m.state {
            MailboxState::Active => Ok(m),
            MailboxState::Pending => Err(Status::of(Code::NoMailbox)),
            MailboxState::Gone => Err(Status::of(Code::MailboxGone)),
            MailboxState::Moved(host) => Err(Status::moved(host).unwrap_or(Status::of(Code::MailboxMoved))),
        }
    }

    /// Whether `me` may SEND to `to` now: rate (`37`), allowed senders
    /// (`21`), the mailbox (`34`, `35`, `38`), quotas (`36`).
    fn may_send(&self, me: &Fingerprint, to: &Fingerprint) -> Result<(), Status> {
        let cfg = &self.config;
        if !cfg.rate_exempt.contains(me) && !self.limiter.take(&[((*me, Limit::Send), cfg.send_rate)]) {
            return Err(Status::of(Code::SlowDown));
        }
        if cfg.allowed_senders.as_ref().is_some_and(|allowed| !allowed.contains(me)) {
            return Err(Status::of(Code::CertificateUnauthorised));
        }
        self.active_mailbox(to)?;
        let (total, mine) = self.store.unread(to, me);
        if mine >= cfg.max_unread_per_sender || total >= cfg.max_unread_per_mailbox {
            return Err(Status::of(Code::MailboxFull));
        }
        Ok(())
    }

    /// Whether a message from `me` may be kept: size (`39`), structure and
    /// signature (`50` with a hang-up when either does not parse; `52` when the
    /// signature does not verify or is not `me`'s), free space (`53`).
    fn may_keep(&self, me: &Fingerprint, signature: Option<&[u8]>, message: &[u8]) -> Result<(), (Status, bool)> {
        let refuse = |code, text: &str| (Status::with_text(code, text), false);
        if message.len() > self.config.max_message_octets {
            return Err((Status::of(Code::MessageTooLong), false));
        }
        if let Err(e) = crypto::check_message_structure(message) {
            debug!(error = %e, "ENCRYPTED MESSAGE is not CMS AuthEnvelopedData.");
            return Err((Status::of(Code::SyntaxError), true));
        }
        if let Some(sig) = signature {
            match crypto::verify(sig, message) {
                Ok(signer) if Fingerprint::of(&signer) == *me => {}
                Ok(_) => {
                    debug!("Signature by someone other than the TLS client.");
                    return Err(refuse(Code::MessageRefused, "Signer is not the TLS client"));
                }
                Err(CryptoError::Malformed(e)) => {
                    debug!(error = %e, "SIGNATURE is not CMS SignedData.");
                    return Err((Status::of(Code::SyntaxError), true));
                }
                Err(e) => {
                    debug!(error = %e, "Signature refused.");
                    return Err(refuse(Code::MessageRefused, "Signature does not verify"));
                }
            }
        }
        if let Err(free) = self.free_space.check() {
            warn!(free_mb = free >> 20, "The data dir's disk is low on space; a message refused with 53.");
            return Err(refuse(Code::InternalError, "Storage low; try again later"));
        }
        Ok(())
    }

    /// Writes a message (not yet durable, hidden until published) if its
    /// mailbox is still active: `SEND` looked at the mailbox before the
    /// blocks came, and a deregistration or a move meanwhile would leave a
    /// message written after it in a mailbox nobody reads. Deregistration
    /// writes its state before it deletes the messages, so either it
    /// deletes this one or this check sees its state.
    fn insert_while_active(
        &self,
        to: &Fingerprint,
        from: &Fingerprint,
        signature: Option<&[u8]>,
        message: &[u8],
    ) -> Result<u64, Status> {
        let id = self.store.insert_message(to, from, signature, message).map_err(|e| {
            warn!(error = %e, "Storing a message failed.");
            Status::of(Code::InternalError)
        })?;
        if let Err(status) = self.active_mailbox(to) {
            self.store.discard_message(to, id);
            return Err(status);
        }
        Ok(id)
    }

    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<crate::limits::ClientSlot> {
        self.per_client.admit(ip, self.config.max_connections_per_client)
    }
}

/// Delivery into the server's mailboxes from the process it runs in (the
/// gateway and its embedded home server): what `SEND` does after it has
/// read the blocks, without the wire. The sender stands where the TLS client
/// certificate's fingerprint stands for `SEND`: every check applies (rate,
/// allowed senders, mailbox state, quotas, size, structure, free space; the
/// signature is made here, as the sender, rather than checked), and the
/// message is written but not yet durable, so that the caller's one fsync
/// of the shared database covers it with its own writes, or
/// [`LocalDelivery::durable`] (one fdatasync of the store's log) when it
/// has none.
#[derive(Clone)]
pub struct LocalDelivery {
    shared: Arc<Shared>,
}

/// A message written by [`LocalDelivery::prepare`], to be committed once
/// durable or discarded; dropped without either, it is discarded.
#[must_use]
pub struct Prepared {
    store: Arc<Store>,
    owner: Fingerprint,
    id: u64,
    settled: bool,
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if !self.settled {
            self.store.discard_message(&self.owner, self.id);
        }
    }
}

impl LocalDelivery {
    /// Checks a message from `sender` to `to`, signs it as `sender`, and
    /// writes it with its signature. The signature is made here, so it is
    /// not checked as a `SEND`'s is: a check of a signature made a moment
    /// ago with the same key could fail only by a bug, and would cost an
    /// ECDSA verification per message. Every other check applies, before
    /// the signing.
    ///
    /// # Errors
    /// The status a `SEND` would have been answered with instead of `31`
    /// (`53` if it cannot be signed).
    pub fn prepare(&self, sender: &Identity, to: &Fingerprint, message: &[u8]) -> Result<Prepared, Status> {
        let from = sender.fingerprint();
        self.shared.may_send(&from, to)?;
        self.shared.may_keep(&from, None, message).map_err(|(status, _)| status)?;
        let signature = crypto::sign(message, sender).map_err(|e| {
            warn!(error = %e, "Signing a local delivery failed.");
            Status::of(Code::InternalError)
        })?;
        let id = self.shared.insert_while_active(to, &from, Some(&signature), message)?;
        Ok(Prepared { store: Arc::clone(&self.shared.store), owner: *to, id, settled: false })
    }

    /// The message is durable (the caller's fsync covered it): it counts as
    /// `31` now, and waiting `ACCEPT`s are woken.
    pub fn commit(&self, mut prepared: Prepared) {
        prepared.settled = true;
        self.shared.store.publish_message(&prepared.owner, prepared.id);
    }

    /// The caller's fsync failed: the message is taken back.
    pub fn discard(&self, prepared: Prepared) {
        drop(prepared);
    }

    /// Makes every message prepared so far durable on its own, with one
    /// fdatasync of the store's log (shared with concurrent callers and
    /// `SEND`s), as `SEND` does before `31`: each prepared message's record
    /// is in the log, and sled's pointers are brought up to date from it at
    /// open. For a caller with no writes of its own to make durable with
    /// them; one that has shares a full flush of the database instead (the
    /// flush syncs the log first).
    ///
    /// # Errors
    /// [`StoreError`] if the fdatasync failed (the log then takes no more
    /// writes until a restart): discard what was prepared.
    pub async fn durable(&self) -> Result<(), StoreError> {
        self.shared.store.commit().await
    }
}

/// A LATSSIAM server.
pub struct Server {
    shared: Arc<Shared>,
    tls: tokio_rustls::TlsAcceptor,
}

impl Server {
    /// Opens the store and prepares TLS and the attestation request.
    ///
    /// # Errors
    /// [`ServerError`] if the store cannot be opened (for example, another
    /// process holds it) or the identity is unusable.
    pub fn new(config: ServerConfig, identity: Arc<Identity>) -> Result<Self, ServerError> {
        let store = Store::open(&config.data_dir)?;
        Self::with_store(config, identity, store)
    }

    /// As [`Server::new`], over an open store.
    ///
    /// # Errors
    /// [`ServerError`] if the identity is unusable.
    pub fn with_store(config: ServerConfig, identity: Arc<Identity>, store: Arc<Store>) -> Result<Self, ServerError> {
        let tls = tokio_rustls::TlsAcceptor::from(tls::server_config(&identity)?);
        let csr = attest::server_csr(&identity, &config.host)?;
        let free_space = crate::files::FreeSpace::new(&config.data_dir, config.min_free);
        if let Some(short) = config.register_password.as_ref().map(|p| p.expose().len()).filter(|n| *n < 12) {
            warn!(
                characters = short,
                "The registration password is short: anyone who can reach the server can guess at it \
                 (three wrong ones a minute per client address). A long random one is better."
            );
        }
        let shared = Arc::new(Shared {
            free_space,
            config,
            identity,
            store,
            csr,
            limiter: crate::limits::Buckets::default(),
            shutdown: CancellationToken::new(),
            per_client: Arc::default(),
            refusals: crate::limits::LogThrottle::default(),
            wrong_passwords: crate::limits::FailureDelay::default(),
            wrong_password_clients: crate::limits::Lookups::new(WRONG_PASSWORDS_PER_MINUTE),
            registering_clients: crate::limits::Lookups::new(REGISTRATIONS_PER_MINUTE),
        });
        Ok(Self { shared, tls })
    }

    /// A handle that delivers into this server's mailboxes from inside the
    /// process, with every check a `SEND` gets (see [`LocalDelivery`]).
    pub fn local_delivery(&self) -> LocalDelivery {
        LocalDelivery { shared: Arc::clone(&self.shared) }
    }

    /// The store, for operator commands.
    pub fn store(&self) -> &Arc<Store> {
        &self.shared.store
    }

    /// The token that stops the server.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// Binds the configured address.
    ///
    /// # Errors
    /// [`ServerError::Listen`].
    pub async fn bind(&self) -> Result<TcpListener, ServerError> {
        let addr = self.shared.config.listen;
        TcpListener::bind(addr).await.map_err(|source| ServerError::Listen { addr, source })
    }

    /// Serves `listener` until the shutdown token is cancelled, then waits for
    /// every session to finish.
    pub async fn serve(self, listener: TcpListener) {
        let limit = Arc::new(Semaphore::new(self.shared.config.max_connections));
        let tracker = TaskTracker::new();
        let shutdown = self.shared.shutdown.clone();
        let mut backoff = Duration::from_millis(10);
        loop {
            // Accepted first, then counted: at max_connections a client is
            // closed at once (before TLS, where no status can be sent yet)
            // instead of waiting unanswered in the kernel's backlog.
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = shutdown.cancelled() => break,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => {
                    backoff = Duration::from_millis(10);
                    a
                }
                Err(e) => {
                    warn!(error = %e, "Accept failed; backing off.");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                if let Some(more) = self.shared.refusals.admit() {
                    info!(%peer, also_refused = more, "At max_connections; closed.");
                }
                continue;
            };
            let Some(slot) = self.shared.admit(peer.ip()) else {
                if let Some(more) = self.shared.refusals.admit() {
                    info!(%peer, also_refused = more, "Too many connections from this address or its site; closed.");
                }
                continue;
            };
            let shared = self.shared.clone();
            let acceptor = self.tls.clone();
            tracker.spawn(async move {
                let _permit = permit;
                let _slot = slot;
                session(shared, acceptor, tcp, peer).await;
            });
        }
        drop(listener);
        tracker.close();
        info!(sessions = tracker.len(), "Shutting down; waiting for sessions to finish.");
        tracker.wait().await;
        if let Err(e) = self.shared.store.durable().await {
            warn!(error = %e, "Final flush failed.");
        }
    }
}

async fn session(shared: Arc<Shared>, acceptor: tokio_rustls::TlsAcceptor, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let stream = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "TLS handshake failed.");
            return;
        }
        Err(_) => {
            debug!(%peer, "TLS handshake timed out.");
            return;
        }
    };
    let client = tls::peer_certificate(&stream).map(|c| (Fingerprint::of(&c), c));
    debug!(%peer, client = ?client.as_ref().map(|c| c.0), "Session started.");
    let mut s = Session { conn: Connection::new(stream), client, shared, wrong_passwords: 0, peer: peer.ip() };
    s.run().await;
    debug!(%peer, "Session ended.");
}

/// What a verb handler tells the session loop.
enum Flow {
    Continue,
    HangUp(Option<Code>),
    Quit,
}

/// Wrong registration passwords one connection may give; the last closes it.
const MAX_WRONG_PASSWORDS: u32 = 3;

/// Wrong registration passwords one client address may give a minute (four
/// times as many per IPv6 /48): then it is refused without a comparison
/// until the minute has given it one back.
const WRONG_PASSWORDS_PER_MINUTE: u32 = 3;

/// Registrations with the right password one client address may make a
/// minute (four times as many per IPv6 /48). Each may write a mailbox record
/// and flush the store, and a mailbox can be registered, deregistered and
/// registered again: without this, one password holder could keep the
/// store flushing.
const REGISTRATIONS_PER_MINUTE: u32 = 10;

struct Session {
    conn: Connection<ServerStream>,
    client: Option<(Fingerprint, CertificateDer<'static>)>,
    shared: Arc<Shared>,
    /// Wrong registration passwords on this connection.
    wrong_passwords: u32,
    /// The client's address.
    peer: IpAddr,
}

/// Sends a status (or hangs up if the peer is gone).
macro_rules! reply {
    ($s:expr, $status:expr) => {
        if $s.conn.send($status).await.is_err() {
            return Flow::HangUp(None);
        }
    };
}

impl Session {
    async fn run(&mut self) {
        let idle = self.shared.config.idle_timeout;
        loop {
            let read = tokio::select! {
                r = self.conn.read(idle) => r,
                () = self.shared.shutdown.cancelled() => {
                    self.conn.close().await;
                    return;
                }
            };
            let flow = match read {
                Ok(Frame::Command(c)) => self.command(c).await,
                Ok(_) => Flow::HangUp(Some(Code::SequencingError)),
                Err(e) => Self::read_failure(e),
            };
            match flow {
                Flow::Continue => {}
                Flow::HangUp(code) => {
                    self.conn.hang_up(code).await;
                    return;
                }
                Flow::Quit => {
                    self.conn.close().await;
                    return;
                }
            }
        }
    }

    fn read_failure(e: ReadError) -> Flow {
        match e {
            ReadError::Timeout => Flow::HangUp(Some(Code::Timeout)),
            ReadError::Closed => Flow::HangUp(None),
            ReadError::Wire(w) => {
                debug!(error = %w, "Protocol violation.");
                Flow::HangUp(w.code())
            }
        }
    }

    async fn command(&mut self, command: Command) -> Flow {
        if command == Command::Quit {
            return Flow::Quit;
        }
        let Some((me, my_cert)) = self.client.clone() else {
            reply!(self, Code::CertificateRequired);
            return Flow::Continue;
        };
        match command {
            Command::Send(to) => self.send(me, to).await,
            Command::Accept(deadline) => self.accept(me, deadline).await,
            Command::Register(pw) => self.register(me, &my_cert, &pw).await,
            Command::Deregister => self.deregister(me).await,
            Command::Verify(fp) => self.verify(fp).await,
            Command::Quit => Flow::Quit,
        }
    }

    async fn send(&mut self, me: Fingerprint, to: Fingerprint) -> Flow {
        if let Err(status) = self.shared.may_send(&me, &to) {
            reply!(self, status);
            return Flow::Continue;
        }
        let required = self.shared.config.require_signature;
        reply!(self, if required { Code::SignatureRequired } else { Code::Proceed });
        let idle = self.shared.config.idle_timeout;
        let first = match self.conn.read_block(&[Label::Signature, Label::EncryptedMessage], idle).await {
            Ok(Ok(b)) => b,
            Ok(Err(_)) => return Flow::HangUp(Some(Code::SequencingError)),
            Err(e) => return Self::read_failure(e),
        };
        let (signature, message) = match first.label {
            Label::Signature => match self.conn.read_block(&[Label::EncryptedMessage], idle).await {
                Ok(Ok(m)) => (Some(first.der), m.der),
                Ok(Err(_)) => return Flow::HangUp(Some(Code::SequencingError)),
                Err(e) => return Self::read_failure(e),
            },
            _ if required => return Flow::HangUp(Some(Code::SequencingError)),
            _ => (None, first.der),
        };
        match self.shared.may_keep(&me, signature.as_deref(), &message) {
            Ok(()) => {}
            Err((status, true)) => return Flow::HangUp(Some(status.code())),
            Err((status, false)) => {
                reply!(self, status);
                return Flow::Continue;
            }
        }
        let id = match self.shared.insert_while_active(&to, &me, signature.as_deref(), &message) {
            Ok(id) => id,
            Err(status) => {
                reply!(self, status);
                return Flow::Continue;
            }
        };
        match self.shared.store.commit_and_publish(&to, id).await {
            Ok(()) => reply!(self, Code::MessageAccepted),
            Err(e) => {
                warn!(error = %e, "Storing a message failed.");
                reply!(self, Code::InternalError);
            }
        }
        Flow::Continue
    }

    async fn accept(&mut self, me: Fingerprint, deadline: Duration) -> Flow {
        let cfg = &self.shared.config;
        if deadline > cfg.max_accept_deadline {
            let text = format!("Deadline above {} s", cfg.max_accept_deadline.as_secs());
            reply!(self, Status::with_text(Code::SyntaxError, text));
            return Flow::HangUp(None);
        }
        if let Err(status) = self.shared.active_mailbox(&me) {
            reply!(self, status);
            return Flow::Continue;
        }
        let store = self.shared.store.clone();
        // Woken by an arrival and by an offer let go unanswered by another session.
        let notify = store.notifier(&me);
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match store.offer_oldest(&me) {
                Ok(Some((m, offer))) => return self.deliver(m, offer).await,
                Ok(None) => {}
                Err(e) => {
                    warn!(error = %e, "Store read failed.");
                    reply!(self, Code::InternalError);
                    return Flow::Continue;
                }
            }
            if tokio::time::Instant::now() >= until {
                break;
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(until) => {}
                () = self.shared.shutdown.cancelled() => break,
                // Longer than the deadline, so that the timer above always wins the race.
                r = self.conn.read(deadline + self.shared.config.idle_timeout) => {
                    // The client must wait for the answer: anything it sends now is out of sequence.
                    return match r {
                        Ok(_) => Flow::HangUp(Some(Code::SequencingError)),
                        Err(e) => Self::read_failure(e),
                    };
                }
            }
        }
        if !self.shared.limiter.take(&[((me, Limit::EmptyAccept), self.shared.config.empty_accept_rate)]) {
            reply!(self, Code::SlowDown);
        } else {
            reply!(self, Code::NoMoreMessages);
        }
        Flow::Continue
    }

    /// Hands `m` out and waits for the answer. `offer` keeps it from every
    /// other session meanwhile; it is let go when this returns, so a session
    /// that ends without answering puts the message back for the others.
    async fn deliver(&mut self, m: StoredMessage, offer: Offer) -> Flow {
        let mut sent = self.conn.feed(Code::MessageFollows).await;
        if let (Ok(()), Some(sig)) = (&sent, m.signature) {
            sent = self.conn.feed(Block::new(Label::Signature, sig)).await;
        }
        if sent.is_ok() {
            sent = self.conn.send(Block::new(Label::EncryptedMessage, m.message)).await;
        }
        if sent.is_err() {
            return Flow::HangUp(None);
        }
        match self.conn.read(self.shared.config.idle_timeout).await {
            Ok(Frame::Status(s))
                if matches!(s.code(), Code::MessageAccepted | Code::SignatureRequired | Code::MessageRefused) =>
            {
                if let Err(e) = offer.answered().await {
                    warn!(error = %e, "Deleting a delivered message failed.");
                }
                Flow::Continue
            }
            // The message stays and is offered again: delivery is at-least-once.
            Ok(_) => Flow::HangUp(Some(Code::SequencingError)),
            Err(e) => Self::read_failure(e),
        }
    }

    async fn register(&mut self, me: Fingerprint, my_cert: &[u8], password: &Password) -> Flow {
        let cfg = &self.shared.config;
        let host = CertInfo::from_der(my_cert).ok().and_then(|i| i.address).map(|a: Address| a.host().to_owned());
        let Some(expected) = cfg.register_password.as_ref().filter(|_| host.as_deref().is_some_and(|h| cfg.serves(h)))
        else {
            reply!(self, Code::RegistrationUnavailable);
            return Flow::Continue;
        };
        if !self.shared.wrong_password_clients.available(self.peer) {
            debug!("Registration refused: too many wrong passwords from this client.");
            reply!(self, Status::with_text(Code::RegistrationRefused, "Too many wrong passwords; try again later"));
            return Flow::Continue;
        }
        // Digests compared, not the passwords: the comparison returns at
        // once when the lengths differ, which would tell the length.
        let digest = |p: &Password| aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, p.expose().as_bytes());
        if aws_lc_rs::constant_time::verify_slices_are_equal(digest(expected).as_ref(), digest(password).as_ref())
            .is_err()
        {
            // As the IMAP bridge's logins: answered after 1 s, doubled for
            // each wrong password anyone gave in the last minute (to 16 s);
            // the third on one connection closes it.
            debug!("Wrong registration password.");
            self.shared.wrong_password_clients.allow(self.peer);
            tokio::select! {
                () = tokio::time::sleep(self.shared.wrong_passwords.failed()) => {}
                () = self.shared.shutdown.cancelled() => return Flow::HangUp(None),
            }
            reply!(self, Status::with_text(Code::RegistrationRefused, "Wrong password"));
            self.wrong_passwords += 1;
            if self.wrong_passwords >= MAX_WRONG_PASSWORDS {
                return Flow::HangUp(None);
            }
            return Flow::Continue;
        }
        if !self.shared.registering_clients.allow(self.peer) {
            debug!("Registration refused: too many from this client.");
            reply!(self, Status::with_text(Code::RegistrationRefused, "Too many registrations; try again later"));
            return Flow::Continue;
        }
        match self.shared.store.mailbox(&me) {
            Ok(Some(m)) if matches!(m.state, MailboxState::Active | MailboxState::Pending) => {
                reply!(self, Status::with_text(Code::RegistrationRefused, "Already registered"));
                return Flow::Continue;
            }
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "Store read failed.");
                reply!(self, Code::InternalError);
                return Flow::Continue;
            }
        }
        // One address, one active certificate: another key may not take it over.
        let address = CertInfo::from_der(my_cert).ok().and_then(|i| i.address).map(|a| a.to_string());
        match address.map(|a| self.shared.store.address_taken(&a, &me)) {
            Some(Ok(true)) => {
                info!("A registration for an address another mailbox holds; refused.");
                reply!(self, Status::with_text(Code::RegistrationRefused, "Address held by another certificate"));
                return Flow::Continue;
            }
            Some(Err(e)) => {
                warn!(error = %e, "Store read failed.");
                reply!(self, Code::InternalError);
                return Flow::Continue;
            }
            _ => {}
        }
        if self.conn.feed(Code::AttestationRequested).await.is_err()
            || self.conn.send(Block::new(Label::CertificateRequest, self.shared.csr.clone())).await.is_err()
        {
            return Flow::HangUp(None);
        }
        let idle = cfg.idle_timeout;
        match self.conn.read(idle).await {
            Ok(Frame::Status(s)) if s.code() == Code::AttestationFollows => {}
            Ok(_) => return Flow::HangUp(Some(Code::SequencingError)),
            Err(e) => return Self::read_failure(e),
        }
        let attestation = match self.conn.read_block(&[Label::Certificate], idle).await {
            Ok(Ok(b)) => b.der,
            Ok(Err(_)) => return Flow::HangUp(Some(Code::SequencingError)),
            Err(e) => return Self::read_failure(e),
        };
        let server_cert = self.shared.identity.cert_der();
        if let Err(e) = attest::check(&attestation, my_cert, server_cert, Some(&cfg.host)) {
            debug!(error = %e, "Attestation refused.");
            reply!(self, Status::with_text(Code::RegistrationRefused, "Attestation does not verify"));
            return Flow::Continue;
        }
        let state = if cfg.require_approval { MailboxState::Pending } else { MailboxState::Active };
        let code = if cfg.require_approval { Code::RegistrationPending } else { Code::RegistrationComplete };
        let mailbox = Mailbox { state, owner_cert: my_cert.to_vec(), attestation };
        match self.shared.store.put_mailbox(&me, &mailbox).await {
            Ok(()) => {
                info!(pending = cfg.require_approval, "Mailbox registered.");
                reply!(self, code);
            }
            Err(e) => {
                warn!(error = %e, "Storing a mailbox failed.");
                reply!(self, Code::InternalError);
            }
        }
        Flow::Continue
    }

    async fn deregister(&mut self, me: Fingerprint) -> Flow {
        let status = match self.shared.store.mailbox(&me) {
            Ok(None) => Status::of(Code::NoMailbox),
            // Gone already: `38`, after deleting what a deregistration whose
            // deletes failed part way left.
            Ok(Some(m)) if m.state == MailboxState::Gone => match self.shared.store.deregister(&me).await {
                Ok(_) => Status::of(Code::MailboxGone),
                Err(e) => {
                    warn!(error = %e, "Deleting a gone mailbox's messages failed.");
                    Status::of(Code::InternalError)
                }
            },
            Ok(Some(_)) => match self.shared.store.deregister(&me).await {
                Ok(_) => {
                    info!("Mailbox deregistered.");
                    Status::with_text(Code::RegistrationComplete, "Deregistration complete")
                }
                Err(e) => {
                    warn!(error = %e, "Deregistration failed.");
                    Status::of(Code::InternalError)
                }
            },
            Err(e) => {
                warn!(error = %e, "Store read failed.");
                Status::of(Code::InternalError)
            }
        };
        reply!(self, status);
        Flow::Continue
    }

    async fn verify(&mut self, owner: Fingerprint) -> Flow {
        let m = match self.shared.active_mailbox(&owner) {
            Ok(m) => m,
            Err(status) => {
                reply!(self, status);
                return Flow::Continue;
            }
        };
        if self.conn.feed(Code::AttestationFollows).await.is_err()
            || self.conn.feed(Block::new(Label::Certificate, m.attestation)).await.is_err()
            || self.conn.send(Block::new(Label::Certificate, m.owner_cert)).await.is_err()
        {
            return Flow::HangUp(None);
        }
        Flow::Continue
    }
}
