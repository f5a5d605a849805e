//! Relaying mail out through a smarthost, with lettre's SMTP client over pooled connections.

use std::time::{Duration, Instant};

use lettre::address::Envelope as LettreEnvelope;
use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::PoolConfig;
use lettre::{Address, AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

/// How to talk to the smarthost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// Plain SMTP (a smarthost on loopback or a trusted network).
    None,
    /// STARTTLS, required.
    StartTls,
    /// TLS from the first octet (port 465).
    Tls,
}

/// Smarthost settings.
#[derive(Debug, Clone)]
pub struct SmarthostConfig {
    /// Host name (also the TLS name).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Transport security.
    pub security: Security,
    /// Optional credentials (user, password).
    pub credentials: Option<(String, String)>,
    /// The name we give in EHLO.
    pub hello_name: String,
    /// Accept any certificate (a smarthost with a self-signed certificate).
    pub accept_invalid_certs: bool,
    /// Per-command timeout.
    pub timeout: Duration,
    /// Most pooled connections.
    pub max_connections: u32,
}

/// Why a relay failed.
#[derive(Debug, thiserror::Error)]
#[error("{text}")]
pub struct SendError {
    /// A permanent failure (5xx, or an address that can never be sent to).
    pub permanent: bool,
    /// What happened, with the smarthost's reply when there was one.
    pub text: String,
}

/// Idle pooled connections older than this are checked with `NOOP` before reuse.
const CHECK_AFTER: Duration = Duration::from_secs(2);

/// Idle pooled connections older than this are closed rather than reused.
const MAX_IDLE: Duration = Duration::from_secs(60);

/// Connections to the smarthost, pooled.
///
/// For plain SMTP and STARTTLS the gateway opens the TCP connection itself,
/// with `TCP_NODELAY`: lettre writes a message and its final `.` in two
/// writes, which Nagle's algorithm would hold back until the first is
/// acknowledged (about 40 ms against a receiver with delayed ACKs). Implicit
/// TLS (port 465) goes through lettre's own pooled transport.
pub struct Smarthost {
    config: SmarthostConfig,
    starttls: Option<TlsParameters>,
    wrapper: Option<AsyncSmtpTransport<Tokio1Executor>>,
    idle: std::sync::Mutex<Vec<(AsyncSmtpConnection, Instant)>>,
    slots: tokio::sync::Semaphore,
    /// Bounds a whole relay (connect, TLS, every command and the data):
    /// lettre's own timeout covers the connect and each reply, not writes.
    deadline: Duration,
}

impl Smarthost {
    /// Builds the transport (no connection is made yet).
    ///
    /// # Errors
    /// If the TLS parameters cannot be built.
    pub fn new(config: &SmarthostConfig) -> Result<Self, SendError> {
        let setup = |e: lettre::transport::smtp::Error| SendError { permanent: true, text: e.to_string() };
        let tls_parameters = || {
            TlsParameters::builder(config.host.clone())
                .dangerous_accept_invalid_certs(config.accept_invalid_certs)
                .build_rustls()
                .map_err(setup)
        };
        let (starttls, wrapper) = match config.security {
            Security::None => (None, None),
            Security::StartTls => (Some(tls_parameters()?), None),
            Security::Tls => {
                let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(config.host.clone())
                    .port(config.port)
                    .tls(Tls::Wrapper(tls_parameters()?))
                    .timeout(Some(config.timeout))
                    .hello_name(ClientId::Domain(config.hello_name.clone()))
                    .pool_config(PoolConfig::new().max_size(config.max_connections.max(1)));
                if let Some((user, password)) = &config.credentials {
                    builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
                }
                (None, Some(builder.build()))
            }
        };
        Ok(Self {
            config: config.clone(),
            starttls,
            wrapper,
            idle: std::sync::Mutex::new(Vec::new()),
            slots: tokio::sync::Semaphore::new(config.max_connections.max(1) as usize),
            deadline: config.timeout.saturating_mul(4),
        })
    }

    /// Relays `data` from `from` (empty: the null sender) to `to`.
    ///
    /// # Errors
    /// [`SendError`], permanent or not.
    pub async fn send(&self, from: &str, to: &[String], data: &[u8]) -> Result<(), SendError> {
        let bad = |a: &str, e: lettre::address::AddressError| SendError {
            permanent: true,
            text: format!("bad address {a:?}: {e}"),
        };
        let from = if from.is_empty() { None } else { Some(from.parse::<Address>().map_err(|e| bad(from, e))?) };
        let to = to.iter().map(|a| a.parse::<Address>().map_err(|e| bad(a, e))).collect::<Result<Vec<_>, _>>()?;
        let envelope = LettreEnvelope::new(from, to)
            .map_err(|e| SendError { permanent: true, text: format!("bad envelope: {e}") })?;
        // lettre dot-stuffs line by line on CRLF; make sure there is nothing else.
        let data = crate::crlf_only(data);
        // lettre ends the data with its own CRLF.CRLF: a message that already
        // ends in CRLF would gain an empty line.
        let data = data.strip_suffix(b"\r\n").unwrap_or(&data);
        let relay = async {
            match &self.wrapper {
                Some(transport) => transport.send_raw(&envelope, data).await.map(drop).map_err(failed),
                None => self.send_pooled(&envelope, data).await,
            }
        };
        match tokio::time::timeout(self.deadline, relay).await {
            Ok(r) => r,
            Err(_) => Err(SendError { permanent: false, text: format!("the smarthost took over {:?}", self.deadline) }),
        }
    }

    async fn send_pooled(&self, envelope: &LettreEnvelope, data: &[u8]) -> Result<(), SendError> {
        let _slot =
            self.slots.acquire().await.map_err(|_| SendError { permanent: false, text: "shutting down".into() })?;
        let mut conn = match self.take_idle().await {
            Some(c) => c,
            None => self.connect().await?,
        };
        let result = conn.send(envelope, data).await;
        if result.is_ok() && !conn.has_broken() {
            let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            idle.push((conn, Instant::now()));
        }
        result.map(drop).map_err(failed)
    }

    /// A pooled connection that still answers, if any.
    async fn take_idle(&self) -> Option<AsyncSmtpConnection> {
        loop {
            let (mut conn, since) = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop()?;
            if since.elapsed() > MAX_IDLE {
                continue;
            }
            if since.elapsed() < CHECK_AFTER || conn.test_connected().await {
                return Some(conn);
            }
        }
    }

    async fn connect(&self) -> Result<AsyncSmtpConnection, SendError> {
        let c = &self.config;
        let hello = ClientId::Domain(c.hello_name.clone());
        let unreachable = |e: String| SendError { permanent: false, text: format!("{}:{}: {e}", c.host, c.port) };
        let tcp = tokio::time::timeout(c.timeout, tokio::net::TcpStream::connect((c.host.as_str(), c.port)))
            .await
            .map_err(|_| unreachable("connect timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let mut conn = AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &hello).await.map_err(failed)?;
        if let Some(tls) = &self.starttls {
            conn.starttls(tls.clone(), &hello).await.map_err(failed)?;
        }
        if let Some((user, password)) = &c.credentials {
            conn.auth(DEFAULT_MECHANISMS, &Credentials::new(user.clone(), password.clone())).await.map_err(failed)?;
        }
        Ok(conn)
    }
}

fn failed(e: lettre::transport::smtp::Error) -> SendError {
    SendError { permanent: e.is_permanent(), text: e.to_string() }
}
