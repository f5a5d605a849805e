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
        if let Some((_, contact)) = gw.store.contact_by_name(address).map_err(|e| e.to_string())? {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resource_parameter_is_found_and_decoded() {
        assert_eq!(resource(Some("resource=acct%3Aalice%40example.org")).as_deref(), Some("acct:alice@example.org"));
        assert_eq!(resource(Some("rel=x&resource=acct:bob@example.org")).as_deref(), Some("acct:bob@example.org"));
        assert_eq!(resource(Some("rel=x")), None);
        assert_eq!(resource(None), None);
    }
}
