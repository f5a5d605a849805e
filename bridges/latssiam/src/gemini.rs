//! Gemini (gemini://geminiprotocol.net), as far as LATSSIAM URLs need it:
//! a capsule serving certificates and a client fetching them
//! (PROFILE.md section 6).
//!
//! - [`parse_request`]: a request line to a [`Request`], with no I/O. Only
//!   `gemini://host[:port]/path` is accepted, the path normalised: escapes of
//!   unreserved characters decoded, other escapes upper-cased, dot segments
//!   and escaped control characters refused.
//! - [`serve`]: the capsule. One request per TLS connection, answered `20`
//!   with the PEM of the certificate a [`Lookup`] names, `51` or `59`, then
//!   close_notify. Connections beyond [`Limits`] are closed before the TLS
//!   handshake; a slow client is cut off by the timeouts.
//! - [`fetch`] and [`fetch_certificate`]: the client, pinning capsules Trust On
//!   First Use through [`crate::tls::connect`], and accepting a certificate
//!   only if its fingerprint is the one the LATSSIAM URL names.
//!
//! Request paths are logged at `debug` only.

use std::io;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::{PemObject, SectionKind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::fingerprint::Fingerprint;
use crate::identity::{is_dns_name, IdentityError, LatssiamUrl};
use crate::tls::{PinStore, TlsError};
use crate::Identity;

/// The default Gemini port.
pub const PORT: u16 = 1965;
/// The longest request URL, in octets, before its CRLF.
pub const MAX_URL: usize = 1024;
/// The most a server reads of a request: the URL and its CRLF.
pub const MAX_REQUEST: usize = MAX_URL + 2;
/// The longest response meta, in octets.
pub const MAX_META: usize = 1024;
/// The longest response header: status, space, meta, CRLF.
pub const MAX_HEADER: usize = 2 + 1 + MAX_META + 2;
/// The largest body [`fetch`] accepts.
pub const MAX_BODY: usize = 64 * 1024;

const SUCCESS_PEM: &[u8] = b"20 application/x-pem-file\r\n";
/// The header of a plain-text document.
const SUCCESS_TEXT: &[u8] = b"20 text/plain; charset=utf-8\r\n";
const NOT_FOUND: &[u8] = b"51 Not found\r\n";
const BAD_REQUEST: &[u8] = b"59 Bad request\r\n";
/// Slow down: the meta is the seconds to wait (Gemini section 3.2.4).
const SLOW_DOWN: &[u8] = b"44 60\r\n";

// --- requests ---------------------------------------------------------------

/// A parsed request: `gemini://host[:port]/path`.
///
/// The host is a lower-case DNS name (or `[v6]` literal), the path starts
/// with `/`, holds only RFC 3986 path characters and upper-case escapes of
/// reserved characters, and has no `.` or `..` segment. Its canonical form
/// `gemini://{host}:{port}{path}` is at most [`MAX_URL`] octets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    host: String,
    port: u16,
    path: String,
}

impl Request {
    /// The host, lower case; an IPv6 literal keeps its brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port, [`PORT`] when the URL names none.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The normalised path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The host as TLS and DNS want it: an IPv6 literal without brackets.
    fn bare_host(&self) -> &str {
        self.host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(&self.host)
    }
}

/// Why a request line was refused. Every one is answered with status `59`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// More than 1024 octets before the CRLF (or in the canonical form).
    #[error("request longer than 1024 octets")]
    TooLong,
    /// The input ends before a CRLF.
    #[error("request without CRLF")]
    NoCrlf,
    /// A line feed without a carriage return before it.
    #[error("request ends with a bare LF")]
    BareLf,
    /// Bytes after the CRLF.
    #[error("data after the request's CRLF")]
    TrailingData,
    /// The URL is not UTF-8.
    #[error("request is not UTF-8")]
    NotUtf8,
    /// Not an absolute URL.
    #[error("not an absolute URL")]
    Relative,
    /// A scheme other than `gemini`.
    #[error("not a gemini: URL")]
    OtherScheme,
    /// No `//host`, or an empty host.
    #[error("URL without a host")]
    NoHost,
    /// The host is not a DNS name or bracketed IPv6 address.
    #[error("bad host")]
    BadHost,
    /// `user@` before the host.
    #[error("URL with userinfo")]
    Userinfo,
    /// The port is not a number from 1 to 65535.
    #[error("bad port")]
    BadPort,
    /// A `#fragment`.
    #[error("URL with a fragment")]
    Fragment,
    /// A `?query`.
    #[error("URL with a query")]
    Query,
    /// A character that has no place in a path.
    #[error("bad character in the path")]
    BadPath,
    /// `%` not followed by two hex digits.
    #[error("bad percent-encoding in the path")]
    BadPercent,
    /// An escape of a control character (NUL, CR, LF, ...).
    #[error("escaped control character in the path")]
    EscapedControl,
    /// A `.` or `..` segment, written or escaped.
    #[error("dot segment in the path")]
    DotSegment,
}

impl RequestError {
    /// The Gemini status to answer: always `59`, bad request.
    pub const fn status(&self) -> u8 {
        59
    }
}

/// Parses a request: `bytes` is what was read up to and including the first
/// CRLF, or what was read when the limit was hit.
///
/// # Errors
/// A [`RequestError`] for anything but a well-formed `gemini://` URL of at
/// most 1024 octets followed by CRLF and nothing else.
pub fn parse_request(bytes: &[u8]) -> Result<Request, RequestError> {
    let line = match bytes.iter().position(|&b| b == b'\n') {
        Some(lf) => {
            if lf + 1 != bytes.len() {
                return Err(RequestError::TrailingData);
            }
            let line = bytes[..lf].strip_suffix(b"\r").ok_or(RequestError::BareLf)?;
            if line.len() > MAX_URL {
                return Err(RequestError::TooLong);
            }
            line
        }
        // A CR at the end may be the start of the CRLF.
        None if bytes.strip_suffix(b"\r").unwrap_or(bytes).len() > MAX_URL => return Err(RequestError::TooLong),
        None => return Err(RequestError::NoCrlf),
    };
    let url = std::str::from_utf8(line).map_err(|_| RequestError::NotUtf8)?;
    parse_url(url)
}

fn parse_url(url: &str) -> Result<Request, RequestError> {
    let (scheme, rest) = match url.split_once(':') {
        Some((scheme, rest)) if is_scheme(scheme) => (scheme, rest),
        _ => return Err(RequestError::Relative),
    };
    if !scheme.eq_ignore_ascii_case("gemini") {
        return Err(RequestError::OtherScheme);
    }
    let rest = rest.strip_prefix("//").ok_or(RequestError::NoHost)?;
    if rest.contains('#') {
        return Err(RequestError::Fragment);
    }
    let (authority, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    if path.contains('?') {
        return Err(RequestError::Query);
    }
    if authority.contains('@') {
        return Err(RequestError::Userinfo);
    }
    let (host, port) = parse_authority(authority)?;
    let path = normalise_path(path)?;
    if "gemini://".len() + host.len() + 1 + port_digits(port) + path.len() > MAX_URL {
        return Err(RequestError::TooLong);
    }
    Ok(Request { host, port, path })
}

/// RFC 3986: `ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )`.
fn is_scheme(s: &str) -> bool {
    s.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
}

fn parse_authority(authority: &str) -> Result<(String, u16), RequestError> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (addr, after) = v6.split_once(']').ok_or(RequestError::BadHost)?;
        let addr: Ipv6Addr = addr.parse().map_err(|_| RequestError::BadHost)?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or(RequestError::BadHost)?),
        };
        (format!("[{addr}]"), port)
    } else {
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        if host.is_empty() {
            return Err(RequestError::NoHost);
        }
        if !is_dns_name(host) {
            return Err(RequestError::BadHost);
        }
        (host.to_ascii_lowercase(), port)
    };
    let port = match port {
        None | Some("") => PORT,
        Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err(RequestError::BadPort),
            Ok(n) => n,
        },
        Some(_) => return Err(RequestError::BadPort),
    };
    Ok((host, port))
}

fn port_digits(port: u16) -> usize {
    match port {
        0..=9 => 1,
        10..=99 => 2,
        100..=999 => 3,
        1000..=9999 => 4,
        _ => 5,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~".contains(&b)
}

/// RFC 3986 `pchar` without `pct-encoded`, plus `/`.
fn is_path_char(b: u8) -> bool {
    is_unreserved(b) || b"!$&'()*+,;=:@/".contains(&b)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn normalise_path(path: &str) -> Result<String, RequestError> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(bytes.len().max(1));
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let digits = bytes.get(i + 1..i + 3).ok_or(RequestError::BadPercent)?;
            let (Some(hi), Some(lo)) = (hex_value(digits[0]), hex_value(digits[1])) else {
                return Err(RequestError::BadPercent);
            };
            let v = hi << 4 | lo;
            if v < 0x20 || v == 0x7f {
                return Err(RequestError::EscapedControl);
            }
            if is_unreserved(v) {
                out.push(char::from(v));
            } else {
                out.push('%');
                out.push(char::from(HEX[usize::from(hi)]));
                out.push(char::from(HEX[usize::from(lo)]));
            }
            i += 3;
        } else if is_path_char(b) {
            out.push(char::from(b));
            i += 1;
        } else {
            return Err(RequestError::BadPath);
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    if out.split('/').any(|s| s == "." || s == "..") {
        return Err(RequestError::DotSegment);
    }
    Ok(out)
}

// --- the capsule ------------------------------------------------------------

/// What the capsule serves: the DER certificate for a host and path.
pub trait Lookup: Send + Sync + 'static {
    /// The certificate to serve at `host` (lower case) and `path`
    /// (normalised, starting with `/`), or `None` for `51`: no such mailbox,
    /// or one deregistered or moved. Called on the async runtime: keep it quick.
    fn certificate(&self, host: &str, path: &str) -> Option<Vec<u8>>;

    /// A plain-text document to serve at `host` and `path` instead, as
    /// `20 text/plain; charset=utf-8` (none by default).
    fn text(&self, _host: &str, _path: &str) -> Option<String> {
        None
    }
}

/// The capsule's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// For the TLS handshake and the request line together.
    pub request_timeout: Duration,
    /// For writing the response and close_notify.
    pub write_timeout: Duration,
    /// Connections at once; more are closed before the TLS handshake.
    pub max_connections: usize,
    /// Connections at once per client (IPv4 address, IPv6 /64); more are
    /// closed before the TLS handshake. `0` is no limit.
    pub max_per_client: usize,
    /// Requests per client and minute (four times as many per IPv6 /48);
    /// beyond them `44 60` (slow down): the capsule answers "is there such a
    /// mailbox?", which must not be asked thousands of times a second. `0` is
    /// no limit.
    pub requests_per_minute: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_connections: 256,
            max_per_client: 16,
            requests_per_minute: 60,
        }
    }
}

/// The rustls configuration of a capsule presenting `identity`: TLS 1.2 and
/// 1.3, no client certificate asked for, no ALPN.
///
/// # Errors
/// [`TlsError::Config`] if rustls refuses the identity's key.
pub fn server_tls(identity: &Identity) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![identity.cert_der().clone()], identity.key_der().clone_key())?;
    Ok(Arc::new(config))
}

/// Serves certificates on `listener` until `shutdown` is cancelled, then
/// waits for the connections in flight (each ends within
/// `request_timeout + write_timeout`).
pub async fn serve<L: Lookup>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    lookup: Arc<L>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let clients = Arc::new(crate::limits::PerClient::default());
    let requests = Arc::new(crate::limits::Lookups::new(limits.requests_per_minute));
    let refusals = crate::limits::LogThrottle::default();
    let tracker = TaskTracker::new();
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(10);
                a
            }
            Err(e) => {
                warn!(error = %e, "Gemini accept failed; backing off.");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            if let Some(more) = refusals.admit() {
                info!(%peer, max = limits.max_connections, also_refused = more, "Too many Gemini connections; closed.");
            }
            continue;
        };
        let Some(slot) = clients.admit(peer.ip(), limits.max_per_client) else {
            if let Some(more) = refusals.admit() {
                info!(%peer, max = limits.max_per_client, also_refused = more, "Too many Gemini connections from this address or its site; closed.");
            }
            continue;
        };
        let acceptor = acceptor.clone();
        let (lookup, requests) = (Arc::clone(&lookup), Arc::clone(&requests));
        tracker.spawn(async move {
            let _permit = permit;
            let _slot = slot;
            connection(acceptor, tcp, peer, (&*lookup, &requests), limits).await;
        });
    }
    drop(listener);
    tracker.close();
    debug!(connections = tracker.len(), "Gemini capsule stopping; waiting for connections.");
    tracker.wait().await;
}

#[tracing::instrument(level = "debug", skip_all, fields(%peer))]
async fn connection<L: Lookup>(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    (lookup, requests): (&L, &crate::limits::Lookups),
    limits: Limits,
) {
    let _ = tcp.set_nodelay(true);
    let received = tokio::time::timeout(limits.request_timeout, async {
        let mut stream = acceptor.accept(tcp).await?;
        let request = read_request(&mut stream).await?;
        Ok::<_, io::Error>((stream, request))
    })
    .await;
    let (mut stream, request) = match received {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            debug!(error = %e, "Gemini handshake or read failed.");
            return;
        }
        Err(_) => {
            debug!("No Gemini request in time; closed.");
            return;
        }
    };
    let response = match parse_request(&request) {
        Ok(_) if !requests.allow(peer.ip()) => {
            debug!("Too many Gemini requests from this client; slow down.");
            SLOW_DOWN.to_vec()
        }
        Ok(req) => match lookup.text(req.host(), req.path()) {
            Some(text) => {
                debug!(host = req.host(), "Text served.");
                let mut r = SUCCESS_TEXT.to_vec();
                r.extend_from_slice(text.as_bytes());
                r
            }
            None => match lookup.certificate(req.host(), req.path()) {
                Some(der) => {
                    debug!(host = req.host(), path = req.path(), "Certificate served.");
                    let mut r = SUCCESS_PEM.to_vec();
                    r.extend_from_slice(crate::identity::pem("CERTIFICATE", &der).as_bytes());
                    r
                }
                None => {
                    debug!(host = req.host(), path = req.path(), "Not found.");
                    NOT_FOUND.to_vec()
                }
            },
        },
        Err(e) => {
            debug!(error = %e, "Bad Gemini request.");
            BAD_REQUEST.to_vec()
        }
    };
    let written = tokio::time::timeout(limits.write_timeout, async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    })
    .await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "Gemini response not delivered."),
        Err(_) => debug!("Gemini response timed out."),
    }
}

/// Reads up to the first LF, or until no valid request can follow: EOF, the
/// 1025th octet not a CR, or [`MAX_REQUEST`] octets.
async fn read_request<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    while len < MAX_REQUEST {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            break;
        }
        if let Some(lf) = buf[len..len + n].iter().position(|&b| b == b'\n') {
            len += lf + 1;
            break;
        }
        len += n;
        if len > MAX_URL && buf[MAX_URL] != b'\r' {
            break;
        }
    }
    buf.truncate(len);
    Ok(buf)
}

// --- the client -------------------------------------------------------------

/// A Gemini response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The two-digit status, 10 to 69.
    pub status: u8,
    /// The meta after the status (the MIME type for `20`), possibly empty.
    pub meta: String,
    /// The body of a `2x`; empty for other statuses.
    pub body: Vec<u8>,
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The URL is not one [`parse_request`] accepts.
    #[error("not a usable gemini URL: {0}")]
    BadUrl(#[from] RequestError),
    /// The LATSSIAM URL does not parse.
    #[error(transparent)]
    BadLatssiamUrl(#[from] IdentityError),
    /// The host has no address.
    #[error("cannot resolve {host}: {reason}")]
    Resolve {
        /// The host.
        host: String,
        /// What went wrong.
        reason: String,
    },
    /// No address of the host could be reached.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The last address tried.
        addr: SocketAddr,
        /// What went wrong.
        source: io::Error,
    },
    /// TLS or TOFU refused the capsule.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Reading or writing the stream failed.
    #[error("gemini stream: {0}")]
    Io(io::Error),
    /// The stream ended without close_notify, so the body may be cut short.
    #[error("the capsule closed the connection without close_notify")]
    Truncated,
    /// The exchange did not finish in time.
    #[error("no complete gemini answer in time")]
    Timeout,
    /// The response header is not `<status> <meta>\r\n`.
    #[error("bad gemini response header: {0}")]
    BadHeader(&'static str),
    /// The body is larger than [`MAX_BODY`].
    #[error("gemini body larger than {MAX_BODY} octets")]
    BodyTooLong,
    /// Another status than `20` where a certificate was expected.
    #[error("the capsule answered {status} {meta}")]
    Status {
        /// The status.
        status: u8,
        /// Its meta.
        meta: String,
    },
    /// The body is not exactly one PEM certificate.
    #[error("not one PEM certificate: {0}")]
    BadCertificate(String),
    /// The certificate served is not the one the LATSSIAM URL names.
    #[error("the capsule served certificate {got}, but the LATSSIAM URL names {expected}; refusing it")]
    FingerprintMismatch {
        /// The URL's fingerprint.
        expected: Fingerprint,
        /// The fingerprint of what was served.
        got: Fingerprint,
    },
}

/// Fetches `url` (`gemini://host[:port]/path`), resolving its host, pinning
/// the capsule's certificate under `host:port` in `pins`; everything within
/// `timeout`.
///
/// # Errors
/// A [`FetchError`]; statuses are answers, not errors.
pub async fn fetch(url: &str, pins: &dyn PinStore, timeout: Duration) -> Result<Response, FetchError> {
    let req = parse_fetch_url(url)?;
    tokio::time::timeout(timeout, async {
        let host = req.bare_host();
        let addrs = tokio::net::lookup_host((host, req.port()))
            .await
            .map_err(|e| FetchError::Resolve { host: host.to_owned(), reason: e.to_string() })?;
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(tcp) => return exchange(tcp, &req, url, pins).await,
                Err(source) => last = Some(FetchError::Connect { addr, source }),
            }
        }
        Err(last.unwrap_or_else(|| FetchError::Resolve { host: host.to_owned(), reason: "no address".into() }))
    })
    .await
    .map_err(|_| FetchError::Timeout)?
}

/// [`fetch`] from `addr` instead of the URL's host's addresses; TLS and pins
/// still use the URL's `host:port`.
///
/// # Errors
/// As [`fetch`].
pub async fn fetch_at(
    addr: SocketAddr,
    url: &str,
    pins: &dyn PinStore,
    timeout: Duration,
) -> Result<Response, FetchError> {
    let req = parse_fetch_url(url)?;
    tokio::time::timeout(timeout, async {
        let tcp = TcpStream::connect(addr).await.map_err(|source| FetchError::Connect { addr, source })?;
        exchange(tcp, &req, url, pins).await
    })
    .await
    .map_err(|_| FetchError::Timeout)?
}

/// Fetches the certificate a LATSSIAM URL names, from `gemini:` + its
/// `//host[:port]/path`, and returns its DER: only if the capsule answers
/// `20` with exactly one PEM certificate whose fingerprint is the URL's.
///
/// # Errors
/// [`FetchError::FingerprintMismatch`] naming both fingerprints,
/// [`FetchError::Status`] for another status, [`FetchError::BadCertificate`],
/// and those of [`fetch`].
pub async fn fetch_certificate(
    latssiam_url: &str,
    pins: &dyn PinStore,
    timeout: Duration,
) -> Result<Vec<u8>, FetchError> {
    let (url, expected) = gemini_url(latssiam_url)?;
    certificate_of(fetch(&url, pins, timeout).await?, expected)
}

/// [`fetch_certificate`] from `addr` instead of the URL's host's addresses.
///
/// # Errors
/// As [`fetch_certificate`].
pub async fn fetch_certificate_at(
    addr: SocketAddr,
    latssiam_url: &str,
    pins: &dyn PinStore,
    timeout: Duration,
) -> Result<Vec<u8>, FetchError> {
    let (url, expected) = gemini_url(latssiam_url)?;
    certificate_of(fetch_at(addr, &url, pins, timeout).await?, expected)
}

fn gemini_url(latssiam_url: &str) -> Result<(String, Fingerprint), FetchError> {
    let parsed: LatssiamUrl = latssiam_url.parse()?;
    let port = parsed.port.map(|p| format!(":{p}")).unwrap_or_default();
    Ok((format!("gemini://{}{port}/{}", parsed.host, parsed.path), parsed.fingerprint))
}

fn certificate_of(response: Response, expected: Fingerprint) -> Result<Vec<u8>, FetchError> {
    if response.status != 20 {
        return Err(FetchError::Status { status: response.status, meta: response.meta });
    }
    let der = single_certificate(&response.body)?;
    let got = Fingerprint::of(&der);
    if got != expected {
        return Err(FetchError::FingerprintMismatch { expected, got });
    }
    Ok(der)
}

/// The one `CERTIFICATE` of a PEM body; any other section is refused.
fn single_certificate(body: &[u8]) -> Result<Vec<u8>, FetchError> {
    let mut found = None;
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(body) {
        match section {
            Ok((SectionKind::Certificate, der)) if found.is_none() => found = Some(der),
            Ok((SectionKind::Certificate, _)) => return Err(FetchError::BadCertificate("more than one".into())),
            Ok((kind, _)) => return Err(FetchError::BadCertificate(format!("a {kind:?} section"))),
            Err(e) => return Err(FetchError::BadCertificate(e.to_string())),
        }
    }
    found.ok_or_else(|| FetchError::BadCertificate("no certificate".into()))
}

fn parse_fetch_url(url: &str) -> Result<Request, RequestError> {
    let mut line = Vec::with_capacity(url.len() + 2);
    line.extend_from_slice(url.as_bytes());
    line.extend_from_slice(b"\r\n");
    parse_request(&line)
}

fn io_error(e: io::Error) -> FetchError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        FetchError::Truncated
    } else {
        FetchError::Io(e)
    }
}

/// TLS (TOFU), the request, the header and, for `2x`, the body.
async fn exchange(tcp: TcpStream, req: &Request, url: &str, pins: &dyn PinStore) -> Result<Response, FetchError> {
    let _ = tcp.set_nodelay(true);
    let mut stream = crate::tls::connect(tcp, req.bare_host(), req.port(), None, pins).await?;
    let mut line = Vec::with_capacity(url.len() + 2);
    line.extend_from_slice(url.as_bytes());
    line.extend_from_slice(b"\r\n");
    stream.write_all(&line).await.map_err(FetchError::Io)?;
    stream.flush().await.map_err(FetchError::Io)?;

    let mut buf = vec![0u8; MAX_HEADER];
    let mut len = 0;
    let header_end = loop {
        if len == MAX_HEADER {
            return Err(FetchError::BadHeader("longer than 1029 octets"));
        }
        let n = stream.read(&mut buf[len..]).await.map_err(io_error)?;
        if n == 0 {
            return Err(FetchError::BadHeader("the stream ended inside it"));
        }
        if let Some(lf) = buf[len..len + n].iter().position(|&b| b == b'\n') {
            len += n;
            break len - n + lf + 1;
        }
        len += n;
    };
    let (status, meta) = parse_header(&buf[..header_end])?;
    let mut body = Vec::new();
    if (20..30).contains(&status) {
        body.extend_from_slice(&buf[header_end..len]);
        let cap = u64::try_from(MAX_BODY + 1).unwrap_or(u64::MAX);
        let limit = cap.saturating_sub(u64::try_from(body.len()).unwrap_or(u64::MAX));
        (&mut stream).take(limit).read_to_end(&mut body).await.map_err(io_error)?;
        if body.len() > MAX_BODY {
            return Err(FetchError::BodyTooLong);
        }
    }
    Ok(Response { status, meta, body })
}

/// `<2 digits>[ <meta>]\r\n`, the meta UTF-8 without control characters.
fn parse_header(header: &[u8]) -> Result<(u8, String), FetchError> {
    let line = header.strip_suffix(b"\r\n").ok_or(FetchError::BadHeader("no CRLF"))?;
    let (digits, meta) = match line {
        [a @ b'1'..=b'6', b @ b'0'..=b'9'] => ([*a, *b], &[][..]),
        [a @ b'1'..=b'6', b @ b'0'..=b'9', b' ', meta @ ..] => ([*a, *b], meta),
        _ => return Err(FetchError::BadHeader("no two-digit status")),
    };
    if meta.len() > MAX_META {
        return Err(FetchError::BadHeader("meta longer than 1024 octets"));
    }
    let meta = std::str::from_utf8(meta).map_err(|_| FetchError::BadHeader("meta not UTF-8"))?;
    if meta.chars().any(char::is_control) {
        return Err(FetchError::BadHeader("control character in meta"));
    }
    Ok(((digits[0] - b'0') * 10 + (digits[1] - b'0'), meta.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::tls::MemoryPins;
    use crate::Address;

    fn req(s: &str) -> Result<Request, RequestError> {
        parse_request(s.as_bytes())
    }

    #[test]
    fn good_urls_parse() {
        let r = req("gemini://Example.ORG/x\r\n").unwrap();
        assert_eq!((r.host(), r.port(), r.path()), ("example.org", PORT, "/x"));
        let r = req("GEMINI://h.example:1966/a/b\r\n").unwrap();
        assert_eq!((r.host(), r.port(), r.path()), ("h.example", 1966, "/a/b"));
        let r = req("gemini://h.example\r\n").unwrap();
        assert_eq!(r.path(), "/");
        let r = req("gemini://h.example:/x\r\n").unwrap();
        assert_eq!(r.port(), PORT);
        let r = req("gemini://[0:0::1]:7/x\r\n").unwrap();
        assert_eq!((r.host(), r.bare_host(), r.port()), ("[::1]", "::1", 7));
        let r = req("gemini://127.0.0.1:1965/.well-known/latssiam/alice.pem\r\n").unwrap();
        assert_eq!(r.host(), "127.0.0.1");
    }

    #[test]
    fn paths_are_percent_decoded_for_unreserved_characters_only() {
        let r = req("gemini://h/%7Euser/%41b%2fc%20d\r\n").unwrap();
        assert_eq!(r.path(), "/~user/Ab%2Fc%20d");
        for (bad, err) in [
            ("gemini://h/a/../b\r\n", RequestError::DotSegment),
            ("gemini://h/a/..\r\n", RequestError::DotSegment),
            ("gemini://h/%2e%2E/b\r\n", RequestError::DotSegment),
            ("gemini://h/.%2e\r\n", RequestError::DotSegment),
            ("gemini://h/./b\r\n", RequestError::DotSegment),
            ("gemini://h/a%00\r\n", RequestError::EscapedControl),
            ("gemini://h/a%0d\r\n", RequestError::EscapedControl),
            ("gemini://h/a%0A\r\n", RequestError::EscapedControl),
            ("gemini://h/a%4\r\n", RequestError::BadPercent),
            ("gemini://h/a%zz\r\n", RequestError::BadPercent),
            ("gemini://h/a b\r\n", RequestError::BadPath),
            ("gemini://h/a\\b\r\n", RequestError::BadPath),
            ("gemini://h/caf\u{e9}\r\n", RequestError::BadPath),
        ] {
            assert_eq!(req(bad), Err(err), "{bad:?}");
        }
        // "..." and "..a" are ordinary names.
        assert_eq!(req("gemini://h/.../..a\r\n").unwrap().path(), "/.../..a");
    }

    #[test]
    fn the_limit_is_1024_octets_before_the_crlf() {
        let head = "gemini://h.example:1965/";
        let at_limit = format!("{head}{}", "a".repeat(MAX_URL - head.len()));
        assert_eq!(at_limit.len(), 1024);
        assert!(req(&format!("{at_limit}\r\n")).is_ok());
        assert_eq!(req(&format!("{at_limit}a\r\n")), Err(RequestError::TooLong));
        assert_eq!(req(&format!("{at_limit}a")), Err(RequestError::TooLong));
        assert_eq!(req(&format!("{at_limit}\r")), Err(RequestError::NoCrlf));
        // The canonical form names the port, and must fit too.
        let no_port = format!("gemini://h.example/{}", "a".repeat(MAX_URL - 19));
        assert_eq!(no_port.len(), 1024);
        assert_eq!(req(&format!("{no_port}\r\n")), Err(RequestError::TooLong));
    }

    #[test]
    fn malformed_requests_are_refused_with_59() {
        for (bad, err) in [
            (&b"gemini://h/x\n"[..], RequestError::BareLf),
            (b"gemini://h/x", RequestError::NoCrlf),
            (b"", RequestError::NoCrlf),
            (b"gemini://h/x\r\nmore", RequestError::TrailingData),
            (b"gemini://h/\xff\r\n", RequestError::NotUtf8),
            (b"https://h/x\r\n", RequestError::OtherScheme),
            (b"gopher://h/x\r\n", RequestError::OtherScheme),
            (b"//h/x\r\n", RequestError::Relative),
            (b"/x\r\n", RequestError::Relative),
            (b"gemini:/x\r\n", RequestError::NoHost),
            (b"gemini:///x\r\n", RequestError::NoHost),
            (b"gemini://:1965/x\r\n", RequestError::NoHost),
            (b"gemini://u@h/x\r\n", RequestError::Userinfo),
            (b"gemini://u:p@h/x\r\n", RequestError::Userinfo),
            (b"gemini://h_x/x\r\n", RequestError::BadHost),
            (b"gemini://[::1/x\r\n", RequestError::BadHost),
            (b"gemini://[::1]x/x\r\n", RequestError::BadHost),
            (b"gemini://h:0/x\r\n", RequestError::BadPort),
            (b"gemini://h:65536/x\r\n", RequestError::BadPort),
            (b"gemini://h:+5/x\r\n", RequestError::BadPort),
            (b"gemini://h/x#f\r\n", RequestError::Fragment),
            (b"gemini://h/x?q\r\n", RequestError::Query),
            (b"gemini://h/x\ry\r\n", RequestError::BadPath),
        ] {
            let got = parse_request(bad);
            assert_eq!(got, Err(err.clone()), "{:?}", String::from_utf8_lossy(bad));
            assert_eq!(err.status(), 59);
        }
    }

    #[test]
    fn headers_parse() {
        assert_eq!(parse_header(b"20 text/gemini\r\n").unwrap(), (20, "text/gemini".to_owned()));
        assert_eq!(parse_header(b"51\r\n").unwrap(), (51, String::new()));
        for bad in [&b"20 x\n"[..], b"2 x\r\n", b"70 x\r\n", b"20x\r\n", b"20 \x01\r\n", b"20 \xff\r\n"] {
            assert!(parse_header(bad).is_err(), "{bad:?}");
        }
    }

    // --- over sockets --------------------------------------------------------

    const T: Duration = Duration::from_secs(10);
    const PATH: &str = "/.well-known/latssiam/alice.pem";

    struct Certs(HashMap<(String, String), Vec<u8>>);

    impl Lookup for Certs {
        fn certificate(&self, host: &str, path: &str) -> Option<Vec<u8>> {
            self.0.get(&(host.to_owned(), path.to_owned())).cloned()
        }
    }

    fn identity(address: &str) -> Identity {
        Identity::generate(&address.parse::<Address>().unwrap(), None, false).unwrap()
    }

    struct Capsule {
        addr: SocketAddr,
        alice: Identity,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    async fn capsule(limits: Limits) -> Capsule {
        let alice = identity("alice@example.org");
        let der = alice.cert_der().to_vec();
        let certs = Certs(HashMap::from([
            (("example.org".to_owned(), PATH.to_owned()), der.clone()),
            (("127.0.0.1".to_owned(), PATH.to_owned()), der),
        ]));
        let tls = server_tls(&identity("capsule@example.org")).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(listener, tls, Arc::new(certs), limits, shutdown.clone()));
        Capsule { addr, alice, shutdown, task }
    }

    /// Sends raw bytes over TLS and reads to close_notify.
    async fn raw(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut s = crate::tls::connect(tcp, "example.org", PORT, None, &MemoryPins::default()).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(T, s.read_to_end(&mut out)).await.unwrap().unwrap();
        out
    }

    /// A hostile capsule: reads the request line, then writes `header` and,
    /// with `endless`, body octets for as long as the client reads; it never
    /// closes on its own. Returns its address.
    async fn hostile_capsule(header: &'static [u8], endless: bool) -> SocketAddr {
        let tls = tokio_rustls::TlsAcceptor::from(server_tls(&identity("evil@example.org")).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let tls = tls.clone();
                tokio::spawn(async move {
                    let Ok(mut s) = tls.accept(tcp).await else { return };
                    let mut line = [0u8; 1100];
                    let _ = s.read(&mut line).await;
                    if s.write_all(header).await.is_err() {
                        return;
                    }
                    let chunk = [b'x'; 4096];
                    while endless && s.write_all(&chunk).await.is_ok() {}
                    // Holds the connection open, saying nothing more.
                    std::future::pending::<()>().await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_hostile_capsule_costs_the_client_bounded_memory_and_time() {
        let url = "gemini://example.org/.well-known/latssiam/alice.pem";
        // A body without end: refused once past MAX_BODY, not read on.
        let addr = hostile_capsule(b"20 application/x-pem-file\r\n", true).await;
        let err = fetch_at(addr, url, &MemoryPins::default(), T).await.unwrap_err();
        assert!(matches!(err, FetchError::BodyTooLong), "{err}");
        // A header without end: refused at MAX_HEADER.
        let addr = hostile_capsule(b"", true).await;
        let err = fetch_at(addr, url, &MemoryPins::default(), T).await.unwrap_err();
        assert!(matches!(err, FetchError::BadHeader(_)), "{err}");
        // A capsule that answers nothing: the caller's time bound ends it.
        let addr = hostile_capsule(b"", false).await;
        let err = fetch_at(addr, url, &MemoryPins::default(), Duration::from_millis(500)).await.unwrap_err();
        assert!(matches!(err, FetchError::Timeout), "{err}");
        // Half a header, then silence: the same.
        let addr = hostile_capsule(b"20 appl", false).await;
        let err = fetch_at(addr, url, &MemoryPins::default(), Duration::from_millis(500)).await.unwrap_err();
        assert!(matches!(err, FetchError::Timeout), "{err}");
    }

    #[tokio::test]
    async fn certificates_round_trip_through_their_latssiam_urls() {
        let c = capsule(Limits::default()).await;
        let pins = MemoryPins::default();
        let url = LatssiamUrl::for_certificate(c.alice.info()).unwrap();
        assert_eq!(format!("/{}", url.path), PATH);
        let der = fetch_certificate_at(c.addr, &url.to_string(), &pins, T).await.unwrap();
        assert_eq!(der, c.alice.cert_der().to_vec());
        assert!(pins.get("example.org:1965").unwrap().is_some(), "the capsule is pinned");

        // By name resolution, with the port in the URL.
        let local = LatssiamUrl { host: "127.0.0.1".into(), port: Some(c.addr.port()), ..url.clone() };
        let der = fetch_certificate(&local.to_string(), &pins, T).await.unwrap();
        assert_eq!(der, c.alice.cert_der().to_vec());

        // A URL naming another certificate at the same place is refused.
        let other = identity("alice@example.org").fingerprint();
        let wrong = LatssiamUrl { fingerprint: other, ..url.clone() };
        let err = fetch_certificate_at(c.addr, &wrong.to_string(), &pins, T).await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, FetchError::FingerprintMismatch { expected, got }
            if expected == other && got == c.alice.fingerprint()));
        assert!(text.contains(&other.to_string()) && text.contains(&c.alice.fingerprint().to_string()), "{text}");

        // An unknown path is 51, as an answer from fetch and an error from fetch_certificate.
        let r = fetch_at(c.addr, "gemini://example.org/nobody", &pins, T).await.unwrap();
        assert_eq!((r.status, r.meta.as_str(), r.body.len()), (51, "Not found", 0));
        let gone = LatssiamUrl { path: ".well-known/latssiam/bob.pem".into(), ..url };
        let err = fetch_certificate_at(c.addr, &gone.to_string(), &pins, T).await.unwrap_err();
        assert!(matches!(err, FetchError::Status { status: 51, .. }), "{err}");

        c.shutdown.cancel();
        tokio::time::timeout(T, c.task).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn the_pem_body_is_the_certificate() {
        let c = capsule(Limits::default()).await;
        let r = fetch_at(c.addr, &format!("gemini://example.org{PATH}"), &MemoryPins::default(), T).await.unwrap();
        assert_eq!((r.status, r.meta.as_str()), (20, "application/x-pem-file"));
        assert_eq!(r.body, c.alice.cert_pem().into_bytes());
    }

    #[tokio::test]
    async fn requests_at_and_over_the_limit() {
        let c = capsule(Limits::default()).await;
        let head = "gemini://example.org:1965/";
        let at_limit = format!("{head}{}", "a".repeat(MAX_URL - head.len()));
        assert_eq!(raw(c.addr, format!("{at_limit}\r\n").as_bytes()).await, NOT_FOUND);
        // 1025 octets without a CRLF: 59 and close_notify, without waiting for more.
        let over = format!("{at_limit}a");
        let started = std::time::Instant::now();
        assert_eq!(raw(c.addr, over.as_bytes()).await, BAD_REQUEST);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(raw(c.addr, b"gemini://example.org/x\n").await, BAD_REQUEST);
        assert_eq!(raw(c.addr, b"https://example.org/x\r\n").await, BAD_REQUEST);
    }

    #[tokio::test]
    async fn one_client_gets_its_share_of_requests_then_44() {
        let c = capsule(Limits { requests_per_minute: 3, ..Limits::default() }).await;
        let request = b"gemini://example.org/nobody.pem\r\n";
        for _ in 0..3 {
            assert_eq!(raw(c.addr, request).await, NOT_FOUND);
        }
        assert_eq!(raw(c.addr, request).await, SLOW_DOWN);
    }

    #[tokio::test]
    async fn a_client_that_never_handshakes_is_dropped_after_the_request_timeout() {
        let limits = Limits { request_timeout: Duration::from_millis(300), ..Limits::default() };
        let c = capsule(limits).await;
        let mut tcp = TcpStream::connect(c.addr).await.unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(T, tcp.read(&mut buf)).await.unwrap().unwrap_or(0);
        assert_eq!(n, 0);
        assert!(started.elapsed() >= Duration::from_millis(250), "{:?}", started.elapsed());
        // Shutdown waits for connections in flight, which the timeout bounds.
        let _idle = TcpStream::connect(c.addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(3), c.task).await.unwrap().unwrap();
        assert!(TcpStream::connect(c.addr).await.is_err(), "no longer listening");
    }

    /// Reads from a connection the capsule should close at once.
    async fn closed_at_once(tcp: &mut TcpStream) -> bool {
        let mut buf = [0u8; 16];
        matches!(tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
    }

    #[tokio::test]
    async fn connections_beyond_the_per_client_limit_are_closed_before_tls() {
        let c = capsule(Limits { max_per_client: 2, ..Limits::default() }).await;
        let url = format!("gemini://example.org{PATH}");
        let idle = [TcpStream::connect(c.addr).await.unwrap(), TcpStream::connect(c.addr).await.unwrap()];
        let mut third = TcpStream::connect(c.addr).await.unwrap();
        assert!(closed_at_once(&mut third).await);

        // Another client address is not counted with these (Linux routes 127/8 to lo).
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if socket.bind("127.0.0.2:0".parse().unwrap()).is_ok() {
            let tcp = socket.connect(c.addr).await.unwrap();
            let r = exchange(tcp, &parse_fetch_url(&url).unwrap(), &url, &MemoryPins::default()).await.unwrap();
            assert_eq!(r.status, 20);
        }

        // A slot is given back when its connection ends.
        drop(idle);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = fetch_at(c.addr, &url, &MemoryPins::default(), T).await.unwrap();
        assert_eq!(r.status, 20);
    }

    #[tokio::test]
    async fn connections_beyond_the_total_limit_are_closed_before_tls() {
        let c = capsule(Limits { max_connections: 1, ..Limits::default() }).await;
        let idle = TcpStream::connect(c.addr).await.unwrap();
        let mut second = TcpStream::connect(c.addr).await.unwrap();
        assert!(closed_at_once(&mut second).await);
        drop(idle);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = fetch_at(c.addr, "gemini://example.org/x", &MemoryPins::default(), T).await.unwrap();
        assert_eq!(r.status, 51);
    }

    #[tokio::test]
    async fn openssl_s_client_gets_the_pem() {
        let c = capsule(Limits::default()).await;
        let connect = c.addr.to_string();
        let request = format!("gemini://127.0.0.1:{}{PATH}\r\n", c.addr.port());
        let output = tokio::task::spawn_blocking(move || {
            use std::io::Write as _;
            use std::process::{Command, Stdio};
            let mut child = Command::new("openssl")
                .args(["s_client", "-connect", &connect, "-quiet"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("openssl is installed");
            child.stdin.take().expect("stdin is piped").write_all(request.as_bytes()).expect("write to openssl");
            child.wait_with_output().expect("openssl runs")
        });
        let output = tokio::time::timeout(Duration::from_secs(20), output).await.unwrap().unwrap();
        let mut expected = SUCCESS_PEM.to_vec();
        expected.extend_from_slice(c.alice.cert_pem().as_bytes());
        assert_eq!(String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&expected));
    }

    #[test]
    fn pem_bodies_hold_exactly_one_certificate() {
        let a = identity("alice@example.org");
        let pem = a.cert_pem();
        assert_eq!(single_certificate(pem.as_bytes()).unwrap(), a.cert_der().to_vec());
        assert!(single_certificate(format!("{pem}{pem}").as_bytes()).is_err());
        assert!(single_certificate(format!("{pem}{}", a.key_pem()).as_bytes()).is_err());
        assert!(single_certificate(b"hello").is_err());
    }
}
