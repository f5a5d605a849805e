//! Relaying mail out through a smarthost, with lettre (pooled connections).

use std::time::Duration;

use lettre::address::Envelope as LettreEnvelope;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
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

/// A pooled connection to the smarthost.
pub struct Smarthost {
    transport: AsyncSmtpTransport<Tokio1Executor>,
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
        let tls = match config.security {
            Security::None => Tls::None,
            Security::StartTls => Tls::Required(tls_parameters()?),
            Security::Tls => Tls::Wrapper(tls_parameters()?),
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(config.host.clone())
            .port(config.port)
            .tls(tls)
            .timeout(Some(config.timeout))
            .hello_name(lettre::transport::smtp::extension::ClientId::Domain(config.hello_name.clone()))
            .pool_config(PoolConfig::new().max_size(config.max_connections.max(1)));
        if let Some((user, password)) = &config.credentials {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }
        Ok(Self { transport: builder.build(), deadline: config.timeout.saturating_mul(4) })
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
        match tokio::time::timeout(self.deadline, self.transport.send_raw(&envelope, &data)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(SendError { permanent: e.is_permanent(), text: e.to_string() }),
            Err(_) => Err(SendError { permanent: false, text: format!("the smarthost took over {:?}", self.deadline) }),
        }
    }
}
