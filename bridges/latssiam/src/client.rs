//! The async LATSSIAM client: one TLS session to one server, and the five
//! verbs as methods. The gateway and the CLI both use it.
//!
//! Each method sends its verb and follows the exchange of PROFILE.md
//! section 4 to its end, returning the server's final status. Statuses that
//! refuse (`34`, `36`, `37`, ...) are answers, returned as `Ok`; only a broken
//! exchange (a violation by the server, a closed stream, a failed check) is
//! an `Err`, after which the client should be dropped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpStream;

use crate::attest::{self, AttestationError};
use crate::conn::{Connection, ReadError};
use crate::fingerprint::Fingerprint;
use crate::identity::Identity;
use crate::tls::{self, ClientStream, PinStore, TlsError};
use crate::wire::{Block, Code, Command, Frame, Label, Password, Status, WireError};

/// The default LATSSIAM port.
pub const PORT: u16 = 1977;

/// How long to wait for a server's answer (beyond an `ACCEPT` deadline).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Could not reach the server.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address tried.
        addr: String,
        /// What went wrong.
        source: std::io::Error,
    },
    /// No address for a host.
    #[error("cannot resolve {host}: {reason}")]
    Resolve {
        /// The host.
        host: String,
        /// What went wrong.
        reason: String,
    },
    /// TLS or TOFU refused the server.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The server broke the wire rules, closed, or timed out.
    #[error("server: {0}")]
    Read(#[from] ReadError),
    /// Sending failed.
    #[error("server: {0}")]
    Write(#[from] WireError),
    /// The server answered out of sequence.
    #[error("unexpected answer from the server: {0}")]
    Unexpected(String),
    /// The server demanded a signature and none was given.
    #[error("the server requires a signature (32) and none was given")]
    SignatureRequired,
    /// The verb needs a client identity.
    #[error("this needs a client identity")]
    NoIdentity,
    /// An attestation failed its checks (`VERIFY`), or could not be made (`MAILBOX REGISTER`).
    #[error(transparent)]
    Attestation(#[from] AttestationError),
    /// `VERIFY` returned another certificate than the one asked for.
    #[error("the server returned certificate {got} when {asked} was asked for")]
    WrongOwner {
        /// The fingerprint asked for.
        asked: Fingerprint,
        /// What came back.
        got: Fingerprint,
    },
}

fn unexpected(frame: &Frame) -> ClientError {
    ClientError::Unexpected(match frame {
        Frame::Status(s) => s.to_string(),
        Frame::Command(c) => format!("{c:?}"),
        Frame::Block(b) => format!("{} block", b.label),
    })
}

/// A message handed out by `ACCEPT`, waiting for [`Client::ack`] or [`Client::refuse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// The sender's detached signature over `message`, if the server has one.
    pub signature: Option<Vec<u8>>,
    /// The `ENCRYPTED MESSAGE` DER.
    pub message: Vec<u8>,
}

/// What `ACCEPT` came back with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// `40`: a message; acknowledge it before the next verb.
    Message(Delivered),
    /// Any other answer (`33`, `34`, `37`, `38`, ...).
    Nothing(Status),
}

/// A checked `VERIFY` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The owner's attestation of the server's key.
    pub attestation: Vec<u8>,
    /// The owner's certificate (its fingerprint is the one asked for).
    pub owner_cert: Vec<u8>,
}

/// One session with a LATSSIAM server.
pub struct Client {
    conn: Connection<ClientStream>,
    server_cert: CertificateDer<'static>,
    identity: Option<Arc<Identity>>,
}

impl Client {
    /// Connects to `addr`, verifying the server by TOFU under `host:port`
    /// (and sending `host` as SNI), presenting `identity` if given.
    ///
    /// # Errors
    /// [`ClientError::Connect`] or [`ClientError::Tls`].
    pub async fn connect(
        addr: SocketAddr,
        host: &str,
        identity: Option<Arc<Identity>>,
        pins: &dyn PinStore,
    ) -> Result<Self, ClientError> {
        Self::connect_within(addr, host, identity, pins, Duration::from_secs(30)).await
    }

    /// As [`Client::connect`], with at most `timeout` for the TCP connection
    /// and the TLS handshake together (a server that accepts and then says
    /// nothing cannot hold the caller).
    ///
    /// # Errors
    /// [`ClientError::Connect`] (also when the time is up) or [`ClientError::Tls`].
    pub async fn connect_within(
        addr: SocketAddr,
        host: &str,
        identity: Option<Arc<Identity>>,
        pins: &dyn PinStore,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let timed_out = || ClientError::Connect {
            addr: addr.to_string(),
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect or TLS handshake timed out"),
        };
        let started = tokio::time::Instant::now();
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| timed_out())?
            .map_err(|source| ClientError::Connect { addr: addr.to_string(), source })?;
        let _ = tcp.set_nodelay(true);
        let left = timeout.saturating_sub(started.elapsed());
        let stream = tokio::time::timeout(left, tls::connect(tcp, host, addr.port(), identity.as_deref(), pins))
            .await
            .map_err(|_| timed_out())??;
        let server_cert =
            tls::server_certificate(&stream).ok_or_else(|| ClientError::Unexpected("no server certificate".into()))?;
        Ok(Self { conn: Connection::new(stream), server_cert, identity })
    }

    /// The server's TLS certificate.
    pub fn server_certificate(&self) -> &CertificateDer<'static> {
        &self.server_cert
    }

    async fn status(&mut self, timeout: Duration) -> Result<Status, ClientError> {
        match self.conn.read(timeout).await? {
            Frame::Status(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    async fn block(&mut self, label: Label, timeout: Duration) -> Result<Vec<u8>, ClientError> {
        match self.conn.read_block(&[label], timeout).await? {
            Ok(b) => Ok(b.der),
            Err(other) => Err(unexpected(&other)),
        }
    }

    /// `SEND`: delivers `message` (an `ENCRYPTED MESSAGE` DER) to `to`, with
    /// `signature` before it if given. Returns the final status: `31` when
    /// stored, or the server's refusal.
    ///
    /// # Errors
    /// [`ClientError::SignatureRequired`] if the server answers `32` and no
    /// signature was given (the session is closed), or a broken exchange.
    pub async fn send(
        &mut self,
        to: Fingerprint,
        message: &[u8],
        signature: Option<&[u8]>,
    ) -> Result<Status, ClientError> {
        self.conn.send(Command::Send(to)).await?;
        let answer = self.status(ANSWER_TIMEOUT).await?;
        match (answer.code(), signature) {
            (Code::Proceed | Code::SignatureRequired, Some(sig)) => {
                self.conn.feed(Block::new(Label::Signature, sig.to_vec())).await?;
            }
            (Code::Proceed, None) => {}
            (Code::SignatureRequired, None) => {
                self.conn.close().await;
                return Err(ClientError::SignatureRequired);
            }
            // `31` (or `33`, `40`, a registration answer) before the message
            // was sent is a session out of step, never a delivery: taken as
            // an answer, a stale `31` would pass for "stored".
            (code, _) if !code.refuses_send() => {
                return Err(ClientError::Unexpected(answer.to_string()));
            }
            _ => return Ok(answer),
        }
        self.conn.send(Block::new(Label::EncryptedMessage, message.to_vec())).await?;
        self.status(ANSWER_TIMEOUT).await
    }

    /// `ACCEPT <deadline>`: waits up to `deadline` for a message.
    ///
    /// # Errors
    /// A broken exchange.
    pub async fn accept(&mut self, deadline: Duration) -> Result<Accepted, ClientError> {
        self.conn.send(Command::Accept(deadline)).await?;
        let answer = self.status(deadline + ANSWER_TIMEOUT).await?;
        if answer.code() != Code::MessageFollows {
            return Ok(Accepted::Nothing(answer));
        }
        let first = match self.conn.read_block(&[Label::Signature, Label::EncryptedMessage], ANSWER_TIMEOUT).await? {
            Ok(b) => b,
            Err(other) => return Err(unexpected(&other)),
        };
        let delivered = if first.label == Label::Signature {
            Delivered {
                signature: Some(first.der),
                message: self.block(Label::EncryptedMessage, ANSWER_TIMEOUT).await?,
            }
        } else {
            Delivered { signature: None, message: first.der }
        };
        Ok(Accepted::Message(delivered))
    }

    /// Acknowledges a delivered message (`31`): the server deletes it. Store
    /// it durably first.
    ///
    /// # Errors
    /// If the status cannot be sent.
    pub async fn ack(&mut self) -> Result<(), ClientError> {
        Ok(self.conn.send(Code::MessageAccepted).await?)
    }

    /// Refuses a delivered message with `32` or `52`: the server deletes it too.
    ///
    /// # Errors
    /// If the status cannot be sent.
    pub async fn refuse(&mut self, status: Status) -> Result<(), ClientError> {
        Ok(self.conn.send(status).await?)
    }

    /// `MAILBOX REGISTER`: registers this identity, attesting the server's key
    /// when asked. Returns the final status (`10`, `11`, `12`, `15`, `20`).
    ///
    /// # Errors
    /// [`ClientError::NoIdentity`], [`ClientError::Attestation`] if the server's
    /// request cannot be signed, or a broken exchange.
    pub async fn register(&mut self, password: &Password) -> Result<Status, ClientError> {
        let identity = self.identity.clone().ok_or(ClientError::NoIdentity)?;
        self.conn.send(Command::Register(password.clone())).await?;
        let answer = self.status(ANSWER_TIMEOUT).await?;
        if answer.code() != Code::AttestationRequested {
            return Ok(answer);
        }
        let csr = self.block(Label::CertificateRequest, ANSWER_TIMEOUT).await?;
        let attestation = attest::attest(&csr, &identity)?;
        self.conn.feed(Code::AttestationFollows).await?;
        self.conn.send(Block::new(Label::Certificate, attestation)).await?;
        self.status(ANSWER_TIMEOUT).await
    }

    /// `MAILBOX DEREGISTER`. Returns the final status.
    ///
    /// # Errors
    /// A broken exchange.
    pub async fn deregister(&mut self) -> Result<Status, ClientError> {
        self.conn.send(Command::Deregister).await?;
        self.status(ANSWER_TIMEOUT).await
    }

    /// `VERIFY <owner>`: the attestation and the owner's certificate, checked
    /// (the certificate is the one asked for, it signed the attestation, and
    /// the attestation certifies this server's TLS key); or the refusal.
    ///
    /// # Errors
    /// [`ClientError::WrongOwner`], [`ClientError::Attestation`], or a broken exchange.
    pub async fn verify(&mut self, owner: Fingerprint) -> Result<Result<Verified, Status>, ClientError> {
        self.conn.send(Command::Verify(owner)).await?;
        let answer = self.status(ANSWER_TIMEOUT).await?;
        if answer.code() != Code::AttestationFollows {
            return Ok(Err(answer));
        }
        let attestation = self.block(Label::Certificate, ANSWER_TIMEOUT).await?;
        let owner_cert = self.block(Label::Certificate, ANSWER_TIMEOUT).await?;
        let got = Fingerprint::of(&owner_cert);
        if got != owner {
            return Err(ClientError::WrongOwner { asked: owner, got });
        }
        attest::check(&attestation, &owner_cert, &self.server_cert, None)?;
        Ok(Ok(Verified { attestation, owner_cert }))
    }

    /// `QUIT`, then close.
    pub async fn quit(mut self) {
        let _ = self.conn.send(Command::Quit).await;
        self.conn.close().await;
    }
}

/// How long a negative DNS answer that names no TTL (no SOA) is kept.
pub const NEGATIVE_MIN_TTL: Duration = Duration::from_secs(10);

/// A DNS resolver: the system's (`/etc/resolv.conf`, `/etc/hosts`) when
/// `nameservers` is empty, else these servers (UDP, then TCP), each query
/// bounded by `timeout`. Answers are cached within their TTL.
///
/// # Errors
/// The system configuration cannot be read, or the resolver cannot be built.
pub fn dns_resolver(nameservers: &[SocketAddr], timeout: Duration) -> Result<TokioResolver, String> {
    use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
    let (config, mut options) = if nameservers.is_empty() {
        hickory_resolver::system_conf::read_system_conf()
            .map_err(|e| format!("cannot read the system's DNS settings ({e}); name DNS servers instead"))?
    } else {
        let servers = nameservers
            .iter()
            .map(|sa| {
                let (mut udp, mut tcp) = (ConnectionConfig::udp(), ConnectionConfig::tcp());
                udp.port = sa.port();
                tcp.port = sa.port();
                NameServerConfig::new(sa.ip(), true, vec![udp, tcp])
            })
            .collect();
        let mut options = ResolverOpts::default();
        options.use_hosts_file = ResolveHosts::Never;
        (ResolverConfig::from_name_servers(servers), options)
    };
    options.timeout = timeout;
    options.attempts = 2;
    // A negative answer without an SOA (a minimal or misconfigured server:
    // real ones send the zone's) carries no TTL, and hickory then keeps it
    // for no time at all, so a name that does not exist is asked again for
    // every message: DMARC's walk up to `_dmarc.<tld>` did that 0.2 times per
    // message under load, 7 % of the gateway's CPU. Kept briefly instead.
    options.negative_min_ttl = Some(NEGATIVE_MIN_TTL);
    // Plain DNS only: no DNS-over-TLS, so no certificate store is read.
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    TokioResolver::builder_with_config(config, hickory_resolver::net::runtime::TokioRuntimeProvider::default())
        .with_options(options)
        .with_tls_config(tls)
        .build()
        .map_err(|e| e.to_string())
}

/// Finds LATSSIAM servers for hosts: a static map first (tests, private
/// deployments), then DNS: MX records by preference, then A/AAAA, port 1977.
#[derive(Clone, Default)]
pub struct Resolver {
    routes: HashMap<String, String>,
    dns: Option<TokioResolver>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").field("routes", &self.routes).field("dns", &self.dns.is_some()).finish()
    }
}

impl Resolver {
    /// A resolver with `routes` (host -> `addr:port` or `host:port`) taking precedence over DNS.
    pub fn new(routes: HashMap<String, String>) -> Self {
        Self { routes: routes.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect(), dns: None }
    }

    /// Asks `dns` (see [`dns_resolver`]) for MX, A and AAAA records, instead
    /// of the system's resolver made for each look-up.
    #[must_use]
    pub fn with_dns(mut self, dns: TokioResolver) -> Self {
        self.dns = Some(dns);
        self
    }

    /// Candidate addresses for `host`, best first, each with the name to
    /// verify and pin it under. No MX record (NXDOMAIN or none of that type)
    /// means the host itself (RFC 5321 5.1); any other DNS failure is an error.
    ///
    /// # Errors
    /// [`ClientError::Resolve`] if nothing is found.
    pub async fn resolve(&self, host: &str) -> Result<Vec<(String, SocketAddr)>, ClientError> {
        let fail = |reason: String| ClientError::Resolve { host: host.to_owned(), reason };
        if let Some(target) = self.routes.get(&host.to_ascii_lowercase()) {
            let (name, _) = split_host_port(target);
            let addrs = tokio::net::lookup_host(with_port(target)).await.map_err(|e| fail(e.to_string()))?;
            return Ok(addrs.map(|a| (name.to_owned(), a)).collect());
        }
        let dns = match &self.dns {
            Some(d) => d.clone(),
            None => dns_resolver(&[], Duration::from_secs(5)).map_err(fail)?,
        };
        let mut exchanges: Vec<(u16, String)> = match dns.mx_lookup(host).await {
            Ok(lookup) => lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    hickory_resolver::proto::rr::RData::MX(mx) => {
                        Some((mx.preference, mx.exchange.to_utf8().trim_end_matches('.').to_owned()))
                    }
                    _ => None,
                })
                .collect(),
            Err(e) if e.is_no_records_found() => Vec::new(),
            Err(e) => return Err(fail(format!("MX: {e}"))),
        };
        exchanges.sort();
        if exchanges.is_empty() {
            exchanges.push((0, host.to_owned()));
        }
        let mut out = Vec::new();
        for (_, name) in exchanges {
            if let Ok(ips) = dns.lookup_ip(name.as_str()).await {
                out.extend(ips.iter().map(|ip| (name.clone(), SocketAddr::new(ip, PORT))));
            }
        }
        if out.is_empty() {
            return Err(fail("no MX, A or AAAA record".into()));
        }
        Ok(out)
    }
}

impl Resolver {
    /// Whether `server` (`HOST[:PORT]`) has a static route (an operator's choice).
    pub fn routed(&self, server: &str) -> bool {
        self.routes.contains_key(&split_host_port(server).0.to_ascii_lowercase())
    }

    /// Addresses for a server named as `HOST[:PORT]` (port 1977 when absent):
    /// a static route for the host if there is one, else the host's own
    /// A/AAAA records (no MX: the server is named, not a mailbox's host).
    ///
    /// # Errors
    /// [`ClientError::Resolve`] if nothing is found.
    pub async fn resolve_server(&self, server: &str) -> Result<Vec<(String, SocketAddr)>, ClientError> {
        let (host, port) = split_host_port(server);
        if self.routes.contains_key(&host.to_ascii_lowercase()) {
            return self.resolve(host).await;
        }
        let fail = |reason: String| ClientError::Resolve { host: host.to_owned(), reason };
        let addrs: Vec<_> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| fail(e.to_string()))?
            .map(|a| (host.to_owned(), a))
            .collect();
        if addrs.is_empty() {
            return Err(fail("no A or AAAA record".into()));
        }
        Ok(addrs)
    }
}

/// Splits `host[:port]` or `[v6]:port` (port 1977 when absent).
pub fn split_host_port(s: &str) -> (&str, u16) {
    if let Some(rest) = s.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((h, "")) => (h, PORT),
            Some((h, p)) => (h, p.strip_prefix(':').and_then(|p| p.parse().ok()).unwrap_or(PORT)),
            None => (s, PORT),
        };
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (h, port),
            Err(_) => (s, PORT),
        },
        _ => (s, PORT),
    }
}

fn with_port(s: &str) -> String {
    let (h, p) = split_host_port(s);
    if h.contains(':') {
        format!("[{h}]:{p}")
    } else {
        format!("{h}:{p}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(split_host_port("h.example"), ("h.example", 1977));
        assert_eq!(split_host_port("h.example:2000"), ("h.example", 2000));
        assert_eq!(split_host_port("127.0.0.1:5"), ("127.0.0.1", 5));
        assert_eq!(split_host_port("[::1]:7"), ("::1", 7));
        assert_eq!(split_host_port("[::1]"), ("::1", 1977));
        assert_eq!(with_port("[::1]:7"), "[::1]:7");
    }

    #[tokio::test]
    async fn static_routes_win_over_dns() {
        let r = Resolver::new(HashMap::from([("Mail.Example".to_owned(), "127.0.0.1:4000".to_owned())]));
        let got = r.resolve("mail.example").await.unwrap();
        assert_eq!(got, vec![("127.0.0.1".to_owned(), "127.0.0.1:4000".parse().unwrap())]);
    }

    #[tokio::test]
    async fn a_named_server_uses_its_route_or_its_own_port() {
        let r = Resolver::new(HashMap::from([("home.example".to_owned(), "127.0.0.1:4000".to_owned())]));
        let got = r.resolve_server("home.example:9").await.unwrap();
        assert_eq!(got, vec![("127.0.0.1".to_owned(), "127.0.0.1:4000".parse().unwrap())]);
        let got = r.resolve_server("127.0.0.1:4001").await.unwrap();
        assert_eq!(got, vec![("127.0.0.1".to_owned(), "127.0.0.1:4001".parse().unwrap())]);
    }
}
