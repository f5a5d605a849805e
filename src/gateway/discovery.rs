//! Finding people by one address: WebFinger (RFC 7033) on `http.public_listen`.
//!
//! `GET /.well-known/webfinger?resource=acct:alice@example.org` answers a JRD
//! (`application/jrd+json`, `Access-Control-Allow-Origin: *`) for a contact
//! (by LATSSIAM address or email alias), a mailbox registered on the embedded
//! home server, or the gateway itself: the subject, the LATSSIAM URL and
//! fingerprint, the link to the certificate (the gemini URL the LATSSIAM URL
//! names), and `mailto:` when mail reaches them through the gateway. `400`
//! without a `resource`, `404` for anyone else. The names of the link
//! relations and the property are URNs of this project (documented in
//! README.md): `urn:latssiam:url`, `urn:latssiam:certificate`,
//! `urn:latssiam:fingerprint`.

use std::sync::Arc;

use hyper::StatusCode;
use latssiam::identity::{CertInfo, LatssiamUrl};

use super::http::{Answer, Handler};
use super::Gateway;

/// The link relation whose `href` is a person's LATSSIAM URL.
pub const REL_URL: &str = "urn:latssiam:url";
/// The link relation whose `href` is the gemini URL of their certificate.
pub const REL_CERTIFICATE: &str = "urn:latssiam:certificate";
/// The property that holds their certificate's fingerprint.
pub const PROP_FINGERPRINT: &str = "urn:latssiam:fingerprint";

/// What `http.public_listen` serves.
pub struct Discovery(pub Arc<Gateway>);

/// Someone the gateway can describe: their certificate, and the email
/// address that reaches them through the gateway, if any.
struct Found {
    cert: Vec<u8>,
    mailto: Option<String>,
}

impl Discovery {
    fn find(&self, address: &str) -> Result<Option<Found>, String> {
        let gw = &self.0;
        // Only for the addresses this gateway speaks for: its mail domains and
        // its home server's host (not whom else it knows).
        let domain = address.rsplit_once('@').map_or("", |(_, d)| d);
        if !gw.settings.is_local_domain(domain) && !domain.eq_ignore_ascii_case(&gw.home.0) {
            return Ok(None);
        }
        let on_home =
            |a: &str| gw.home_store.as_ref().is_some_and(|h| h.active_certificate(a).ok().flatten().is_some());
        // A contact elsewhere is described only if they opted in: otherwise
        // the directory would link their alias to their key and server for anyone.
        if let Some((_, contact)) = gw
            .store
            .contact_by_name(address)
            .map_err(|e| e.to_string())?
            .filter(|(_, c)| !c.gone && (c.discoverable || on_home(&c.address)))
        {
            let reachable = |a: &str| a.rsplit_once('@').is_some_and(|(_, d)| gw.settings.is_local_domain(d));
            let mailto = contact
                .email
                .clone()
                .or_else(|| reachable(&contact.address).then(|| contact.address.clone()))
                .filter(|_| !contact.gone);
            return Ok(Some(Found { cert: contact.cert, mailto }));
        }
        if gw.identity.address().is_some_and(|a| a.to_string().eq_ignore_ascii_case(address)) {
            return Ok(Some(Found { cert: gw.identity.cert_der().to_vec(), mailto: None }));
        }
        if let Some(home) = &gw.home_store {
            if let Some(cert) = home.active_certificate(address).map_err(|e| e.to_string())? {
                return Ok(Some(Found { cert, mailto: None }));
            }
        }
        Ok(None)
    }
}

/// The JRD of `subject` (an `acct:` URI) for `found`.
fn jrd(subject: &str, found: &Found) -> Option<serde_json::Value> {
    let info = CertInfo::from_der(&found.cert).ok()?;
    let url = LatssiamUrl::for_certificate(&info)?;
    let gemini = gemini_url(&url);
    let mut aliases = vec![serde_json::Value::from(url.to_string())];
    if let Some(m) = &found.mailto {
        aliases.push(format!("mailto:{m}").into());
    }
    Some(serde_json::json!({
        "subject": subject,
        "aliases": aliases,
        "properties": { PROP_FINGERPRINT: info.fingerprint.to_string() },
        "links": [
            { "rel": REL_URL, "href": url.to_string() },
            { "rel": REL_CERTIFICATE, "type": "application/x-pem-file", "href": gemini },
        ],
    }))
}

/// The gemini URL a LATSSIAM URL names.
pub fn gemini_url(url: &LatssiamUrl) -> String {
    let port = url.port.map(|p| format!(":{p}")).unwrap_or_default();
    format!("gemini://{}{port}/{}", url.host, url.path)
}

/// The `resource` parameter of a query string, percent-decoded.
fn resource(query: Option<&str>) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == "resource")
            .then(|| percent_encoding::percent_decode_str(&v.replace('+', " ")).decode_utf8_lossy().into_owned())
    })
}

fn json_answer(status: StatusCode, body: &serde_json::Value) -> Answer {
    Answer {
        status,
        content_type: "application/jrd+json",
        body: body.to_string().into(),
        headers: vec![("access-control-allow-origin", "*")],
    }
}

impl Handler for Discovery {
    async fn get(&self, path: &str, query: Option<&str>) -> Answer {
        if let Some(token) = path.strip_prefix("/paste/") {
            // The whole text of a long IRC post: plain text, never rendered as anything else.
            return match self.0.store.pasted(token) {
                Some(text) => {
                    let mut a = Answer::text(StatusCode::OK, text);
                    a.headers.push(("x-content-type-options", "nosniff"));
                    a.headers.push(("content-security-policy", "default-src 'none'; sandbox"));
                    a
                }
                None => Answer::text(StatusCode::NOT_FOUND, "no such paste (they are kept for irc.paste_days)\n"),
            };
        }
        if path != "/.well-known/webfinger" {
            return Answer::text(StatusCode::NOT_FOUND, "not found\n");
        }
        let Some(resource) = resource(query).filter(|r| !r.is_empty()) else {
            let mut a = Answer::text(StatusCode::BAD_REQUEST, "a resource parameter is required\n");
            a.headers.push(("access-control-allow-origin", "*"));
            return a;
        };
        // acct:user@host, or a bare user@host / mailto:user@host.
        let address = resource
            .strip_prefix("acct:")
            .or_else(|| resource.strip_prefix("mailto:"))
            .unwrap_or(&resource)
            .trim()
            .to_owned();
        let valid = address.len() <= 320
            && address.split_once('@').is_some_and(|(u, h)| !u.is_empty() && latssiam::identity::is_dns_name(h));
        let not_found = || {
            let mut a = Answer::text(StatusCode::NOT_FOUND, "no such person here\n");
            a.headers.push(("access-control-allow-origin", "*"));
            a
        };
        if !valid {
            return not_found();
        }
        match self.find(&address) {
            Ok(Some(found)) => match jrd(&format!("acct:{}", address.to_ascii_lowercase()), &found) {
                Some(body) => json_answer(StatusCode::OK, &body),
                None => not_found(),
            },
            Ok(None) => not_found(),
            Err(e) => {
                tracing::warn!(error = %e, "WebFinger: cannot read contacts.");
                Answer::text(StatusCode::SERVICE_UNAVAILABLE, "try again later\n")
            }
        }
    }
}

/// The address a capsule path names at `host`:
/// `/.well-known/latssiam/<mailbox>.pem`, as [`LatssiamUrl::for_certificate`]
/// makes them (lower case).
pub fn path_address(host: &str, path: &str) -> Option<String> {
    let mailbox = path.strip_prefix("/.well-known/latssiam/")?.strip_suffix(".pem")?;
    let valid = !mailbox.is_empty() && !mailbox.contains(['/', '@']) && mailbox.len() <= 64;
    valid.then(|| format!("{mailbox}@{host}").to_ascii_lowercase())
}

/// What the Gemini capsule serves: the certificate of every active mailbox
/// of a server's store, and of a few identities of its own (the gateway's).
pub struct Capsule {
    /// The mailboxes (the embedded home server's, or the reference server's).
    pub store: Option<Arc<latssiam::server::store::Store>>,
    /// Address (lower case) and certificate (DER) of identities served besides.
    pub own: Vec<(String, Vec<u8>)>,
    /// The gateway's store, for the whole text of long IRC posts (`/paste/TOKEN`).
    pub pastes: Option<Arc<crate::gateway::db::Store>>,
}

impl latssiam::gemini::Lookup for Capsule {
    fn text(&self, _host: &str, path: &str) -> Option<String> {
        self.pastes.as_ref()?.pasted(path.strip_prefix("/paste/")?)
    }

    fn certificate(&self, host: &str, path: &str) -> Option<Vec<u8>> {
        let address = path_address(host, path)?;
        if let Some((_, cert)) = self.own.iter().find(|(a, _)| *a == address) {
            return Some(cert.clone());
        }
        match self.store.as_ref()?.active_certificate(&address) {
            Ok(cert) => cert,
            Err(e) => {
                tracing::warn!(error = %e, "Gemini capsule: cannot read the mailboxes.");
                None
            }
        }
    }
}

/// Most time a WebFinger look-up may take, and the largest JRD read.
const LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
const MAX_JRD: usize = 64 * 1024;

/// Asks WebFinger for `address` (`user@domain`) and returns the LATSSIAM
/// URL its JRD names (the `urn:latssiam:url` link). `base` is where to ask:
/// `https://DOMAIN` unless given (`http://` only when given explicitly).
///
/// # Errors
/// What failed, in one line.
pub async fn lookup(address: &str, base: Option<&str>) -> Result<LatssiamUrl, String> {
    let (_, domain) = address.rsplit_once('@').ok_or_else(|| format!("{address:?} is not user@domain"))?;
    if !latssiam::identity::is_dns_name(domain) {
        return Err(format!("{domain:?} is not a domain name"));
    }
    let base = base.map_or_else(|| format!("https://{domain}"), str::to_owned);
    let resource: String =
        percent_encoding::utf8_percent_encode(&format!("acct:{address}"), percent_encoding::NON_ALPHANUMERIC).collect();
    let url = format!("{}/.well-known/webfinger?resource={resource}", base.trim_end_matches('/'));
    let body = tokio::time::timeout(LOOKUP_TIMEOUT, get(&url))
        .await
        .map_err(|_| format!("{url}: no answer within {} s", LOOKUP_TIMEOUT.as_secs()))??;
    let jrd: serde_json::Value = serde_json::from_slice(&body).map_err(|e| format!("{url}: not a JRD: {e}"))?;
    let href = jrd["links"]
        .as_array()
        .and_then(|links| links.iter().find(|l| l["rel"] == REL_URL))
        .and_then(|l| l["href"].as_str())
        .ok_or_else(|| format!("{url}: the JRD names no LATSSIAM URL ({REL_URL})"))?;
    href.parse().map_err(|e| format!("{url}: {href:?}: {e}"))
}

/// `GET url` (http or https), the body of a `200` (at most 64 KiB).
pub(crate) async fn get(url: &str) -> Result<Vec<u8>, String> {
    use http_body_util::BodyExt as _;
    let (tls, rest) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
        (Some(r), _) => (true, r),
        (_, Some(r)) => (false, r),
        _ => return Err(format!("{url}: only http:// and https:// URLs")),
    };
    let (authority, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') || h.ends_with(']') => {
            (h.trim_matches(['[', ']']), p.parse::<u16>().map_err(|_| format!("{url}: bad port"))?)
        }
        _ => (authority.trim_matches(['[', ']']), if tls { 443 } else { 80 }),
    };
    let tcp = tokio::net::TcpStream::connect((host, port)).await.map_err(|e| format!("{url}: {e}"))?;
    let request = hyper::Request::get(&path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::ACCEPT, "application/jrd+json")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| format!("{url}: {e}"))?;
    let response = if tls {
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| format!("{url}: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("{url}: TLS: {e}"))?;
        send(hyper_util::rt::TokioIo::new(stream), request).await
    } else {
        send(hyper_util::rt::TokioIo::new(tcp), request).await
    }
    .map_err(|e| format!("{url}: {e}"))?;
    if response.status() != hyper::StatusCode::OK {
        return Err(format!("{url}: {}", response.status()));
    }
    let limited = http_body_util::Limited::new(response.into_body(), MAX_JRD);
    Ok(limited.collect().await.map_err(|e| format!("{url}: {e}"))?.to_bytes().to_vec())
}

async fn send<IO>(
    io: IO,
    request: hyper::Request<http_body_util::Empty<bytes::Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, hyper::Error>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(connection);
    sender.send_request(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capsule_paths_name_one_mailbox() {
        assert_eq!(
            path_address("example.org", "/.well-known/latssiam/Alice.pem").as_deref(),
            Some("alice@example.org")
        );
        for bad in [
            "/.well-known/latssiam/.pem",
            "/.well-known/latssiam/a/b.pem",
            "/x/alice.pem",
            "/.well-known/latssiam/a@b.pem",
        ] {
            assert_eq!(path_address("example.org", bad), None, "{bad}");
        }
    }

    #[test]
    fn the_resource_parameter_is_found_and_decoded() {
        assert_eq!(resource(Some("resource=acct%3Aalice%40example.org")).as_deref(), Some("acct:alice@example.org"));
        assert_eq!(resource(Some("rel=x&resource=acct:bob@example.org")).as_deref(), Some("acct:bob@example.org"));
        assert_eq!(resource(Some("rel=x")), None);
        assert_eq!(resource(None), None);
    }

    /// A WebFinger server on loopback that reads the request and then writes
    /// `head` and, with `endless`, body octets for as long as it is read; it
    /// never closes on its own.
    async fn hostile_webfinger(head: &'static [u8], endless: bool) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    if s.write_all(head).await.is_err() {
                        return;
                    }
                    let chunk = [b' '; 8192];
                    while endless && s.write_all(&chunk).await.is_ok() {}
                    std::future::pending::<()>().await;
                });
            }
        });
        format!("http://127.0.0.1:{port}")
    }

    #[tokio::test]
    async fn a_hostile_webfinger_server_costs_the_look_up_bounded_memory_and_time() {
        // A JRD without end: refused once past MAX_JRD.
        let base = hostile_webfinger(b"HTTP/1.1 200 OK\r\nContent-Type: application/jrd+json\r\n\r\n", true).await;
        let err = lookup("alice@example.org", Some(&base)).await.err().unwrap_or_default();
        assert!(err.contains("length limit"), "{err}");
        // A server that answers nothing: the look-up ends at LOOKUP_TIMEOUT.
        let base = hostile_webfinger(b"", false).await;
        let err = lookup("alice@example.org", Some(&base)).await.err().unwrap_or_default();
        assert!(err.contains("no answer within 10 s"), "{err}");
    }
}
