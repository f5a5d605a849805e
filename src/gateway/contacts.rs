//! Contacts: the people on LATSSIAM the gateway knows, by fingerprint, and
//! the one look-up behind every delivery to them ([`Store::reach`]).

use latssiam::Fingerprint;
use serde::{Deserialize, Serialize};

use super::db::{corrupt, decode, encode, Store, StoreError};
use super::queue::Target;

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

/// What an address reaches, from [`Store::reach`].
#[derive(Debug)]
pub enum Reach {
    /// A contact: deliver to `target`.
    Contact {
        /// The delivery target.
        target: Target,
        /// The contact.
        contact: Box<Contact>,
    },
    /// A contact whose mailbox is gone (`38`): refuse, do not queue.
    Gone,
    /// Not a contact.
    Unknown,
}

impl Store {
    /// Adds or replaces a contact (by fingerprint), durably.
    ///
    /// # Errors
    /// [`StoreError`]; or an email alias already used by another contact.
    pub async fn put_contact(&self, contact: &Contact) -> Result<Result<(), String>, StoreError> {
        let fp = contact.fingerprint();
        for n in contact.names() {
            if let Some(other) = self.names.get(n.as_bytes())? {
                if other.as_ref() != fp.as_bytes() {
                    return Ok(Err(format!("{n} already belongs to another contact")));
                }
            }
        }
        self.share(&fp, Some(contact)).await?;
        self.apply_contact(&fp, Some(contact))?;
        self.durable().await?;
        Ok(Ok(()))
    }

    async fn share(&self, fp: &Fingerprint, contact: Option<&Contact>) -> Result<(), StoreError> {
        match self.shared.get() {
            Some(q) => q.share_contact(fp, contact).await,
            None => Ok(()),
        }
    }

    /// Sets (or, with `None`, removes) a contact in this store and its name
    /// index, without a flush: for the mirror of the shared contacts, which
    /// replays them at every start.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn apply_contact(&self, fp: &Fingerprint, contact: Option<&Contact>) -> Result<(), StoreError> {
        if let Some(old) = self.contact(fp)? {
            self.remove_names(&old)?;
        }
        match contact {
            Some(c) => {
                self.contacts.insert(fp.as_bytes(), encode(c))?;
                for name in c.names() {
                    self.names.insert(name.as_bytes(), fp.as_bytes())?;
                }
            }
            None => {
                self.contacts.remove(fp.as_bytes())?;
            }
        }
        Ok(())
    }

    /// Removes the names of `c` from the index, those that still point to it.
    fn remove_names(&self, c: &Contact) -> Result<(), StoreError> {
        let fp = c.fingerprint();
        for name in c.names() {
            if self.names.get(name.as_bytes())?.is_some_and(|v| v.as_ref() == fp.as_bytes()) {
                self.names.remove(name.as_bytes())?;
            }
        }
        Ok(())
    }

    /// Removes a contact; false if there was none.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn remove_contact(&self, fp: &Fingerprint) -> Result<bool, StoreError> {
        if self.contact(fp)?.is_none() {
            return Ok(false);
        }
        self.share(fp, None).await?;
        self.apply_contact(fp, None)?;
        self.durable().await?;
        Ok(true)
    }

    /// The contact with this fingerprint.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn contact(&self, fp: &Fingerprint) -> Result<Option<Contact>, StoreError> {
        self.contacts.get(fp.as_bytes())?.map(|v| decode(&v, "contact")).transpose()
    }

    /// The contact reached by this address (LATSSIAM address or email alias), case-insensitively.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn contact_by_name(&self, name: &str) -> Result<Option<(Fingerprint, Contact)>, StoreError> {
        let Some(fp) = self.names.get(name.to_lowercase().as_bytes())? else { return Ok(None) };
        let bytes: [u8; 32] = fp.as_ref().try_into().map_err(|_| corrupt("contact name index"))?;
        let fp = Fingerprint::from_bytes(bytes);
        Ok(self.contact(&fp)?.map(|c| (fp, c)))
    }

    /// Whom `address` reaches on LATSSIAM (a contact's LATSSIAM address or
    /// email alias, case-insensitively): the one lookup behind every delivery
    /// to a contact (SMTP `RCPT`, a contact's message, IRC digests and private
    /// messages), so a contact whose mailbox is gone is refused everywhere.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn reach(&self, address: &str) -> Result<Reach, StoreError> {
        Ok(match self.contact_by_name(address)? {
            None => Reach::Unknown,
            Some((_, c)) if c.gone => Reach::Gone,
            Some((fp, contact)) => Reach::Contact {
                target: Target::Latssiam { fingerprint: fp.to_string(), address: address.to_lowercase() },
                contact: Box::new(contact),
            },
        })
    }

    /// All contacts.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn contacts(&self) -> Result<Vec<Contact>, StoreError> {
        self.contacts.iter().map(|kv| decode(&kv?.1, "contact")).collect()
    }

    /// Marks a contact whose mailbox is gone (`38`), durably.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn mark_gone(&self, fp: &Fingerprint) -> Result<(), StoreError> {
        self.change_contact(fp, |c| c.gone = true).await
    }

    /// Points a contact at another server (after `35 Mailbox moved`).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn move_contact(&self, fp: &Fingerprint, server: &str) -> Result<(), StoreError> {
        self.change_contact(fp, |c| c.server = Some(server.to_owned())).await
    }

    /// Changes one contact in place; with the shared contacts by
    /// compare-and-set on the newest version (an operator may change or
    /// remove it on another node meanwhile: a removed contact stays removed).
    async fn change_contact(&self, fp: &Fingerprint, change: impl Fn(&mut Contact)) -> Result<(), StoreError> {
        let changed = match self.shared.get() {
            Some(q) => q.update_contact(fp, &change).await?,
            None => self.contact(fp)?.map(|mut c| {
                change(&mut c);
                c
            }),
        };
        if let Some(c) = changed {
            self.apply_contact(fp, Some(&c))?;
            self.durable().await?;
        }
        Ok(())
    }
}
