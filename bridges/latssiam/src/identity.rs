//! Identities (an X.509 certificate and its private key), addresses and
//! LATSSIAM URLs (PROFILE.md section 6).
//!
//! An [`Identity`] holds its certificate DER and the key objects that sign
//! (ECDSA P-256 or RSA PKCS#1 v1.5) and decrypt (ECDH or RSA), built once at
//! load. Loading checks that the key belongs to the certificate.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::KeyPair as _;
use aws_lc_rs::{agreement, rsa, signature};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::fingerprint::Fingerprint;

const OID_UID: &str = "0.9.2342.19200300.100.1.1";

/// Why an identity, address or URL was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// Not `mailbox@host` with a valid mailbox and DNS host name.
    #[error("not a LATSSIAM address (mailbox@host): {0:?}")]
    BadAddress(String),
    /// Not `latssiam:<fingerprint>//host[:port]/path`.
    #[error("not a LATSSIAM URL: {0}")]
    BadUrl(&'static str),
    /// The certificate is not parseable X.509 DER.
    #[error("certificate does not parse: {0}")]
    BadCertificate(String),
    /// The PEM holds no usable certificate or key.
    #[error("{0}")]
    BadPem(String),
    /// The key is not a P-256 or RSA (2048+) key, or does not match the certificate.
    #[error("{0}")]
    BadKey(&'static str),
    /// Generating a key or certificate failed.
    #[error("could not generate identity: {0}")]
    Generate(String),
    /// Reading or writing the identity files failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        source: std::io::Error,
    },
}

/// A LATSSIAM address, `mailbox@host`: the host is a DNS name, kept in lower case.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address {
    mailbox: String,
    host: String,
}

impl Address {
    /// Builds an address from its parts.
    ///
    /// # Errors
    /// [`IdentityError::BadAddress`] if the mailbox is empty, longer than 64
    /// octets or holds characters outside RFC 5322 `atext` and `.`, or the
    /// host is not a DNS name.
    pub fn new(mailbox: &str, host: &str) -> Result<Self, IdentityError> {
        let bad = || IdentityError::BadAddress(format!("{mailbox}@{host}"));
        let mailbox_ok = !mailbox.is_empty()
            && mailbox.len() <= 64
            && mailbox.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~.".contains(&b));
        if !mailbox_ok || !is_dns_name(host) {
            return Err(bad());
        }
        Ok(Self { mailbox: mailbox.to_owned(), host: host.to_ascii_lowercase() })
    }

    /// The part before `@`.
    pub fn mailbox(&self) -> &str {
        &self.mailbox
    }

    /// The host, lower case.
    pub fn host(&self) -> &str {
        &self.host
    }
}

/// Whether `s` is a DNS host name: dot-separated labels of letters, digits and
/// inner hyphens, each 1-63 octets, 253 in all.
pub fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

impl FromStr for Address {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mailbox, host) = s.rsplit_once('@').ok_or_else(|| IdentityError::BadAddress(s.to_owned()))?;
        Self::new(mailbox, host)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.mailbox, self.host)
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({self})")
    }
}

/// What a certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// SHA-256 of the DER.
    pub fingerprint: Fingerprint,
    /// By the Misfin mapping: UID + SAN dNSName, else SAN rfc822Name.
    pub address: Option<Address>,
    /// The subject's CN.
    pub display_name: Option<String>,
    /// Start of validity, seconds since the Unix epoch.
    pub not_before: i64,
    /// End of validity, seconds since the Unix epoch.
    pub not_after: i64,
}

impl CertInfo {
    /// Reads a DER certificate.
    ///
    /// # Errors
    /// [`IdentityError::BadCertificate`] if it does not parse.
    pub fn from_der(der: &[u8]) -> Result<Self, IdentityError> {
        let (rest, cert) = X509Certificate::from_der(der).map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        if !rest.is_empty() {
            return Err(IdentityError::BadCertificate("trailing data".into()));
        }
        let subject_attr = |oid: &str| {
            cert.subject()
                .iter_attributes()
                .find(|a| a.attr_type().to_id_string() == oid)
                .and_then(|a| a.as_str().ok())
                .map(str::to_owned)
        };
        let uid = subject_attr(OID_UID);
        let display_name = cert.subject().iter_common_name().next().and_then(|a| a.as_str().ok()).map(str::to_owned);
        let mut dns = None;
        let mut email = None;
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) if dns.is_none() => dns = Some(*d),
                    GeneralName::RFC822Name(e) if email.is_none() => email = Some(*e),
                    _ => {}
                }
            }
        }
        let address = match (uid, dns) {
            (Some(uid), Some(host)) => Address::new(&uid, host).ok(),
            _ => None,
        }
        .or_else(|| email.and_then(|e| e.parse().ok()));
        let validity = cert.validity();
        Ok(Self {
            fingerprint: Fingerprint::of(der),
            address,
            display_name,
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
        })
    }
}

/// The kind of key an identity holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA / ECDH on P-256.
    P256,
    /// RSA, 2048 bits or more.
    Rsa,
}

pub(crate) enum Keys {
    P256 { sign: signature::EcdsaKeyPair, agree: agreement::PrivateKey },
    Rsa { sign: signature::RsaKeyPair, oaep: rsa::OaepPrivateDecryptingKey, pkcs1: rsa::Pkcs1PrivateDecryptingKey },
}

/// A certificate and its private key.
pub struct Identity {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    keys: Keys,
    info: CertInfo,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("info", &self.info).field("kind", &self.kind()).finish_non_exhaustive()
    }
}

impl Identity {
    /// Generates a new self-signed identity for `address`: UID = mailbox,
    /// SAN dNSName = host, SAN rfc822Name = address, CN = `name` (or the
    /// mailbox). P-256 unless `rsa`, which makes a 2048-bit RSA key.
    ///
    /// # Errors
    /// [`IdentityError::Generate`] if key or certificate generation fails.
    pub fn generate(address: &Address, name: Option<&str>, rsa: bool) -> Result<Self, IdentityError> {
        let g = |e: rcgen::Error| IdentityError::Generate(e.to_string());
        let key = if rsa {
            rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).map_err(g)?
        } else {
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(g)?
        };
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, name.unwrap_or(address.mailbox()));
        params
            .distinguished_name
            .push(rcgen::DnType::CustomDnType(vec![0, 9, 2342, 19_200_300, 100, 1, 1]), address.mailbox());
        params.subject_alt_names = vec![
            rcgen::SanType::DnsName(address.host().try_into().map_err(g)?),
            rcgen::SanType::Rfc822Name(address.to_string().try_into().map_err(g)?),
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(365 * 20);
        let cert = params.self_signed(&key).map_err(g)?;
        let key_der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        Self::from_der(cert.der().clone(), key_der)
    }

    /// Builds an identity from DER parts, checking that the key is P-256 or
    /// RSA and belongs to the certificate.
    ///
    /// # Errors
    /// [`IdentityError::BadCertificate`] or [`IdentityError::BadKey`].
    pub fn from_der(cert: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> Result<Self, IdentityError> {
        let info = CertInfo::from_der(&cert)?;
        let (_, parsed) = X509Certificate::from_der(&cert).map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let cert_public = parsed.public_key().subject_public_key.data.to_vec();
        let keys = load_keys(&key)?;
        let key_public: &[u8] = match &keys {
            Keys::P256 { sign, .. } => sign.public_key().as_ref(),
            Keys::Rsa { sign, .. } => sign.public_key().as_ref(),
        };
        if key_public != cert_public.as_slice() {
            return Err(IdentityError::BadKey("the private key does not belong to the certificate"));
        }
        Ok(Self { cert, key, keys, info })
    }

    /// Loads an identity from PEM text: one `CERTIFICATE` and one private key
    /// (`PRIVATE KEY`, `EC PRIVATE KEY` or `RSA PRIVATE KEY`).
    ///
    /// # Errors
    /// [`IdentityError::BadPem`] and the errors of [`Identity::from_der`].
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, IdentityError> {
        let cert = CertificateDer::from_pem_slice(cert_pem)
            .map_err(|e| IdentityError::BadPem(format!("no certificate in PEM: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| IdentityError::BadPem(format!("no private key in PEM: {e}")))?;
        Self::from_der(cert, key)
    }

    /// Loads `dir/cert.pem` and `dir/key.pem`.
    ///
    /// # Errors
    /// [`IdentityError::Io`] if a file cannot be read, and those of [`Identity::from_pem`].
    pub fn load(dir: &Path) -> Result<Self, IdentityError> {
        let cert = read(&dir.join("cert.pem"))?;
        let key = read(&dir.join("key.pem"))?;
        Self::from_pem(&cert, &key)
    }

    /// Writes `dir/cert.pem` and `dir/key.pem` (the key with mode 0600),
    /// creating `dir`. Refuses to overwrite an existing key.
    ///
    /// # Errors
    /// [`IdentityError::Io`] if a file cannot be written or already exists.
    pub fn save(&self, dir: &Path) -> Result<(), IdentityError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| IdentityError::Io { path, source }
        };
        crate::files::create_private_dir(dir).map_err(io(dir))?;
        // An identity is there once its certificate is: refuse to replace one.
        // A key without a certificate is what a crash between the two writes
        // leaves; it is replaced.
        let cert_path = dir.join("cert.pem");
        if cert_path.exists() {
            return Err(IdentityError::Io {
                path: cert_path.display().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "an identity is already there"),
            });
        }
        let key_path = dir.join("key.pem");
        crate::files::write_atomic(&key_path, self.key_pem().as_bytes(), 0o600).map_err(io(&key_path))?;
        crate::files::write_atomic(&cert_path, self.cert_pem().as_bytes(), 0o644).map_err(io(&cert_path))?;
        Ok(())
    }

    /// The certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The private key, DER.
    pub fn key_der(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// The certificate, PEM.
    pub fn cert_pem(&self) -> String {
        pem("CERTIFICATE", &self.cert)
    }

    /// The private key, PEM (PKCS#8 where it was generated here).
    pub fn key_pem(&self) -> String {
        match &self.key {
            PrivateKeyDer::Pkcs1(k) => pem("RSA PRIVATE KEY", k.secret_pkcs1_der()),
            PrivateKeyDer::Sec1(k) => pem("EC PRIVATE KEY", k.secret_sec1_der()),
            other => pem("PRIVATE KEY", other.secret_der()),
        }
    }

    /// What the certificate says.
    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// The certificate fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.info.fingerprint
    }

    /// The address, when the certificate names one.
    pub fn address(&self) -> Option<&Address> {
        self.info.address.as_ref()
    }

    /// P-256 or RSA.
    pub fn kind(&self) -> KeyKind {
        match self.keys {
            Keys::P256 { .. } => KeyKind::P256,
            Keys::Rsa { .. } => KeyKind::Rsa,
        }
    }

    pub(crate) fn keys(&self) -> &Keys {
        &self.keys
    }
}

fn read(path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|source| IdentityError::Io { path: path.display().to_string(), source })
}

fn load_keys(key: &PrivateKeyDer<'_>) -> Result<Keys, IdentityError> {
    let der = key.secret_der();
    if let Ok(sign) = signature::EcdsaKeyPair::from_private_key_der(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, der) {
        let agree = agreement::PrivateKey::from_private_key_der(&agreement::ECDH_P256, der)
            .map_err(|_| IdentityError::BadKey("P-256 key not usable for ECDH"))?;
        return Ok(Keys::P256 { sign, agree });
    }
    let sign = match key {
        PrivateKeyDer::Pkcs1(k) => signature::RsaKeyPair::from_der(k.secret_pkcs1_der()),
        PrivateKeyDer::Pkcs8(k) => signature::RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
        _ => return Err(IdentityError::BadKey("the key is neither P-256 nor RSA")),
    }
    .map_err(|_| IdentityError::BadKey("the key is neither P-256 nor RSA (2048 bits or more)"))?;
    let pkcs8 = sign.as_der().map_err(|_| IdentityError::BadKey("RSA key cannot be re-encoded"))?;
    let decrypting = || {
        rsa::PrivateDecryptingKey::from_pkcs8(pkcs8.as_ref())
            .map_err(|_| IdentityError::BadKey("RSA key not usable for decryption"))
    };
    let oaep = rsa::OaepPrivateDecryptingKey::new(decrypting()?)
        .map_err(|_| IdentityError::BadKey("RSA key not usable for OAEP"))?;
    let pkcs1 = rsa::Pkcs1PrivateDecryptingKey::new(decrypting()?)
        .map_err(|_| IdentityError::BadKey("RSA key not usable for PKCS#1 v1.5"))?;
    if oaep.key_size_bits() < 2048 {
        return Err(IdentityError::BadKey("RSA keys must have at least 2048 bits"));
    }
    Ok(Keys::Rsa { sign, oaep, pkcs1 })
}

/// PEM armour with 64-character lines and LF line ends.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // base64 output is ASCII.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// Reads the first `CERTIFICATE` in PEM text, or takes the bytes as DER when
/// they do not look like PEM.
///
/// # Errors
/// [`IdentityError::BadPem`] when PEM text holds no certificate.
pub fn certificate_from_pem_or_der(bytes: &[u8]) -> Result<CertificateDer<'static>, IdentityError> {
    if bytes.starts_with(b"-----") || bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        CertificateDer::from_pem_slice(bytes).map_err(|e| IdentityError::BadPem(format!("no certificate in PEM: {e}")))
    } else {
        Ok(CertificateDer::from(bytes.to_vec()))
    }
}

/// `latssiam:<fingerprint>//<host>[:port]/<path>`: a certificate fingerprint
/// and the gemini URL (scheme omitted) where the certificate can be fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatssiamUrl {
    /// The certificate's fingerprint.
    pub fingerprint: Fingerprint,
    /// Host of the gemini URL, lower case.
    pub host: String,
    /// Port of the gemini URL, if not the default.
    pub port: Option<u16>,
    /// Path of the gemini URL, without its leading `/`, lower case.
    pub path: String,
}

impl LatssiamUrl {
    /// The default URL of an identity: `//host/.well-known/latssiam/<mailbox>.pem`.
    pub fn for_certificate(info: &CertInfo) -> Option<Self> {
        let address = info.address.as_ref()?;
        Some(Self {
            fingerprint: info.fingerprint,
            host: address.host().to_owned(),
            port: None,
            path: format!(".well-known/latssiam/{}.pem", address.mailbox().to_ascii_lowercase()),
        })
    }
}

impl fmt::Display for LatssiamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "latssiam:{}//{}", self.fingerprint, self.host)?;
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        write!(f, "/{}", self.path)
    }
}

impl FromStr for LatssiamUrl {
    type Err = IdentityError;

    /// Parses a URL, lower-casing it first (a QR code's text "must all be
    /// converted to lower case").
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        let rest = s.strip_prefix("latssiam:").ok_or(IdentityError::BadUrl("must start with latssiam:"))?;
        let (fp, rest) = rest.split_at_checked(64).ok_or(IdentityError::BadUrl("fingerprint too short"))?;
        let fingerprint = fp.parse().map_err(|_| IdentityError::BadUrl("bad fingerprint"))?;
        let rest = rest.strip_prefix("//").ok_or(IdentityError::BadUrl("expected // after the fingerprint"))?;
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p.parse::<u16>().map_err(|_| IdentityError::BadUrl("bad port"))?)),
            None => (authority, None),
        };
        if !is_dns_name(host) {
            return Err(IdentityError::BadUrl("bad host"));
        }
        if path.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(IdentityError::BadUrl("bad path"));
        }
        Ok(Self { fingerprint, host: host.to_owned(), port, path: path.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_reject() {
        let a: Address = "alice@Example.ORG".parse().unwrap();
        assert_eq!(a.mailbox(), "alice");
        assert_eq!(a.host(), "example.org");
        for bad in ["alice", "@example.org", "alice@", "al ice@example.org", "alice@exa_mple.org", "a@-x.org"] {
            assert!(bad.parse::<Address>().is_err(), "{bad}");
        }
    }

    #[test]
    fn generated_identity_maps_to_its_address() {
        let a: Address = "bob@example.org".parse().unwrap();
        let id = Identity::generate(&a, Some("Bob B."), false).unwrap();
        assert_eq!(id.address(), Some(&a));
        assert_eq!(id.info().display_name.as_deref(), Some("Bob B."));
        assert_eq!(id.kind(), KeyKind::P256);
        let again = Identity::from_pem(id.cert_pem().as_bytes(), id.key_pem().as_bytes()).unwrap();
        assert_eq!(again.fingerprint(), id.fingerprint());
    }

    #[test]
    fn a_key_from_another_certificate_is_refused() {
        let a: Address = "bob@example.org".parse().unwrap();
        let one = Identity::generate(&a, None, false).unwrap();
        let two = Identity::generate(&a, None, false).unwrap();
        let err = Identity::from_pem(one.cert_pem().as_bytes(), two.key_pem().as_bytes()).unwrap_err();
        assert!(matches!(err, IdentityError::BadKey(_)), "{err}");
    }

    #[test]
    fn urls_round_trip_and_lower_case() {
        let a: Address = "Carol@example.org".parse().unwrap();
        let id = Identity::generate(&a, None, false).unwrap();
        let url = LatssiamUrl::for_certificate(id.info()).unwrap();
        let text = url.to_string();
        assert!(text.starts_with(&format!("latssiam:{}//example.org/", id.fingerprint())));
        assert_eq!(text, text.to_ascii_lowercase());
        assert_eq!(text.parse::<LatssiamUrl>().unwrap(), url);
        assert_eq!(text.to_ascii_uppercase().parse::<LatssiamUrl>().unwrap(), url);
        let with_port: LatssiamUrl = format!("latssiam:{}//h.example:1965/x", id.fingerprint()).parse().unwrap();
        assert_eq!(with_port.port, Some(1965));
        assert!("latssiam:abc//h/x".parse::<LatssiamUrl>().is_err());
        assert!(format!("latssiam:{}h/x", id.fingerprint()).parse::<LatssiamUrl>().is_err());
    }
}
