//! The IRC side of latssiam-bridge: a bot that joins channels, reports what
//! is said there to an [`IrcSink`], and posts lines it is handed through a
//! [`Handle`]. It knows nothing of LATSSIAM.
//!
//! It owns its connection (TCP, or TLS with the system roots or a pinned
//! certificate fingerprint) and uses `irc-proto` (the protocol half of the
//! `irc` crate) to parse and build messages, because what bridges get wrong
//! with the `irc` client lives in its client half:
//! - every line goes through a paced queue (token bucket: `burst`, then
//!   `lines_per_second`): PONG and registration lines ahead of everything,
//!   then answers to private messages (at most 32 waiting, more dropped) and
//!   posted lines taking turns;
//! - connecting (with the TLS handshake) and every write are bounded by
//!   `timeout`, and no line read is kept beyond 8,192 octets;
//! - bodies are split here, one line per PRIVMSG, with CR, LF, NUL and `\x01`
//!   made harmless, and sized for the 512-octet limit *including* the
//!   `:nick!user@host` prefix others receive (learnt with USERHOST);
//! - IRCv3 capabilities are negotiated with `CAP LS 302`: `server-time`,
//!   `message-tags` (for `msgid` and `+draft/reply`) and `echo-message` when
//!   the server offers them (every event then carries a [`Meta`], and the
//!   msgid of a post's first line comes back as [`Event::Posted`]), nothing
//!   when it does not; SASL PLAIN is driven here too (`AUTHENTICATE`), and a
//!   `904` stops the bot with a clear error;
//! - input that is not UTF-8 is read as latin-1, never dropped;
//! - reconnection backs off (doubling) and the backoff resets once a
//!   connection has stayed up; a nick in use takes the next alternate and the
//!   main nick is reclaimed later.

pub mod format;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use irc_proto::{Command, Message, Prefix, Response};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The longest line we read; longer ones are cut: IRCv3 allows 8,191
/// octets of tags before the 512 of the message.
const MAX_READ: usize = 8191 + 512;
/// Most answers to private messages waiting to be sent; more are dropped.
const MAX_REPLIES: usize = 32;
/// Most protocol lines waiting (more only from a server flooding PINGs); more are dropped.
const MAX_URGENT: usize = 256;
/// Most PRIVMSG lines one post becomes; the rest is dropped.
const MAX_POST_LINES: usize = 1000;
/// Most posts whose echo (`echo-message`) the bot waits for at once.
const MAX_AWAITING_ECHO: usize = 64;
/// Longest IRCv3 tag value the bot keeps or sends (a msgid is far shorter).
const MAX_TAG_VALUE: usize = 256;
/// The IRCv3 capabilities the bot asks for when offered (`sasl` besides, when configured).
const WANTED_CAPS: [&str; 3] = ["server-time", "message-tags", "echo-message"];

/// Bot settings.
#[derive(Debug, Clone)]
pub struct IrcConfig {
    /// Server host.
    pub server: String,
    /// Port.
    pub port: u16,
    /// Use TLS.
    pub tls: bool,
    /// With TLS: accept exactly the certificate with this SHA-256 fingerprint
    /// (hex), e.g. a self-signed one; otherwise the system's roots.
    pub tls_fingerprint: Option<String>,
    /// Nickname, and alternates to try when it is taken.
    pub nick: String,
    /// Alternates.
    pub alt_nicks: Vec<String>,
    /// SASL PLAIN account and password.
    pub sasl: Option<(String, String)>,
    /// Password for `PRIVMSG NickServ :IDENTIFY`.
    pub nickserv_password: Option<String>,
    /// Channels and their keys.
    pub channels: Vec<(String, Option<String>)>,
    /// Lines that may be sent at once.
    pub burst: f64,
    /// Sustained lines per second.
    pub lines_per_second: f64,
    /// Send a PING after this much silence; give up after as long again.
    pub ping_interval: Duration,
    /// First reconnection delay; doubles up to `reconnect_max`.
    pub reconnect_min: Duration,
    /// Longest reconnection delay.
    pub reconnect_max: Duration,
    /// Longest time for connecting (TCP and TLS handshake) and for any write
    /// to the server; a write that takes longer ends the connection.
    pub timeout: Duration,
}

/// What happened on IRC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// In a channel.
    Channel {
        /// The channel.
        channel: String,
        /// Who.
        nick: String,
        /// What kind of thing.
        kind: Kind,
        /// The text, if any (formatting and control characters removed, as
        /// from every text, nick and channel of an event: [`format::clean_text`]).
        text: String,
        /// What IRCv3 tags said of it.
        meta: Meta,
    },
    /// The bot (re)connected and joined all its channels.
    Joined,
    /// The connection was lost (the bot reconnects); lines said meanwhile are not heard.
    Disconnected,
    /// The server echoed the first line of a post handed over with a key
    /// (`echo-message`): the msgid others saw it under.
    Posted {
        /// The post's key ([`Handle::post_tagged`]).
        key: String,
        /// Its first line's msgid.
        msgid: String,
    },
    /// A private message to the bot.
    Private {
        /// Who.
        nick: String,
        /// `user@host` of the sender's prefix (empty when the server sent
        /// none): who it is across nick changes, for limits per person.
        userhost: String,
        /// The text.
        text: String,
    },
}

/// What the IRCv3 tags of a channel line said (all empty where the server
/// offers no such capability). Values are cleaned of control characters and
/// at most [`MAX_TAG_VALUE`] octets; anything longer is dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// `time` (`server-time`): when the server saw it, RFC 3339 as sent.
    pub time: Option<String>,
    /// `msgid`: the line's id on the network.
    pub msgid: Option<String>,
    /// `+draft/reply`: the msgid of the line it answers.
    pub reply_to: Option<String>,
}

impl Meta {
    fn from_tags(tags: Option<&[irc_proto::message::Tag]>) -> Self {
        let mut meta = Self::default();
        for irc_proto::message::Tag(name, value) in tags.unwrap_or_default() {
            let Some(value) = value.as_deref().filter(|v| !v.is_empty() && v.len() <= MAX_TAG_VALUE) else {
                continue;
            };
            let value = format::clean_text(value);
            match name.as_str() {
                "time" => meta.time = Some(value),
                "msgid" => meta.msgid = Some(value),
                "+draft/reply" | "+reply" => meta.reply_to = Some(value),
                _ => {}
            }
        }
        meta
    }
}

/// `value` as an IRCv3 tag value (escaped).
fn escape_tag(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            ';' => out.push_str("\\:"),
            ' ' => out.push_str("\\s"),
            '\\' => out.push_str("\\\\"),
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Kinds of channel events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// PRIVMSG.
    Message,
    /// CTCP ACTION (`/me`).
    Action,
    /// NOTICE.
    Notice,
    /// JOIN.
    Join,
    /// PART.
    Part,
    /// QUIT (one event per channel the person was in).
    Quit,
    /// TOPIC.
    Topic,
}

/// Where the bot reports: implemented by the gateway core.
pub trait IrcSink: Send + Sync + 'static {
    /// Something happened. The answer, if any, is sent back privately (for private messages).
    fn event(&self, event: Event) -> impl Future<Output = Option<String>> + Send;
}

/// Why the bot stopped for good.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IrcError {
    /// SASL failed (`904`/`905`), or the server does not offer it.
    #[error("SASL authentication failed: {0}")]
    Sasl(String),
    /// The server refused every nick.
    #[error("no usable nickname: {0}")]
    Nick(String),
}

struct Post {
    target: String,
    lines: Vec<String>,
    /// The msgid its first line answers (sent as `+draft/reply` where the server takes tags).
    reply_to: Option<String>,
    /// Reported back with the first line's msgid ([`Event::Posted`]) where the server echoes.
    key: Option<String>,
    done: oneshot::Sender<()>,
}

/// Hands lines to the bot.
#[derive(Clone)]
pub struct Handle {
    posts: mpsc::Sender<Post>,
    joined: watch::Receiver<bool>,
}

/// Why a post did not go out.
#[derive(Debug, thiserror::Error)]
#[error("not connected to IRC")]
pub struct NotConnected;

impl Handle {
    /// Whether the bot is connected and has joined its channels.
    pub fn is_ready(&self) -> bool {
        *self.joined.borrow()
    }

    /// Waits until the bot is connected and has joined its channels.
    pub async fn ready(&mut self) {
        let _ = self.joined.wait_for(|j| *j).await;
    }

    /// Posts `lines` (each sent as one or more PRIVMSGs, in order) to
    /// `target` and waits until all were written to the server.
    ///
    /// # Errors
    /// [`NotConnected`] if the connection went away first (then some lines
    /// may have gone out; the caller retries the whole post).
    pub async fn post(&self, target: &str, lines: Vec<String>) -> Result<(), NotConnected> {
        self.post_tagged(target, lines, None, None).await
    }

    /// As [`Handle::post`], with the first line answering the line whose
    /// msgid is `reply_to` (`+draft/reply`, where the server takes client
    /// tags), and, where the server echoes what the bot says, an
    /// [`Event::Posted`] with `key` and the first line's msgid.
    ///
    /// # Errors
    /// [`NotConnected`], as [`Handle::post`].
    pub async fn post_tagged(
        &self,
        target: &str,
        lines: Vec<String>,
        reply_to: Option<String>,
        key: Option<String>,
    ) -> Result<(), NotConnected> {
        let (done, rx) = oneshot::channel();
        let post = Post { target: target.to_owned(), lines, reply_to, key, done };
        self.posts.send(post).await.map_err(|_| NotConnected)?;
        rx.await.map_err(|_| NotConnected)
    }
}

/// Starts the bot. It runs until `shutdown`, or until a fatal error, which the
/// returned task yields.
pub fn spawn<S: IrcSink>(
    config: IrcConfig,
    sink: Arc<S>,
    shutdown: CancellationToken,
) -> (Handle, tokio::task::JoinHandle<Result<(), IrcError>>) {
    let (posts_tx, posts_rx) = mpsc::channel(64);
    let (joined_tx, joined_rx) = watch::channel(false);
    let task = tokio::spawn(run(config, sink, shutdown, posts_rx, joined_tx));
    (Handle { posts: posts_tx, joined: joined_rx }, task)
}

async fn run<S: IrcSink>(
    config: IrcConfig,
    sink: Arc<S>,
    shutdown: CancellationToken,
    mut posts: mpsc::Receiver<Post>,
    joined: watch::Sender<bool>,
) -> Result<(), IrcError> {
    let mut backoff = config.reconnect_min;
    loop {
        let started = Instant::now();
        let result = match connect(&config).await {
            Ok(stream) => {
                info!(server = %config.server, port = config.port, "Connected to IRC.");
                let mut session = Session::new(&config, &*sink, &joined);
                let r = session.run(stream, &mut posts, &shutdown).await;
                let _ = joined.send(false);
                if r.is_err() {
                    sink.event(Event::Disconnected).await;
                }
                r
            }
            Err(e) => Err(SessionEnd::Lost(e.to_string())),
        };
        match result {
            Ok(()) => return Ok(()),
            Err(SessionEnd::Fatal(e)) => {
                warn!(error = %e, "IRC bot stopped.");
                return Err(e);
            }
            Err(SessionEnd::Lost(why)) => {
                // A connection that stayed up a while resets the backoff.
                if started.elapsed() > config.reconnect_max.max(Duration::from_secs(60)) {
                    backoff = config.reconnect_min;
                }
                warn!(reason = %why, retry_in = ?backoff, "IRC connection lost.");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
        backoff = (backoff * 2).min(config.reconnect_max);
    }
}

/// One session of the bot over an already connected `stream`, until the
/// server closes it, a fatal error, or `shutdown`, with `posts` (target,
/// lines) waiting to go out once it has joined, as if handed over by
/// [`Handle::post`]. [`spawn`] runs the same session over each connection it
/// makes; this entry point serves tests and fuzzing over in-memory streams.
///
/// # Errors
/// Why the session ended, other than `shutdown`.
pub async fn run_session<S: IrcSink>(
    config: &IrcConfig,
    sink: &S,
    stream: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    posts: Vec<(String, Vec<String>)>,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let (tx, mut rx) = mpsc::channel(posts.len().max(1));
    for (target, lines) in posts {
        let (done, _) = oneshot::channel();
        let _ = tx.try_send(Post { target, lines, reply_to: None, key: None, done });
    }
    let (joined, _) = watch::channel(false);
    let mut session = Session::new(config, sink, &joined);
    let result = session.run(Box::new(stream), &mut rx, shutdown).await;
    // Kept open until here: a session ends with its stream, not with its posts.
    drop(tx);
    result.map_err(|e| match e {
        SessionEnd::Lost(why) => why,
        SessionEnd::Fatal(e) => e.to_string(),
    })
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// `io`, or a `TimedOut` error once `limit` has passed.
async fn timed<T>(limit: Duration, what: &str, io: impl Future<Output = std::io::Result<T>>) -> std::io::Result<T> {
    match tokio::time::timeout(limit, io).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{what} timed out after {limit:?}"))),
    }
}

/// Connects, TCP and TLS handshake together within `config.timeout`.
async fn connect(config: &IrcConfig) -> std::io::Result<Box<dyn Stream>> {
    timed(config.timeout.max(Duration::from_secs(1)), "connecting to IRC", connect_untimed(config)).await
}

async fn connect_untimed(config: &IrcConfig) -> std::io::Result<Box<dyn Stream>> {
    let tcp = TcpStream::connect((config.server.as_str(), config.port)).await?;
    let _ = tcp.set_nodelay(true);
    if !config.tls {
        return Ok(Box::new(tcp));
    }
    let tls = tls_config(config.tls_fingerprint.as_deref()).map_err(std::io::Error::other)?;
    let name = rustls_pki_types::ServerName::try_from(config.server.clone()).map_err(std::io::Error::other)?;
    Ok(Box::new(tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await?))
}

fn tls_config(fingerprint: Option<&str>) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder =
        rustls::ClientConfig::builder_with_provider(Arc::clone(&provider)).with_safe_default_protocol_versions()?;
    let config = match fingerprint {
        Some(fp) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCert { fingerprint: fp.to_ascii_lowercase(), provider }))
            .with_no_client_auth(),
        None => {
            let mut roots = rustls::RootCertStore::empty();
            for path in ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"] {
                if let Ok(pem) = std::fs::read(path) {
                    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(&pem).flatten() {
                        let _ = roots.add(cert);
                    }
                }
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(Arc::new(config))
}

/// Accepts exactly one certificate, by SHA-256 fingerprint (a self-signed IRC server).
#[derive(Debug)]
struct PinnedCert {
    fingerprint: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, end_entity);
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        if hex == self.fingerprint {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!("IRC server certificate {hex} is not the pinned {}", self.fingerprint)))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

enum SessionEnd {
    /// Reconnect.
    Lost(String),
    /// Stop.
    Fatal(IrcError),
}

struct Session<'a, S> {
    config: &'a IrcConfig,
    sink: &'a S,
    joined_tx: &'a watch::Sender<bool>,
    nick: String,
    nick_index: usize,
    registered: bool,
    /// The length of `nick!user@host` as others see it (a guess until USERHOST answers).
    prefix_len: usize,
    out: Outgoing,
    /// Completion of the post whose lines are in `normal`.
    current: Option<oneshot::Sender<()>>,
    tokens: f64,
    refilled: Instant,
    members: HashMap<String, HashSet<String>>,
    joined: HashSet<String>,
    reclaim_at: Option<Instant>,
    /// Capabilities offered so far (`CAP LS` may come in several lines).
    offered: Vec<String>,
    /// Capabilities the server acknowledged.
    caps: HashSet<String>,
    /// The first line of each post sent with a key, as (target, text, key),
    /// until its echo comes back; at most [`MAX_AWAITING_ECHO`].
    awaiting_echo: VecDeque<(String, String, String)>,
    /// Whether capability negotiation is over.
    cap_done: bool,
    /// Whether SASL was asked for alone after the set was refused.
    sasl_alone: bool,
}

impl<'a, S: IrcSink> Session<'a, S> {
    fn new(config: &'a IrcConfig, sink: &'a S, joined_tx: &'a watch::Sender<bool>) -> Self {
        Self {
            config,
            sink,
            joined_tx,
            nick: config.nick.clone(),
            nick_index: 0,
            registered: false,
            prefix_len: config.nick.len() + 1 + 10 + 1 + 63,
            out: Outgoing::default(),
            current: None,
            tokens: config.burst,
            refilled: Instant::now(),
            members: HashMap::new(),
            joined: HashSet::new(),
            reclaim_at: None,
            offered: Vec::new(),
            caps: HashSet::new(),
            awaiting_echo: VecDeque::new(),
            cap_done: false,
            sasl_alone: false,
        }
    }

    fn end_caps(&mut self) {
        self.cap_done = true;
        self.out.urgent("CAP END".into());
    }

    /// Whether the server acknowledged `cap`.
    fn has(&self, cap: &str) -> bool {
        self.caps.contains(cap)
    }

    /// A `CAP` line from the server: negotiates what [`WANTED_CAPS`] (and
    /// `sasl` when configured) the server offers, then ends negotiation (or
    /// authenticates first).
    fn cap(&mut self, sub: &str, first: Option<String>, second: Option<String>) -> Result<(), SessionEnd> {
        // "CAP * LS * :a b" (more to come) or "CAP * LS :a b" (the last line).
        let (more, list) = match (first, second) {
            (Some(star), Some(list)) => (star == "*", list),
            (Some(list), None) => (false, list),
            _ => (false, String::new()),
        };
        let names = list.split_whitespace().map(|c| c.split_once('=').map_or(c, |(n, _)| n).to_owned());
        if self.cap_done {
            // Negotiation is over (cap-notify NEW/DEL, or a server repeating itself): nothing to do.
            return Ok(());
        }
        let sasl = self.config.sasl.is_some();
        match sub {
            "LS" => {
                // Only what the bot would ask for is kept: a server sending LS lines forever grows nothing.
                for name in names {
                    if (WANTED_CAPS.contains(&name.as_str()) || (sasl && name == "sasl"))
                        && !self.offered.contains(&name)
                    {
                        self.offered.push(name);
                    }
                }
                if more {
                    return Ok(());
                }
                if sasl && !self.offered.iter().any(|c| c == "sasl") {
                    return Err(SessionEnd::Fatal(IrcError::Sasl("the server does not offer SASL".into())));
                }
                let wanted: Vec<&str> = WANTED_CAPS
                    .iter()
                    .copied()
                    .chain(sasl.then_some("sasl"))
                    .filter(|w| self.offered.iter().any(|c| c == w))
                    .collect();
                self.offered.clear();
                if wanted.is_empty() {
                    self.end_caps();
                } else {
                    self.out.urgent(format!("CAP REQ :{}", wanted.join(" ")));
                }
            }
            "ACK" => {
                let acked = names.map(|c| c.trim_start_matches(['-', '=', '~']).to_owned());
                self.caps.extend(acked.filter(|c| WANTED_CAPS.contains(&c.as_str()) || c == "sasl"));
                debug!(caps = ?self.caps, "IRCv3 capabilities acknowledged.");
                if self.has("sasl") && sasl {
                    // CAP END once SASL has succeeded (903).
                    self.cap_done = true;
                    self.out.urgent("AUTHENTICATE PLAIN".into());
                } else {
                    self.end_caps();
                }
            }
            "NAK" if sasl && !self.sasl_alone => {
                // Refused as a set: SASL, which the bot needs, alone.
                self.sasl_alone = true;
                self.out.urgent("CAP REQ :sasl".into());
            }
            "NAK" if sasl => {
                return Err(SessionEnd::Fatal(IrcError::Sasl("the server refused the SASL capability".into())));
            }
            "NAK" => self.end_caps(),
            _ => {}
        }
        Ok(())
    }

    fn send_urgent(&mut self, command: Command) {
        self.out.urgent(Message::from(command).to_string());
    }

    /// When the next line may go out (token bucket).
    fn next_send(&mut self) -> Instant {
        let now = Instant::now();
        let rate = self.config.lines_per_second.max(0.01);
        self.tokens = (self.tokens + now.duration_since(self.refilled).as_secs_f64() * rate).min(self.config.burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            now
        } else {
            now + Duration::from_secs_f64((1.0 - self.tokens) / rate)
        }
    }

    async fn run(
        &mut self,
        stream: Box<dyn Stream>,
        posts: &mut mpsc::Receiver<Post>,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionEnd> {
        let (read, mut write) = tokio::io::split(stream);
        let mut reader = BufReader::new(read);
        let timeout = self.config.timeout.max(Duration::from_secs(1));
        // Servers without capabilities answer 421 and register us anyway.
        self.out.urgent("CAP LS 302".into());
        self.send_urgent(Command::NICK(self.nick.clone()));
        self.send_urgent(Command::USER(self.config.nick.clone(), "0".into(), "latssiam-bridge".into()));
        let mut last_heard = Instant::now();
        let mut pinged = false;
        let mut buf = Vec::new();
        loop {
            let sending = !self.out.is_empty();
            let send_at = if sending { self.next_send() } else { Instant::now() + Duration::from_secs(3600) };
            let ping_at = last_heard + self.config.ping_interval * if pinged { 2 } else { 1 };
            let can_take =
                self.registered && self.out.normal.is_empty() && self.current.is_none() && *self.joined_tx.borrow();
            tokio::select! {
                r = read_line(&mut reader, &mut buf) => {
                    match r {
                        Ok(true) => {}
                        Ok(false) => return Err(SessionEnd::Lost("the server closed the connection".into())),
                        Err(e) => return Err(SessionEnd::Lost(e.to_string())),
                    }
                    last_heard = Instant::now();
                    pinged = false;
                    let line = format::decode(&buf);
                    buf.clear();
                    self.handle(line.trim_end_matches(['\r', '\n'])).await?;
                }
                post = posts.recv(), if can_take => {
                    let Some(post) = post else { return Ok(()) };
                    self.queue_post(post);
                }
                () = tokio::time::sleep_until(send_at), if sending => {
                    // Urgent lines (PONG, registration) first; replies and posts after.
                    let Some(line) = self.out.next() else { continue };
                    self.tokens -= 1.0;
                    let out = wire_line(&line);
                    // A server that stops reading must not hold the bot: a slow write ends the session.
                    let written = timed(timeout, "writing to IRC", async {
                        write.write_all(out.as_bytes()).await?;
                        write.flush().await
                    });
                    if let Err(e) = written.await {
                        return Err(SessionEnd::Lost(e.to_string()));
                    }
                    if self.out.normal.is_empty() {
                        if let Some(done) = self.current.take() {
                            let _ = done.send(());
                        }
                    }
                }
                () = tokio::time::sleep_until(ping_at) => {
                    if pinged {
                        return Err(SessionEnd::Lost("ping timeout".into()));
                    }
                    pinged = true;
                    self.send_urgent(Command::PING("latssiam-bridge".into(), None));
                }
                () = tokio::time::sleep_until(self.reclaim_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))), if self.reclaim_at.is_some() => {
                    self.reclaim_at = Some(Instant::now() + Duration::from_secs(60));
                    self.send_urgent(Command::NICK(self.config.nick.clone()));
                }
                () = shutdown.cancelled() => {
                    let _ = timed(timeout, "writing to IRC", async {
                        write.write_all(b"QUIT :latssiam-bridge shutting down\r\n").await?;
                        write.flush().await
                    })
                    .await;
                    return Ok(());
                }
            }
        }
    }

    /// The budget for the text of a PRIVMSG or NOTICE to `target`: what others
    /// receive, ":" prefix " PRIVMSG " target " :" text "\r\n", within 512.
    fn text_budget(&self, target: &str) -> usize {
        let overhead = 1 + self.prefix_len + 9 + target.len() + 2 + 2;
        512usize.saturating_sub(overhead).max(16)
    }

    fn queue_post(&mut self, post: Post) {
        // One target: no spaces, no comma (a target list), no leading ':' (a trailing parameter).
        let target: String = format::sanitize(&post.target).chars().filter(|c| !matches!(c, ' ' | ',')).collect();
        let target = target.trim_start_matches(':').to_owned();
        if target.is_empty() {
            warn!(target_name = %post.target, "An IRC post without a usable target; dropped.");
            let _ = post.done.send(());
            return;
        }
        let budget = self.text_budget(&target);
        let mut cut = 0usize;
        let reply = post.reply_to.filter(|r| !r.is_empty() && r.len() <= MAX_TAG_VALUE && self.has("message-tags"));
        let mut first = true;
        for line in post.lines {
            let line = format::sanitize(&line);
            for piece in format::split_to_fit(&line, budget) {
                if self.out.normal.len() >= MAX_POST_LINES {
                    cut += 1;
                    continue;
                }
                let text = if piece.is_empty() { " ".to_owned() } else { piece };
                let tags = match (&reply, first) {
                    (Some(r), true) => format!("@+draft/reply={} ", escape_tag(r)),
                    _ => String::new(),
                };
                if first && self.has("echo-message") {
                    if let Some(key) = &post.key {
                        if self.awaiting_echo.len() >= MAX_AWAITING_ECHO {
                            self.awaiting_echo.pop_front();
                        }
                        self.awaiting_echo.push_back((target.to_ascii_lowercase(), text.clone(), key.clone()));
                    }
                }
                first = false;
                self.out.normal.push_back(format!("{tags}PRIVMSG {target} :{text}"));
            }
        }
        if cut > 0 {
            warn!(target_name = %target, cut, max = MAX_POST_LINES, "An IRC post was too long; its end was dropped.");
        }
        if self.out.normal.is_empty() {
            let _ = post.done.send(());
        } else {
            self.current = Some(post.done);
        }
    }

    fn next_nick(&mut self) -> Result<(), SessionEnd> {
        self.nick_index += 1;
        let alts = &self.config.alt_nicks;
        self.nick = match alts.get(self.nick_index - 1) {
            Some(n) => n.clone(),
            None if self.nick_index <= alts.len() + 3 => {
                format!("{}{}", self.config.nick, "_".repeat(self.nick_index - alts.len()))
            }
            None => return Err(SessionEnd::Fatal(IrcError::Nick("every alternate is taken".into()))),
        };
        self.send_urgent(Command::NICK(self.nick.clone()));
        Ok(())
    }

    async fn handle(&mut self, line: &str) -> Result<(), SessionEnd> {
        let message: Message = match line.parse() {
            Ok(m) => m,
            Err(e) => {
                debug!(error = %e, "Unparsable IRC line.");
                return Ok(());
            }
        };
        let from = match &message.prefix {
            Some(Prefix::Nickname(n, _, _)) => n.clone(),
            Some(Prefix::ServerName(s)) => s.clone(),
            None => String::new(),
        };
        let userhost = match &message.prefix {
            Some(Prefix::Nickname(_, u, h)) if !h.is_empty() => format!("{u}@{h}"),
            _ => String::new(),
        };
        let meta = Meta::from_tags(message.tags.as_deref());
        match message.command {
            Command::PING(a, b) => self.send_urgent(Command::PONG(a, b)),
            Command::CAP(_, sub, first, second) => self.cap(sub.to_str(), first, second)?,
            Command::AUTHENTICATE(ref a) if a == "+" => {
                if let Some((user, password)) = &self.config.sasl {
                    let payload = format!("{user}\0{user}\0{password}");
                    let b64 = base64::engine::general_purpose::STANDARD.encode(payload);
                    self.out.urgent(format!("AUTHENTICATE {b64}"));
                }
            }
            Command::Response(response, args) => self.response(response, &args)?,
            Command::NICK(new) if from == self.nick => {
                self.nick = new;
                if self.nick == self.config.nick {
                    self.reclaim_at = None;
                }
            }
            Command::JOIN(channel, _, _) => {
                let key = channel.to_ascii_lowercase();
                if from == self.nick {
                    self.joined.insert(key);
                    let all = self.config.channels.iter().all(|(c, _)| self.joined.contains(&c.to_ascii_lowercase()));
                    if all && !*self.joined_tx.borrow() {
                        let _ = self.joined_tx.send(true);
                        info!(nick = %self.nick, "Joined the IRC channels.");
                        let _ = self.emit(Event::Joined).await;
                    }
                } else {
                    self.members.entry(key).or_default().insert(from.clone());
                    self.emit_channel(&channel, &from, Kind::Join, String::new(), meta).await;
                }
            }
            Command::PART(channel, text) => {
                if let Some(m) = self.members.get_mut(&channel.to_ascii_lowercase()) {
                    m.remove(&from);
                }
                self.emit_channel(&channel, &from, Kind::Part, text.unwrap_or_default(), meta).await;
            }
            Command::QUIT(text) => {
                let channels: Vec<String> =
                    self.members.iter_mut().filter_map(|(c, m)| m.remove(&from).then(|| c.clone())).collect();
                for c in channels {
                    self.emit_channel(&c, &from, Kind::Quit, text.clone().unwrap_or_default(), meta.clone()).await;
                }
            }
            Command::KICK(channel, who, _) if who == self.nick => {
                self.joined.remove(&channel.to_ascii_lowercase());
                let _ = self.joined_tx.send(false);
                let key = self
                    .config
                    .channels
                    .iter()
                    .find(|(c, _)| c.eq_ignore_ascii_case(&channel))
                    .and_then(|(_, k)| k.clone());
                self.send_urgent(Command::JOIN(channel, key, None));
            }
            Command::TOPIC(channel, Some(text)) => self.emit_channel(&channel, &from, Kind::Topic, text, meta).await,
            Command::PRIVMSG(target, text) if from == self.nick => self.echoed(&target, &text, meta).await,
            Command::PRIVMSG(target, text) => {
                self.incoming(&target, (&from, &userhost), &text, false, meta).await;
            }
            Command::NOTICE(target, text) if from != self.nick => {
                self.incoming(&target, (&from, &userhost), &text, true, meta).await;
            }
            _ => {}
        }
        Ok(())
    }

    /// The server's echo of a line the bot said: the msgid of a post's first line, reported.
    async fn echoed(&mut self, target: &str, text: &str, meta: Meta) {
        let target = target.to_ascii_lowercase();
        let Some(i) = self.awaiting_echo.iter().position(|(t, l, _)| *t == target && l == text) else { return };
        // Echoes come in order: the posts before this one will not be echoed any more.
        let Some((_, _, key)) = self.awaiting_echo.drain(..=i).next_back() else { return };
        if let Some(msgid) = meta.msgid {
            let _ = self.emit(Event::Posted { key, msgid }).await;
        }
    }

    async fn incoming(&mut self, target: &str, (from, userhost): (&str, &str), text: &str, notice: bool, meta: Meta) {
        let (kind, body) = match text.strip_prefix('\x01') {
            Some(ctcp) => match ctcp.trim_end_matches('\x01').strip_prefix("ACTION ") {
                Some(action) => (Kind::Action, action),
                None => return, // other CTCP requests are not relayed
            },
            None if notice => (Kind::Notice, text),
            None => (Kind::Message, text),
        };
        if target.starts_with(['#', '&', '+', '!']) {
            self.emit_channel(target, from, kind, body.to_owned(), meta).await;
        } else if target.eq_ignore_ascii_case(&self.nick) && !notice && kind == Kind::Message {
            let reply = self
                .emit(Event::Private { nick: from.to_owned(), userhost: userhost.to_owned(), text: body.to_owned() })
                .await;
            // The answer goes to one nick: never to a list, a channel or a mask a server may have sent as `from`.
            let one_nick = !from.is_empty()
                && !from.chars().any(|c| c.is_whitespace() || c.is_control() || matches!(c, ',' | '*' | '?'))
                && !from.starts_with([':', '#', '&', '+', '!', '$']);
            if let Some(reply) = reply.filter(|_| one_nick) {
                // One line, cut to fit, in the bounded queue of replies (never ahead of a PONG).
                let text = format::sanitize(&reply);
                let text = format::split_to_fit(&text, self.text_budget(from)).into_iter().next().unwrap_or_default();
                self.out.reply(Message::from(Command::NOTICE(from.to_owned(), text)).to_string());
            }
        }
    }

    async fn emit_channel(&mut self, channel: &str, nick: &str, kind: Kind, text: String, meta: Meta) {
        let event = Event::Channel { channel: channel.to_owned(), nick: nick.to_owned(), kind, text, meta };
        let _ = self.emit(event).await;
    }

    /// Reports `event` to the sink: the one place IRC input leaves the bot, so
    /// every text, nick and channel goes through [`format::clean_text`] here.
    async fn emit(&self, event: Event) -> Option<String> {
        let event = match event {
            Event::Channel { channel, nick, kind, text, meta } => Event::Channel {
                channel: format::clean_text(&channel),
                nick: format::clean_text(&nick),
                kind,
                text: format::clean_text(&text),
                meta,
            },
            Event::Private { nick, userhost, text } => Event::Private {
                nick: format::clean_text(&nick),
                userhost: format::clean_text(&userhost),
                text: format::clean_text(&text),
            },
            e @ (Event::Joined | Event::Disconnected | Event::Posted { .. }) => e,
        };
        self.sink.event(event).await
    }

    fn response(&mut self, response: Response, args: &[String]) -> Result<(), SessionEnd> {
        match response {
            Response::RPL_WELCOME => {
                self.registered = true;
                if let Some(n) = args.first() {
                    self.nick.clone_from(n);
                }
                if self.nick != self.config.nick {
                    self.reclaim_at = Some(Instant::now() + Duration::from_secs(60));
                }
                self.send_urgent(Command::USERHOST(vec![self.nick.clone()]));
                if let Some(p) = &self.config.nickserv_password {
                    self.send_urgent(Command::PRIVMSG("NickServ".into(), format!("IDENTIFY {p}")));
                }
                for (channel, key) in self.config.channels.clone() {
                    self.send_urgent(Command::JOIN(channel, key, None));
                }
                if self.config.channels.is_empty() {
                    let _ = self.joined_tx.send(true);
                }
            }
            Response::RPL_USERHOST => {
                // "nick=+user@host" or "nick*=-user@host"
                if let Some(entry) = args.last().and_then(|a| a.split_whitespace().next()) {
                    if let Some((nick, rest)) = entry.split_once('=') {
                        let userhost = rest.trim_start_matches(['+', '-']);
                        self.prefix_len = nick.trim_end_matches('*').len() + 1 + userhost.len();
                    }
                }
            }
            Response::ERR_NICKNAMEINUSE | Response::ERR_ERRONEOUSNICKNAME | Response::ERR_NICKCOLLISION
                if !self.registered =>
            {
                self.next_nick()?;
            }
            Response::RPL_NAMREPLY => {
                if let (Some(channel), Some(names)) = (args.get(2), args.get(3)) {
                    let m = self.members.entry(channel.to_ascii_lowercase()).or_default();
                    for n in names.split_whitespace() {
                        m.insert(n.trim_start_matches(['~', '&', '@', '%', '+']).to_owned());
                    }
                }
            }
            Response::RPL_SASLSUCCESS => self.out.urgent("CAP END".into()),
            Response::ERR_SASLFAIL | Response::ERR_SASLTOOLONG | Response::ERR_SASLABORT => {
                return Err(SessionEnd::Fatal(IrcError::Sasl(args.last().cloned().unwrap_or_default())));
            }
            Response::ERR_BANNEDFROMCHAN | Response::ERR_BADCHANNELKEY | Response::ERR_INVITEONLYCHAN => {
                warn!(channel = args.get(1).map_or("", String::as_str), "Cannot join an IRC channel.");
            }
            _ => {}
        }
        Ok(())
    }
}

/// What the bot has to send, in three queues: protocol lines (PONG, PING,
/// NICK, JOIN, CAP, AUTHENTICATE, USERHOST, NickServ) ahead of everything,
/// then answers to private messages and the lines of the current post taking
/// turns. Only the post's lines are not bounded here (one post at a time).
#[derive(Default)]
struct Outgoing {
    urgent: VecDeque<String>,
    replies: VecDeque<String>,
    normal: VecDeque<String>,
    /// Whether the last reply-or-post line sent was a reply.
    replied_last: bool,
    dropped_replies: u64,
    dropped_urgent: u64,
}

impl Outgoing {
    /// Queues a protocol line; dropped beyond [`MAX_URGENT`] waiting.
    fn urgent(&mut self, line: String) {
        if self.urgent.len() >= MAX_URGENT {
            self.dropped_urgent += 1;
            debug!(dropped = self.dropped_urgent, "Too many protocol lines waiting; one dropped.");
            return;
        }
        self.urgent.push_back(line);
    }

    /// Queues an answer to someone; dropped beyond [`MAX_REPLIES`] waiting.
    fn reply(&mut self, line: String) {
        if self.replies.len() >= MAX_REPLIES {
            self.dropped_replies += 1;
            debug!(dropped = self.dropped_replies, "Too many replies waiting; one dropped.");
            return;
        }
        self.replies.push_back(line);
    }

    fn is_empty(&self) -> bool {
        self.urgent.is_empty() && self.replies.is_empty() && self.normal.is_empty()
    }

    /// The next line to send.
    fn next(&mut self) -> Option<String> {
        if let Some(line) = self.urgent.pop_front() {
            return Some(line);
        }
        let reply_first = !self.replied_last || self.normal.is_empty();
        let line = if reply_first { self.replies.pop_front() } else { None };
        match line {
            Some(line) => {
                self.replied_last = true;
                Some(line)
            }
            None => {
                self.replied_last = false;
                self.normal.pop_front().or_else(|| self.replies.pop_front())
            }
        }
    }
}

/// `line` as it goes on the wire: one IRC line whatever it holds (a PONG
/// echoes what the server sent): CR, LF and NUL inside become spaces, and
/// it is cut to 510 octets (on a character boundary) before its CRLF. Every
/// line the bot writes passes through here.
fn wire_line(line: &str) -> String {
    let line = line.trim_end_matches(['\r', '\n']);
    // IRCv3 tags (`@a=b;c `, built here from escaped values) do not count
    // in the 512: the message after them does.
    let (tags, line) = match line.strip_prefix('@').and_then(|l| l.split_once(' ')) {
        Some((tags, rest)) if tags.len() <= 4000 && !tags.contains(['\r', '\n', '\0']) => (tags, rest),
        _ => ("", line),
    };
    let mut cut = line.len().min(510);
    while !line.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out = if tags.is_empty() { String::new() } else { format!("@{tags} ") };
    out.extend(line[..cut].chars().map(|c| if matches!(c, '\r' | '\n' | '\0') { ' ' } else { c }));
    out.push_str("\r\n");
    out
}

/// Reads one line (up to LF) onto the end of `buf`, at most [`MAX_READ`]
/// octets kept. `Ok(false)` at the end of the stream.
///
/// Cancel-safe, as a `select!` branch must be: what it has consumed is
/// already in `buf`, which the caller clears only after a whole line.
async fn read_line<R: AsyncRead + Unpin>(reader: &mut BufReader<R>, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    loop {
        let chunk = reader.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(false);
        }
        let (part, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (&chunk[..=i], true),
            None => (chunk, false),
        };
        let n = part.len();
        let room = MAX_READ.saturating_sub(buf.len());
        buf.extend_from_slice(&part[..n.min(room)]);
        reader.consume(n);
        if done {
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: reading was not cancel-safe, so a line arriving in two
    /// pieces while a timer branch of the bot's `select!` fired lost its
    /// first piece (the load bench saw 2 of 1,200 lines vanish).
    #[tokio::test]
    async fn a_line_split_across_a_cancelled_read_is_whole() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut reader = BufReader::new(server);
        let mut buf = Vec::new();
        client.write_all(b"PRIVMSG #c :first ha").await.unwrap();
        let cancelled = tokio::time::timeout(Duration::from_millis(50), read_line(&mut reader, &mut buf)).await;
        assert!(cancelled.is_err(), "no whole line yet");
        client.write_all(b"lf\r\nnext\r\n").await.unwrap();
        assert!(read_line(&mut reader, &mut buf).await.unwrap());
        assert_eq!(buf, b"PRIVMSG #c :first half\r\n");
        buf.clear();
        assert!(read_line(&mut reader, &mut buf).await.unwrap());
        assert_eq!(buf, b"next\r\n");
    }

    #[tokio::test]
    async fn an_overlong_line_is_cut_and_the_next_one_is_whole() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut reader = BufReader::new(server);
        let mut buf = Vec::new();
        let writer = tokio::spawn(async move {
            client.write_all(&vec![b'x'; 100_000]).await.unwrap();
            client.write_all(b"\r\nnext\r\n").await.unwrap();
            client
        });
        assert!(read_line(&mut reader, &mut buf).await.unwrap());
        assert_eq!(buf.len(), MAX_READ);
        buf.clear();
        assert!(read_line(&mut reader, &mut buf).await.unwrap());
        assert_eq!(buf, b"next\r\n");
        drop(writer.await.unwrap());
    }

    /// Records events; answers private messages with `reply`.
    #[derive(Default)]
    struct Recorder {
        events: std::sync::Mutex<Vec<Event>>,
        reply: Option<String>,
    }

    impl IrcSink for Recorder {
        async fn event(&self, event: Event) -> Option<String> {
            let private = matches!(event, Event::Private { .. });
            self.events.lock().unwrap().push(event);
            if private {
                self.reply.clone()
            } else {
                None
            }
        }
    }

    fn config() -> IrcConfig {
        IrcConfig {
            server: "127.0.0.1".into(),
            port: 6667,
            tls: false,
            tls_fingerprint: None,
            nick: "bot".into(),
            alt_nicks: Vec::new(),
            sasl: None,
            nickserv_password: None,
            channels: vec![("#c".into(), None)],
            burst: 4.0,
            lines_per_second: 1.0,
            ping_interval: Duration::from_secs(120),
            reconnect_min: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(10),
            timeout: Duration::from_millis(200),
        }
    }

    fn post(target: &str, lines: &[&str]) -> Post {
        Post {
            target: target.into(),
            lines: lines.iter().map(|&l| l.to_owned()).collect(),
            reply_to: None,
            key: None,
            done: oneshot::channel().0,
        }
    }

    /// Every protocol line queued so far, taken.
    fn urgent_lines(session: &mut Session<'_, Recorder>) -> Vec<String> {
        session.out.urgent.drain(..).collect()
    }

    #[tokio::test]
    async fn capabilities_are_asked_for_only_where_offered() {
        let config = config();
        let sink = Recorder::default();
        let (joined, _) = watch::channel(false);
        // InspIRCd 3 with its IRCv3 modules, the list in two lines.
        let mut session = Session::new(&config, &sink, &joined);
        session.handle(":irc.test CAP * LS * :account-notify batch cap-notify echo-message").await.ok();
        assert!(urgent_lines(&mut session).is_empty(), "waits for the last LS line");
        session.handle(":irc.test CAP * LS :labeled-response message-tags server-time").await.ok();
        assert_eq!(urgent_lines(&mut session), ["CAP REQ :server-time message-tags echo-message"]);
        session.handle(":irc.test CAP bot ACK :server-time message-tags echo-message").await.ok();
        assert_eq!(urgent_lines(&mut session), ["CAP END"]);
        assert!(session.has("message-tags") && session.has("echo-message") && session.has("server-time"));
        // A server sending LS continuation lines without end keeps nothing
        // but the names the bot would ask for; once negotiation is over,
        // further CAP lines change nothing.
        let mut session = Session::new(&config, &sink, &joined);
        for i in 0..10_000 {
            session.handle(&format!(":irc.test CAP * LS * :x-{i}-a x-{i}-b server-time")).await.ok();
        }
        assert_eq!(session.offered, ["server-time"]);
        session.handle(":irc.test CAP * LS :message-tags").await.ok();
        session.handle(":irc.test CAP bot ACK :server-time message-tags x-1-a").await.ok();
        assert_eq!(urgent_lines(&mut session), ["CAP REQ :server-time message-tags", "CAP END"]);
        session.handle(":irc.test CAP bot ACK :echo-message").await.ok();
        session.handle(":irc.test CAP * LS :sasl echo-message").await.ok();
        assert!(urgent_lines(&mut session).is_empty() && session.caps.len() == 2, "{:?}", session.caps);
        // ngircd: only multi-prefix. Nothing asked, negotiation ended.
        let mut session = Session::new(&config, &sink, &joined);
        session.handle(":irc.test CAP * LS :multi-prefix").await.ok();
        assert_eq!(urgent_lines(&mut session), ["CAP END"]);
        assert!(session.caps.is_empty());
        // Refused as a set: go on without.
        let mut session = Session::new(&config, &sink, &joined);
        session.handle(":irc.test CAP * LS :server-time").await.ok();
        session.handle(":irc.test CAP * NAK :server-time").await.ok();
        assert_eq!(urgent_lines(&mut session), ["CAP REQ :server-time", "CAP END"]);
        // SASL configured but not offered: a clear, fatal error.
        let sasl = IrcConfig { sasl: Some(("u".into(), "p".into())), ..config.clone() };
        let mut session = Session::new(&sasl, &sink, &joined);
        let ended = session.handle(":irc.test CAP * LS :server-time").await;
        assert!(matches!(ended, Err(SessionEnd::Fatal(IrcError::Sasl(_)))));
        let mut session = Session::new(&sasl, &sink, &joined);
        session.handle(":irc.test CAP * LS :sasl=PLAIN,EXTERNAL server-time").await.ok();
        session.handle(":irc.test CAP bot ACK :server-time sasl").await.ok();
        assert_eq!(urgent_lines(&mut session), ["CAP REQ :server-time sasl", "AUTHENTICATE PLAIN"]);
    }

    #[tokio::test]
    async fn tags_are_read_and_a_reply_and_its_echo_are_tagged() {
        let config = config();
        let sink = Recorder::default();
        let (joined, _) = watch::channel(false);
        let mut session = Session::new(&config, &sink, &joined);
        session.caps.extend(["message-tags".to_owned(), "echo-message".to_owned()]);
        session
            .handle("@time=2026-12-06T16:17:22.542Z;msgid=420~1~2;+draft/reply=420~1~0 :carl!c@h PRIVMSG #c :yes")
            .await
            .ok();
        // A tag value with an escaped space and a control character; an overlong one is dropped.
        let long = "x".repeat(MAX_TAG_VALUE + 1);
        session.handle(&format!("@msgid=a\\sb\x07;+draft/reply={long} :carl!c@h PRIVMSG #c :no")).await.ok();
        let metas: Vec<Meta> = sink
            .events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                Event::Channel { meta, .. } => Some(meta.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            metas,
            [
                Meta {
                    time: Some("2026-12-06T16:17:22.542Z".into()),
                    msgid: Some("420~1~2".into()),
                    reply_to: Some("420~1~0".into())
                },
                Meta { time: None, msgid: Some("a b".into()), reply_to: None },
            ]
        );
        // The first line of a reply carries +draft/reply, escaped; the others do not.
        let mut p = post("#c", &["first", "second"]);
        p.reply_to = Some("id;with space".into());
        p.key = Some("<m1@gw>".into());
        session.queue_post(p);
        let lines: Vec<String> = session.out.normal.drain(..).collect();
        assert_eq!(lines, ["@+draft/reply=id\\:with\\sspace PRIVMSG #c :first", "PRIVMSG #c :second"]);
        assert!(wire_line(&lines[0]).starts_with("@+draft/reply=id\\:with\\sspace PRIVMSG #c :first\r\n"));
        // The echo of the first line reports its msgid with the post's key.
        session.handle("@msgid=420~1~9;inspircd.org/echo :bot!b@h PRIVMSG #c :first").await.ok();
        let posted = sink.events.lock().unwrap().last().cloned();
        assert_eq!(posted, Some(Event::Posted { key: "<m1@gw>".into(), msgid: "420~1~9".into() }));
        assert!(session.awaiting_echo.is_empty());
        // Without message-tags, no tag is sent.
        session.caps.clear();
        let mut p = post("#c", &["plain"]);
        p.reply_to = Some("x".into());
        session.queue_post(p);
        assert_eq!(session.out.normal.pop_front().as_deref(), Some("PRIVMSG #c :plain"));
    }

    #[test]
    fn tags_do_not_count_in_the_512_octets() {
        let tagged = format!("@+draft/reply=abc PRIVMSG #c :{}", "y".repeat(600));
        let out = wire_line(&tagged);
        assert!(out.starts_with("@+draft/reply=abc PRIVMSG #c :y"));
        assert_eq!(out.len(), "@+draft/reply=abc ".len() + 512);
        // Not a tag section: cut as any line.
        assert_eq!(wire_line(&format!("@{}", "z".repeat(600))).len(), 512);
    }

    /// Regression (fuzz `irc_line`): a `from` with a comma made the answer a
    /// NOTICE to a list; one with NULs (written as spaces) a NOTICE with
    /// several targets.
    #[tokio::test]
    async fn an_answer_goes_to_one_nick_only() {
        let config = config();
        let sink = Recorder { reply: Some("relayed".into()), ..Recorder::default() };
        let (joined, _) = watch::channel(false);
        let mut session = Session::new(&config, &sink, &joined);
        for from in ["a,ice", "#chan", "$*.example", "ali*", "\0\0alice", "al\tice", "al\x01ice"] {
            session.handle(&format!(":{from}!u@h PRIVMSG bot :alice@example.org hi")).await.ok();
        }
        session.handle(":alice!u@h PRIVMSG bot :alice@example.org hi").await.ok();
        assert_eq!(session.out.replies.iter().collect::<Vec<_>>(), ["NOTICE alice relayed\r\n"]);
    }

    #[test]
    fn what_goes_on_the_wire_is_one_line_of_at_most_512_octets() {
        assert_eq!(wire_line("PONG a\rb\0c\nd\r\n"), "PONG a b c d\r\n");
        let long = format!("PONG :{}", "é".repeat(400));
        let out = wire_line(&long);
        assert!(out.len() <= 512 && out.ends_with("\r\n") && out.starts_with("PONG :é"), "{}", out.len());
    }

    #[tokio::test]
    async fn a_pong_goes_out_ahead_of_a_thousand_replies_which_stay_bounded() {
        let config = config();
        let sink = Recorder { reply: Some("relayed".into()), ..Recorder::default() };
        let (joined, _) = watch::channel(false);
        let mut session = Session::new(&config, &sink, &joined);
        for i in 0..1000 {
            session.handle(&format!(":flood{i}!u@h PRIVMSG bot :alice@example.org hi")).await.ok();
        }
        assert_eq!(sink.events.lock().unwrap().len(), 1000);
        assert_eq!(session.out.replies.len(), MAX_REPLIES);
        assert_eq!(session.out.dropped_replies, 1000 - MAX_REPLIES as u64);
        session.handle(":irc.test PING :token").await.ok();
        assert_eq!(session.out.next().as_deref(), Some("PONG token\r\n"));
        assert_eq!(session.out.next().as_deref(), Some("NOTICE flood0 relayed\r\n"));
    }

    #[test]
    fn replies_and_posts_take_turns_behind_protocol_lines() {
        let mut out = Outgoing::default();
        for i in 0..3 {
            out.reply(format!("r{i}"));
            out.normal.push_back(format!("p{i}"));
        }
        out.urgent("PONG".into());
        let order: Vec<String> = std::iter::from_fn(|| out.next()).collect();
        assert_eq!(order, ["PONG", "r0", "p0", "r1", "p1", "r2", "p2"]);
        for i in 0..(MAX_URGENT + 5) {
            out.urgent(format!("u{i}"));
        }
        assert_eq!(out.urgent.len(), MAX_URGENT);
    }

    #[tokio::test]
    async fn a_post_has_one_target_and_bounded_lines() {
        let config = config();
        let sink = Recorder::default();
        let (joined, _) = watch::channel(false);
        let mut session = Session::new(&config, &sink, &joined);
        session.queue_post(post(" :alice,#secret", &["hi\r\nQUIT"]));
        assert_eq!(session.out.normal.pop_front().as_deref(), Some("PRIVMSG alice#secret :hi  QUIT"));
        session.current = None;
        let long = "y".repeat(400);
        let lines = vec![long.as_str(); 3 * MAX_POST_LINES];
        session.queue_post(post("#c", &lines));
        assert_eq!(session.out.normal.len(), MAX_POST_LINES);
    }

    #[tokio::test]
    async fn every_event_text_is_cleaned() {
        let config = config();
        let sink = Recorder::default();
        let (joined, _) = watch::channel(false);
        let mut session = Session::new(&config, &sink, &joined);
        session.handle(":carl!u@h PRIVMSG #c :one\rFrom: x\x07 \x02bold\x02").await.ok();
        session.handle(":carl!u@h TOPIC #c :new\rtopic\x0304red").await.ok();
        session.handle(":carl!u@h PRIVMSG bot :alice@example.org a\rb").await.ok();
        let events = sink.events.lock().unwrap().clone();
        let texts: Vec<&str> = events
            .iter()
            .map(|e| match e {
                Event::Channel { text, .. } | Event::Private { text, .. } => text.as_str(),
                _ => "",
            })
            .collect();
        assert_eq!(texts, ["one From: x bold", "new topicred", "alice@example.org a b"]);
    }

    #[tokio::test]
    async fn a_server_that_does_not_read_ends_the_session() {
        let config = config();
        let sink = Recorder::default();
        let (joined, _) = watch::channel(false);
        let mut session = Session::new(&config, &sink, &joined);
        // The server side never reads: the registration lines cannot all be written.
        let (server, client) = tokio::io::duplex(8);
        let (_posts_tx, mut posts) = mpsc::channel(1);
        let shutdown = CancellationToken::new();
        let started = Instant::now();
        let ended = session.run(Box::new(client), &mut posts, &shutdown).await;
        assert!(matches!(ended, Err(SessionEnd::Lost(ref why)) if why.contains("timed out")));
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(server);
    }

    #[tokio::test]
    async fn a_tls_handshake_that_never_answers_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = tokio::spawn(async move { listener.accept().await });
        let config = IrcConfig { port, tls: true, tls_fingerprint: Some("00".into()), ..config() };
        let started = Instant::now();
        let e = connect(&config).await.err().unwrap();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(5));
        held.abort();
    }
}
