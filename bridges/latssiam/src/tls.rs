//! TLS for LATSSIAM (PROFILE.md section 1): Trust On First Use both ways.
//!
//! - Client: the server's certificate is pinned per `host:port` in a
//!   [`PinStore`] on first contact, and a later handshake showing another
//!   certificate is refused with [`TlsError::PinMismatch`], naming both
//!   fingerprints. A pin is written only after the handshake has proved that
//!   the server holds the certificate's key.
//! - Server: a client certificate is requested, never required; any
//!   well-formed, currently valid certificate is accepted and becomes the
//!   session's identity ([`peer_certificate`]).
//!
//! TOFU replaces the CA chain, not the proof of possession: both verifiers
//! check the handshake signatures with rustls' own functions.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::net::TcpStream;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::fingerprint::Fingerprint;
use crate::identity::Identity;

/// The client side of a LATSSIAM TLS stream.
pub type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;
/// The server side of a LATSSIAM TLS stream.
pub type ServerStream = tokio_rustls::server::TlsStream<TcpStream>;

/// Why a TLS session could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The server shows another certificate than the one pinned for it.
    #[error(
        "{peer} presented certificate {presented}, but {pinned} is pinned for it; \
         refusing (accept the new one explicitly if the change is expected)"
    )]
    PinMismatch {
        /// `host:port`.
        peer: String,
        /// The pinned fingerprint.
        pinned: Fingerprint,
        /// What the server presented.
        presented: Fingerprint,
    },
    /// The peer's certificate has expired.
    #[error("{peer}: certificate {fingerprint} has expired")]
    Expired {
        /// `host:port`.
        peer: String,
        /// The certificate.
        fingerprint: Fingerprint,
    },
    /// The peer's certificate is not valid yet.
    #[error("{peer}: certificate {fingerprint} is not valid yet")]
    NotYetValid {
        /// `host:port`.
        peer: String,
        /// The certificate.
        fingerprint: Fingerprint,
    },
    /// The host is not a DNS name or IP address.
    #[error("not a host name: {0}")]
    BadServerName(String),
    /// The handshake failed for another reason.
    #[error("TLS handshake with {peer} failed: {source}")]
    Handshake {
        /// `host:port`.
        peer: String,
        /// The underlying error.
        source: io::Error,
    },
    /// The identity could not be used for TLS.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// Reading or writing the pin store failed.
    #[error("pin store {path}: {source}")]
    PinStore {
        /// Where the pins live.
        path: String,
        /// What went wrong.
        source: io::Error,
    },
}

/// Where a client keeps `host:port -> fingerprint` pins.
pub trait PinStore: Send + Sync {
    /// The pin for `peer`, if any.
    ///
    /// # Errors
    /// [`TlsError::PinStore`] when the store cannot be read.
    fn get(&self, peer: &str) -> Result<Option<Fingerprint>, TlsError>;

    /// Pins `peer` to `fingerprint`, replacing any pin (first contact, or the
    /// operator accepting a new certificate).
    ///
    /// # Errors
    /// [`TlsError::PinStore`] when the store cannot be written.
    fn set(&self, peer: &str, fingerprint: Fingerprint) -> Result<(), TlsError>;
}

/// Pins held in memory only (tests, short-lived tools).
#[derive(Default, Debug)]
pub struct MemoryPins(Mutex<BTreeMap<String, Fingerprint>>);

impl PinStore for MemoryPins {
    fn get(&self, peer: &str) -> Result<Option<Fingerprint>, TlsError> {
        Ok(self.0.lock().unwrap_or_else(|e| e.into_inner()).get(peer).copied())
    }

    fn set(&self, peer: &str, fingerprint: Fingerprint) -> Result<(), TlsError> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(peer.to_owned(), fingerprint);
        Ok(())
    }
}

/// Pins in a text file, one `host:port fingerprint` per line, rewritten
/// atomically (temporary file, fsync, rename) on every change.
#[derive(Debug)]
pub struct FilePins {
    path: PathBuf,
    pins: Mutex<BTreeMap<String, Fingerprint>>,
}

impl FilePins {
    /// Opens (or starts) the pin file at `path`.
    ///
    /// # Errors
    /// [`TlsError::PinStore`] when the file exists but cannot be read or has a bad line.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, TlsError> {
        let path = path.into();
        let err = |source| TlsError::PinStore { path: path.display().to_string(), source };
        let mut pins = BTreeMap::new();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                    let bad = || err(io::Error::new(io::ErrorKind::InvalidData, format!("line {}: bad pin", n + 1)));
                    let (peer, fp) = line.trim().split_once(' ').ok_or_else(bad)?;
                    pins.insert(peer.to_owned(), fp.parse().map_err(|_| bad())?);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        Ok(Self { path, pins: Mutex::new(pins) })
    }

    fn write(&self, pins: &BTreeMap<String, Fingerprint>) -> io::Result<()> {
        use std::io::Write as _;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::files::create_private_dir(dir)?;
        }
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        for (peer, fp) in pins {
            writeln!(f, "{peer} {fp}")?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }
}

impl PinStore for FilePins {
    fn get(&self, peer: &str) -> Result<Option<Fingerprint>, TlsError> {
        Ok(self.pins.lock().unwrap_or_else(|e| e.into_inner()).get(peer).copied())
    }

    fn set(&self, peer: &str, fingerprint: Fingerprint) -> Result<(), TlsError> {
        let mut pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        pins.insert(peer.to_owned(), fingerprint);
        self.write(&pins).map_err(|source| TlsError::PinStore { path: self.path.display().to_string(), source })
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Checks that `der` parses as X.509 and is valid at `now`.
fn check_certificate(der: &[u8], now: UnixTime) -> Result<(), CertificateError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| CertificateError::BadEncoding)?;
    let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    let validity = cert.validity();
    if now < validity.not_before.timestamp() {
        return Err(CertificateError::NotValidYet);
    }
    if now > validity.not_after.timestamp() {
        return Err(CertificateError::Expired);
    }
    Ok(())
}

/// What the client verifier saw, for turning a failed handshake into a clear error.
#[derive(Debug, Default, Clone)]
struct Seen {
    fingerprint: Option<Fingerprint>,
    validity: Option<CertificateError>,
}

/// The client's verifier: validity dates and the pin, then real signature checks.
#[derive(Debug)]
struct TofuServerVerifier {
    pinned: Option<Fingerprint>,
    seen: Mutex<Seen>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for TofuServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fingerprint = Fingerprint::of(end_entity);
        let validity = check_certificate(end_entity, now).err();
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) =
            Seen { fingerprint: Some(fingerprint), validity: validity.clone() };
        if let Some(e) = validity {
            return Err(rustls::Error::InvalidCertificate(e));
        }
        match self.pinned {
            Some(pinned) if pinned != fingerprint => {
                Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
            }
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The server's verifier: any well-formed, currently valid client certificate.
#[derive(Debug)]
struct AnyClientCertificate {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AnyClientCertificate {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        check_certificate(end_entity, now).map_err(rustls::Error::InvalidCertificate)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The rustls configuration of a LATSSIAM server presenting `identity`.
///
/// # Errors
/// [`TlsError::Config`] if rustls refuses the identity's key.
pub fn server_config(identity: &Identity) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(AnyClientCertificate { provider }))
        .with_single_cert(vec![identity.cert_der().clone()], identity.key_der().clone_key())?;
    Ok(Arc::new(config))
}

/// The client certificate of a server-side stream: `None` is "no certificate".
pub fn peer_certificate(stream: &ServerStream) -> Option<CertificateDer<'static>> {
    stream.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.clone().into_owned())
}

/// The server certificate of a client-side stream.
pub fn server_certificate(stream: &ClientStream) -> Option<CertificateDer<'static>> {
    stream.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.clone().into_owned())
}

/// Connects TLS over `tcp` to `host` (pinned under `host:port`), presenting
/// `identity` if given, and pins the server on first contact.
///
/// # Errors
/// [`TlsError::PinMismatch`] if another certificate is pinned,
/// [`TlsError::Expired`]/[`TlsError::NotYetValid`] for a certificate out of
/// its validity, [`TlsError::Handshake`] for other failures.
pub async fn connect(
    tcp: TcpStream,
    host: &str,
    port: u16,
    identity: Option<&Identity>,
    pins: &dyn PinStore,
) -> Result<ClientStream, TlsError> {
    let peer = format!("{host}:{port}");
    let pinned = pins.get(&peer)?;
    let provider = provider();
    let verifier = Arc::new(TofuServerVerifier { pinned, seen: Mutex::default(), provider: provider.clone() });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone());
    let config = match identity {
        Some(id) => builder.with_client_auth_cert(vec![id.cert_der().clone()], id.key_der().clone_key())?,
        None => builder.with_no_client_auth(),
    };
    let name = ServerName::try_from(host.to_owned()).map_err(|_| TlsError::BadServerName(host.to_owned()))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    match connector.connect(name, tcp).await {
        Ok(stream) => {
            if pinned.is_none() {
                if let Some(cert) = server_certificate(&stream) {
                    pins.set(&peer, Fingerprint::of(&cert))?;
                }
            }
            Ok(stream)
        }
        Err(source) => {
            let seen = verifier.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
            Err(match (seen.fingerprint, seen.validity, pinned) {
                (Some(fingerprint), Some(CertificateError::Expired), _) => TlsError::Expired { peer, fingerprint },
                (Some(fingerprint), Some(CertificateError::NotValidYet), _) => {
                    TlsError::NotYetValid { peer, fingerprint }
                }
                (Some(presented), None, Some(pinned)) if presented != pinned => {
                    TlsError::PinMismatch { peer, pinned, presented }
                }
                _ => TlsError::Handshake { peer, source },
            })
        }
    }
}
