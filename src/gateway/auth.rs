//! The gateway as the border that authenticates: SPF (MAIL FROM and HELO),
//! DKIM (every signature) and DMARC (RFC 9989's DNS tree walk, no public
//! suffix list) on inbound SMTP mail, on the octets as received; RFC 8601
//! results; and DKIM signatures on mail going out. Built on `mail-auth`.
//!
//! Inbound, [`Border::check`] decides, before anything is queued:
//! - a temporary DNS failure that leaves DMARC undecided: `451 4.7.0`,
//!   never a silent pass;
//! - `From:` in one of the gateway's own domains, from outside
//!   `auth.trusted_networks`, without a DMARC pass: `550 5.7.1`, whatever
//!   the domain publishes;
//! - DMARC fails and the domain says `p=reject`: `550 5.7.1`;
//! - DMARC fails otherwise (`p=quarantine`, `p=none`), or the sender is not
//!   authenticated at all (no DMARC pass, no SPF pass, no DKIM pass): the
//!   message is delivered with a `LATSSIAM-Auth-Warning:` field (which
//!   `fetch` prints) and, if `auth.subject_tag` is set, that tag in front of
//!   its subject.
//!
//! Every `Authentication-Results:` whose authserv-id is ours or a trusted
//! upstream's, every `Received-SPF:`, every `LATSSIAM-URL:` and every
//! `LATSSIAM-Auth-Warning:` the sender wrote is removed (RFC 8601 section
//! 5), then ours is prepended. From `auth.trusted_networks`, an
//! `Authentication-Results:` by one of `auth.trusted_authserv_ids` (Postfix
//! with OpenDKIM/OpenDMARC in front) is taken instead of verifying again;
//! without one, DKIM and DMARC are verified but not SPF (the peer is the
//! relay, not the sender's MTA).

use std::net::IpAddr;
use std::sync::Arc;

use bridge_smtp::{Envelope, Reply};
use mail_auth::common::crypto::{DkimKey, Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter as _;
use mail_auth::dkim::{DkimSigner, Done};
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::dmarc::Policy;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimResult, DmarcResult, MessageAuthenticator, Parameters, SpfResult,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::PrivateKeyDer;

use super::config::{DkimKeySettings, Settings};
use super::mail;
use super::metrics::Metrics;

/// The header field that marks mail whose sender could not be authenticated.
pub const WARNING_FIELD: &str = "LATSSIAM-Auth-Warning";

/// Parsed SPF, DKIM and DMARC records, kept within their TTL (hickory
/// caches the raw answers below; this saves parsing them again, an RSA key
/// among them, for every message). Bounded: emptied when full.
#[derive(Default)]
pub struct TxtCache(std::sync::Mutex<std::collections::HashMap<Box<str>, (mail_auth::Txt, std::time::Instant)>>);

/// Most records [`TxtCache`] keeps.
const TXT_CACHE_ENTRIES: usize = 10_000;

impl mail_auth::ResolverCache<Box<str>, mail_auth::Txt> for TxtCache {
    fn get<Q>(&self, name: &Q) -> Option<mail_auth::Txt>
    where
        Box<str>: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        let map = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(name).filter(|(_, until)| *until > std::time::Instant::now()).map(|(v, _)| v.clone())
    }

    fn remove<Q>(&self, name: &Q) -> Option<mail_auth::Txt>
    where
        Box<str>: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(name).map(|(v, _)| v)
    }

    fn insert(&self, key: Box<str>, value: mail_auth::Txt, valid_until: std::time::Instant) {
        let mut map = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= TXT_CACHE_ENTRIES {
            map.clear();
        }
        map.insert(key, (value, valid_until));
    }
}

/// What inbound authentication came to, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Authenticated (DMARC pass, or SPF/DKIM pass where DMARC does not apply).
    Pass,
    /// Delivered with the warning field.
    Warned,
    /// Refused: DMARC `p=reject`.
    RejectedDmarc,
    /// Refused: our own domain, not authenticated.
    RejectedOwnDomain,
    /// `451`: DNS failed for now.
    TempFail,
    /// Results taken from a trusted upstream.
    Upstream,
    /// Verification is off (`auth.verify = false`).
    Off,
}

impl Outcome {
    /// The metric label.
    pub const fn label(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Warned => "warned",
            Outcome::RejectedDmarc => "rejected_dmarc",
            Outcome::RejectedOwnDomain => "rejected_own_domain",
            Outcome::TempFail => "tempfail",
            Outcome::Upstream => "upstream",
            Outcome::Off => "off",
        }
    }
}

/// Inbound verification and outbound signing, from `[auth]`, `[dns]` and `[[dkim]]`.
pub struct Border {
    authenticator: MessageAuthenticator,
    authserv_id: String,
    verify: bool,
    trusted_networks: Vec<(IpAddr, u8)>,
    /// `smtp.limit_exempt`, parsed once.
    limit_exempt: Vec<(IpAddr, u8)>,
    trusted_ids: Vec<String>,
    own_domains: Vec<String>,
    subject_tag: String,
    signers: Vec<(String, DkimSigner<DkimKey, Done>)>,
    metrics: Arc<Metrics>,
    txt: TxtCache,
}

fn in_any(ip: IpAddr, networks: &[(IpAddr, u8)]) -> bool {
    networks.iter().any(|&(net, bits)| bridge_smtp::listener::in_network(ip, net, bits))
}

/// `domain` is `parent` or below it.
fn within(domain: &str, parent: &str) -> bool {
    let (d, p) = (domain.trim_end_matches('.'), parent.trim_end_matches('.'));
    d.eq_ignore_ascii_case(p)
        || (d.len() > p.len()
            && d.as_bytes()[d.len() - p.len() - 1] == b'.'
            && d[d.len() - p.len()..].eq_ignore_ascii_case(p))
}

/// The authserv-id of an `Authentication-Results` value (before the first `;`).
fn authserv_id(value: &[u8]) -> String {
    let text = String::from_utf8_lossy(value);
    let id = text.split(';').next().unwrap_or_default().trim();
    // A version may follow the id ("example.com 1"); comments are not expected here.
    id.split_whitespace().next().unwrap_or_default().trim_end_matches('.').to_ascii_lowercase()
}

/// Loads one `[[dkim]]` key: a PKCS#8 (or PKCS#1 RSA) PEM whose type picks
/// the algorithm.
///
/// # Errors
/// The file cannot be read, or holds no RSA (2048 bits or more) or Ed25519 key.
pub fn load_key(path: &std::path::Path) -> Result<DkimKey, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| format!("{}: {e}", path.display()))?;
    // PKCS#8 AlgorithmIdentifier id-Ed25519 (1.3.101.112) near the start.
    let ed25519 = matches!(&der, PrivateKeyDer::Pkcs8(p)
        if p.secret_pkcs8_der().get(..16).is_some_and(|h| h.windows(5).any(|w| w == [0x06, 0x03, 0x2b, 0x65, 0x70])));
    if ed25519 {
        Ed25519Key::from_pkcs8_der(der.secret_der())
            .map(DkimKey::from)
            .map_err(|e| format!("{}: not an Ed25519 key: {e}", path.display()))
    } else {
        RsaKey::<Sha256>::from_key_der(der)
            .map(DkimKey::from)
            .map_err(|e| format!("{}: not an RSA key of 2048 bits or more, nor Ed25519: {e}", path.display()))
    }
}

/// The header fields a DKIM signature covers (those missing are oversigned).
const SIGNED_FIELDS: [&str; 12] = [
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Reply-To",
    "In-Reply-To",
    "References",
];

fn signer(key: &DkimKeySettings) -> Result<DkimSigner<DkimKey, Done>, String> {
    Ok(DkimSigner::from_key(load_key(&key.key_file)?)
        .domain(&key.domain)
        .selector(&key.selector)
        .headers(SIGNED_FIELDS))
}

impl Border {
    /// The border for these settings, asking `dns`.
    ///
    /// # Errors
    /// A bad network or DKIM key, named.
    pub fn new(
        settings: &Settings,
        dns: hickory_resolver::TokioResolver,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let a = &settings.auth;
        let trusted_networks = a
            .trusted_networks
            .iter()
            .map(|n| bridge_smtp::listener::parse_network(n).map_err(|e| format!("auth.trusted_networks: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let signers = settings
            .dkim
            .iter()
            .map(|k| signer(k).map(|s| (k.domain.to_ascii_lowercase(), s)).map_err(|e| format!("dkim: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            authenticator: MessageAuthenticator(dns),
            authserv_id: settings.gateway.hostname.to_ascii_lowercase(),
            verify: a.verify,
            trusted_networks,
            limit_exempt: settings.smtp_limit_exempt().map_err(|e| format!("{e:#}"))?,
            trusted_ids: a.trusted_authserv_ids.iter().map(|i| i.trim_end_matches('.').to_ascii_lowercase()).collect(),
            own_domains: settings.gateway.domains.clone(),
            subject_tag: a.subject_tag.clone(),
            signers,
            metrics,
            txt: TxtCache::default(),
        })
    }

    /// Whether `ip` is in `auth.trusted_networks` (an MTA in front of the gateway).
    pub fn trusted(&self, ip: IpAddr) -> bool {
        in_any(ip, &self.trusted_networks)
    }

    /// Whether `ip` is in `smtp.limit_exempt` (an MTA in front, whose network is every sender's).
    pub fn limit_exempt(&self, ip: IpAddr) -> bool {
        in_any(ip, &self.limit_exempt)
    }

    /// Checks one inbound message from SMTP; returns it with the sender's
    /// forged fields removed and our results (and warning) prepended, or
    /// the reply to refuse it with.
    ///
    /// # Errors
    /// `550 5.7.1` or `451 4.7.0` (see the module docs).
    pub async fn check(&self, envelope: &Envelope, data: Vec<u8>) -> Result<Checked, Reply> {
        let (outcome, result) = self.decide(envelope, data).await;
        self.metrics.auth(outcome.label()).inc();
        result
    }

    async fn decide(&self, envelope: &Envelope, data: Vec<u8>) -> (Outcome, Result<Checked, Reply>) {
        let ip = envelope.peer.ip();
        let trusted = self.trusted(ip);
        let header = mail::header_section(&data);
        let from_domain = header_from_domain(header);
        let upstream = if trusted { self.upstream_results(header) } else { None };
        let mut data = data;
        if !self.verify && upstream.is_none() {
            self.strip(&mut data, trusted);
            return (Outcome::Off, Ok(Checked { data, vouched: None }));
        }
        // Verified on the octets as they came, before anything is removed or added.
        let (results, v) = match upstream {
            Some(results) => {
                let v = Verdict::from_results(&results);
                (results, Verdict { upstream: true, ..v })
            }
            None => self.verify(envelope, &data, trusted).await,
        };
        if v.temporary {
            return (
                Outcome::TempFail,
                Err(Reply::new(451, [4, 7, 0], "Temporary authentication failure (DNS); try again later")),
            );
        }
        let own = from_domain.as_deref().is_some_and(|d| self.own_domains.iter().any(|o| within(d, o)));
        if own && !trusted && !v.dmarc_pass {
            let domain = from_domain.unwrap_or_default();
            return (
                Outcome::RejectedOwnDomain,
                Err(Reply::new(550, [5, 7, 1], format!("Message claims to be from {domain} but is not authenticated"))),
            );
        }
        if v.reject {
            let domain = from_domain.unwrap_or_default();
            return (
                Outcome::RejectedDmarc,
                Err(Reply::new(550, [5, 7, 1], format!("DMARC policy of {domain} rejects this message"))),
            );
        }
        let mut added = format!("Authentication-Results: {};{results}\r\n", self.authserv_id);
        let warned = v.dmarc_fail || (!v.dmarc_pass && !v.spf_pass && !v.dkim_pass);
        self.strip(&mut data, trusted);
        if warned {
            let why = if v.dmarc_fail {
                "the sender's domain does not vouch for this message (DMARC failed); the From address may be forged"
            } else {
                "the sender could not be authenticated (no SPF, DKIM or DMARC pass); the From address may be forged"
            };
            added.push_str(&format!("{WARNING_FIELD}: {why}\r\n"));
            if !self.subject_tag.is_empty() {
                tag_subject(&mut data, &self.subject_tag);
            }
        }
        let outcome = match (warned, v.upstream) {
            (true, _) => Outcome::Warned,
            (false, true) => Outcome::Upstream,
            (false, false) => Outcome::Pass,
        };
        data.splice(0..0, added.into_bytes());
        // Who vouches for the message: the From: domain with DMARC, else the
        // envelope's domain with SPF (a DKIM pass alone names no origin here).
        let envelope_domain = envelope.from.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase());
        let vouched = if v.dmarc_pass {
            from_domain
        } else if v.spf_pass {
            envelope_domain
        } else {
            None
        };
        (outcome, Ok(Checked { data, vouched }))
    }

    /// The results part of a trusted upstream's `Authentication-Results`.
    fn upstream_results(&self, header: &[u8]) -> Option<String> {
        mail::header_values(header, "authentication-results").into_iter().find_map(|v| {
            let id = authserv_id(&v);
            self.trusted_ids.contains(&id).then(|| {
                let text = String::from_utf8_lossy(&v).into_owned();
                text.split_once(';').map(|(_, r)| r.to_owned()).unwrap_or_else(|| " none".into())
            })
        })
    }

    /// Removes the fields a sender may not set (see the module docs), in place.
    fn strip(&self, data: &mut Vec<u8>, trusted: bool) {
        let ours = |value: &[u8]| {
            let id = authserv_id(value);
            id == self.authserv_id || self.trusted_ids.contains(&id)
        };
        mail::rewrite_header(data, |header| {
            mail::without_fields_where(header, |name, value| {
                (name.eq_ignore_ascii_case("authentication-results") && ours(value))
                    || name.eq_ignore_ascii_case(mail::LATSSIAM_URL_FIELD)
                    || name.eq_ignore_ascii_case(WARNING_FIELD)
                    || (!trusted && name.eq_ignore_ascii_case("received-spf"))
            })
        });
    }

    /// Verifies SPF, DKIM and DMARC; from a trusted relay (`relayed`) SPF
    /// is not checked (the peer is the relay, not the sender's MTA), so DMARC
    /// rests on DKIM.
    async fn verify(&self, envelope: &Envelope, message: &[u8], relayed: bool) -> (String, Verdict) {
        let ip = envelope.peer.ip();
        let helo = if envelope.helo.is_empty() { "unknown" } else { envelope.helo.as_str() };
        let mail_from = envelope.from.as_str();
        let auth = &self.authenticator;
        let me = self.authserv_id.as_str();
        let mail_from_domain = mail_from.rsplit_once('@').map_or(helo, |(_, d)| d);
        let (spf_helo, spf) = if relayed {
            let none = || mail_auth::SpfOutput::new(mail_from_domain.to_owned()).with_result(SpfResult::None);
            (none(), none())
        } else {
            (
                auth.verify_spf(Parameters::new(SpfParameters::verify_ehlo(ip, helo, me)).with_txt_cache(&self.txt))
                    .await,
                auth.verify_spf(
                    Parameters::new(SpfParameters::verify_mail_from(ip, helo, me, mail_from)).with_txt_cache(&self.txt),
                )
                .await,
            )
        };
        let Some(parsed) = AuthenticatedMessage::parse(message) else {
            let results = AuthenticationResults::new(me)
                .with_spf_ehlo_result(&spf_helo, ip, helo)
                .with_spf_mailfrom_result(&spf, ip, mail_from, helo);
            return (results_of(&results), Verdict::from_spf(spf.result()));
        };
        let dkim = auth.verify_dkim(Parameters::new(&parsed).with_txt_cache(&self.txt)).await;
        let dmarc = auth
            .verify_dmarc(
                Parameters::new(DmarcParameters::new(&parsed, &dkim, mail_from_domain, &spf)).with_txt_cache(&self.txt),
            )
            .await;
        let results = AuthenticationResults::new(me)
            .with_dkim_results(&dkim, parsed.from())
            .with_spf_ehlo_result(&spf_helo, ip, helo)
            .with_spf_mailfrom_result(&spf, ip, mail_from, helo)
            .with_dmarc_result(&dmarc);
        let dkim_pass = dkim.iter().any(|d| matches!(d.result(), DkimResult::Pass));
        let dkim_temp = dkim.iter().any(|d| matches!(d.result(), DkimResult::TempError(_)));
        let dmarc_result = dmarc.result();
        let dmarc_pass = matches!(dmarc_result, DmarcResult::Pass);
        let dmarc_fail = matches!(dmarc_result, DmarcResult::Fail(_));
        let spf_temp = matches!(spf.result(), SpfResult::TempError);
        let verdict = Verdict {
            dmarc_pass,
            dmarc_fail,
            reject: dmarc_fail && dmarc.policy() == Policy::Reject,
            spf_pass: spf.result() == SpfResult::Pass,
            dkim_pass,
            temporary: matches!(dmarc_result, DmarcResult::TempError(_)) || (!dmarc_pass && (spf_temp || dkim_temp)),
            upstream: false,
        };
        (results_of(&results), verdict)
    }

    /// Whether a message `From:` this domain can be signed (any key whose
    /// domain it is, or is below).
    pub fn can_sign(&self, domain: &str) -> bool {
        self.signers.iter().any(|(d, _)| within(domain, d))
    }

    /// Whether any DKIM key is configured.
    pub fn signs(&self) -> bool {
        !self.signers.is_empty()
    }

    /// `message` with a DKIM signature prepended for each key aligned with
    /// its `From:` domain (none when no key is).
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        let Some(domain) = header_from_domain(mail::header_section(message)) else { return message.to_vec() };
        let mut headers = String::new();
        for (d, signer) in &self.signers {
            if within(&domain, d) {
                match signer.sign(message) {
                    Ok(signature) => headers.push_str(&signature.to_header()),
                    Err(e) => tracing::warn!(domain = %d, error = %e, "Cannot DKIM-sign a message."),
                }
            }
        }
        if headers.is_empty() {
            message.to_vec()
        } else {
            mail::prepend(&headers, message)
        }
    }
}

fn results_of(results: &AuthenticationResults<'_>) -> String {
    // "Authentication-Results: id;\r\n\tdkim=...;\r\n\tspf=...\r\n": keep what follows the id's semicolon.
    let header = results.to_header();
    let value = header.split_once(':').map_or(header.as_str(), |(_, v)| v);
    let value = value.trim_end_matches(['\r', '\n']);
    value.split_once(';').map_or(" none", |(_, r)| r).to_owned()
}

/// The domain of the (first) address in `From:`, lower case.
fn header_from_domain(header: &[u8]) -> Option<String> {
    let value = mail::header_values(header, "from").into_iter().next()?;
    let raw = [b"From:".as_slice(), &value, b"\r\n\r\n"].concat();
    let parsed = mail_parser::MessageParser::default().parse_headers(&raw)?;
    let address = parsed.from()?.first()?.address()?.to_ascii_lowercase();
    address.rsplit_once('@').map(|(_, d)| d.trim_end_matches('.').to_owned())
}

/// Puts `tag` before the message's subject, in place.
fn tag_subject(message: &mut Vec<u8>, tag: &str) {
    mail::rewrite_header(message, |header| {
        let subject = mail::header_values(header, "subject").into_iter().next().unwrap_or_default();
        let subject = String::from_utf8_lossy(&subject).trim().to_owned();
        mail::prepend(&format!("Subject: {tag} {subject}\r\n"), &mail::without_fields(header, &["subject"]))
    });
}

/// A message that passed [`Border::check`].
pub struct Checked {
    /// The message, our `Authentication-Results` on top.
    pub data: Vec<u8>,
    /// The domain that vouches for it (DMARC pass: the `From:` domain; else
    /// SPF pass: the envelope sender's), if any: its origin.
    pub vouched: Option<String>,
}

/// What the results mean for the policy.
#[derive(Debug, Clone, Copy, Default)]
struct Verdict {
    dmarc_pass: bool,
    dmarc_fail: bool,
    reject: bool,
    spf_pass: bool,
    dkim_pass: bool,
    temporary: bool,
    upstream: bool,
}

impl Verdict {
    fn from_spf(spf: SpfResult) -> Self {
        Self { spf_pass: spf == SpfResult::Pass, temporary: spf == SpfResult::TempError, ..Self::default() }
    }

    /// From a trusted upstream's results (`dmarc=pass`, `spf=pass`, ...).
    fn from_results(results: &str) -> Self {
        let lower = results.to_ascii_lowercase();
        let has = |method: &str, result: &str| {
            lower.split([';', ' ', '\t', '\r', '\n']).any(|w| w == format!("{method}={result}"))
        };
        let policy_reject = lower.contains("policy.dmarc=reject");
        Self {
            dmarc_pass: has("dmarc", "pass"),
            dmarc_fail: has("dmarc", "fail"),
            reject: has("dmarc", "fail") && policy_reject,
            spf_pass: has("spf", "pass"),
            dkim_pass: has("dkim", "pass"),
            temporary: has("dmarc", "temperror"),
            upstream: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_and_authserv_ids() {
        assert!(within("mail.example.org", "example.org") && within("Example.ORG.", "example.org"));
        assert!(!within("badexample.org", "example.org"));
        assert_eq!(authserv_id(b" GW.example.org; spf=pass"), "gw.example.org");
        assert_eq!(authserv_id(b" gw.example.org 1; none"), "gw.example.org");
    }

    #[test]
    fn upstream_results_are_read_word_by_word() {
        let v = Verdict::from_results(" dkim=pass header.d=x; spf=pass smtp.mailfrom=a@x; dmarc=pass header.from=x");
        assert!(v.dmarc_pass && v.spf_pass && v.dkim_pass && !v.reject);
        let v = Verdict::from_results(" dmarc=fail (p=reject) header.from=x policy.dmarc=reject");
        assert!(v.dmarc_fail && v.reject);
        assert!(!Verdict::from_results(" spf=passed").spf_pass);
    }

    #[test]
    fn subject_tag_goes_in_front() {
        let mut m = b"From: a@x\r\nSubject: hello\r\n there\r\n\r\nbody\r\n".to_vec();
        tag_subject(&mut m, "[SPOOF?]");
        let s = String::from_utf8(m).unwrap_or_default();
        assert!(s.starts_with("Subject: [SPOOF?] hello there\r\nFrom: a@x\r\n\r\nbody"), "{s}");
    }
}
