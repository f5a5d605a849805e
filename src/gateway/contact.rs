//! A contact as the gateway stores it, and the decoded copies it keeps in
//! memory ([`ContactCache`]). The look-ups and the one write path are in the
//! `contacts` module.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use latssiam::Fingerprint;
use serde::{Deserialize, Serialize};

mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

/// Most contacts kept decoded in memory; past this the cache starts again
/// empty (contacts are the operator's list, so this is only a bound).
const CONTACT_CACHE_MAX: usize = 4096;

/// Contacts as `Store::contact` returns them, by fingerprint.
///
/// Every message to a contact reads it two or three times (`RCPT`, the end
/// of `DATA`, the delivery), and decoding the stored record (JSON with a
/// base64 certificate) was about 4 % of the gateway's CPU under the relay
/// load. `Store::apply_contact`, the one place contacts are written,
/// forgets the contact after writing it and moves the generation on, so a
/// read that began before a write never fills the cache with what it read.
#[derive(Default)]
pub(crate) struct ContactCache(Mutex<CacheState>);

#[derive(Default)]
struct CacheState {
    generation: u64,
    contacts: HashMap<Fingerprint, Contact>,
}

impl ContactCache {
    fn lock(&self) -> MutexGuard<'_, CacheState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cached contact, or the generation to [`ContactCache::fill`] with.
    pub(crate) fn get(&self, fp: &Fingerprint) -> Result<Contact, u64> {
        let state = self.lock();
        state.contacts.get(fp).cloned().ok_or(state.generation)
    }

    /// Keeps `contact`, read from the store at `generation`, unless a write came since.
    pub(crate) fn fill(&self, fp: &Fingerprint, generation: u64, contact: &Contact) {
        let mut state = self.lock();
        if state.generation != generation {
            return;
        }
        if state.contacts.len() >= CONTACT_CACHE_MAX {
            state.contacts.clear();
        }
        state.contacts.insert(*fp, contact.clone());
    }

    /// `fp`'s record was just written or removed.
    pub(crate) fn forget(&self, fp: &Fingerprint) {
        let mut state = self.lock();
        state.generation += 1;
        state.contacts.remove(fp);
    }
}

/// A person on LATSSIAM the gateway knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    /// Their LATSSIAM address (from the certificate).
    pub address: String,
    /// Their certificate, DER.
    #[serde(with = "b64")]
    pub cert: Vec<u8>,
    /// The email address that reaches them, if any (besides their LATSSIAM address).
    pub email: Option<String>,
    /// Whether they may send out through the gateway.
    pub allow_send: bool,
    /// Their server, `host[:port]`; default: the host of their address.
    pub server: Option<String>,
    /// Their server answered `38 Mailbox gone`: mail to them is refused at
    /// `RCPT` from then on (no backscatter). Adding them again clears it.
    #[serde(default)]
    pub gone: bool,
    /// WebFinger may describe them (their key and server, and the alias that
    /// reaches them): they opted in. People with a mailbox on the embedded
    /// home server are described whatever this says.
    #[serde(default)]
    pub discoverable: bool,
}

impl Contact {
    /// The fingerprint of the certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.cert)
    }

    /// The names that reach this contact, lower-cased as the name index
    /// keeps them: the LATSSIAM address and the email alias, if any.
    pub fn names(&self) -> impl Iterator<Item = String> + '_ {
        std::iter::once(&self.address).chain(self.email.as_ref()).map(|n| n.to_lowercase())
    }

    /// The host to resolve for delivery.
    pub fn server_host(&self) -> &str {
        self.server.as_deref().unwrap_or_else(|| self.address.rsplit_once('@').map_or("", |(_, h)| h))
    }
}
