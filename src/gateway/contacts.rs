//! Contacts: the people on LATSSIAM the gateway knows, by fingerprint, and
//! the one look-up behind every delivery to them ([`Store::reach`]).

use latssiam::Fingerprint;

pub use super::contact::Contact;
use super::db::{corrupt, decode, encode, Store, StoreError};
use super::target::Target;

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
    /// Adds or replaces a contact (by fingerprint), durably. The check that
    /// its names are free and the write are one step: on this node under
    /// the store's contact lock, across nodes by the shared alias index.
    ///
    /// # Errors
    /// [`StoreError`]; or an email alias already used by another contact.
    pub async fn put_contact(&self, contact: &Contact) -> Result<Result<(), String>, StoreError> {
        let _writing = self.contact_writes.lock().await;
        let fp = contact.fingerprint();
        for n in contact.names() {
            if let Some(other) = self.names.get(n.as_bytes())? {
                if other.as_ref() != fp.as_bytes() {
                    return Ok(Err(format!("{n} already belongs to another contact")));
                }
            }
        }
        let revision = match self.shared.get() {
            Some(q) => match q.share_contact(&fp, Some(&encode(contact))).await? {
                Ok(r) => Some(r),
                Err(why) => return Ok(Err(why)),
            },
            None => None,
        };
        self.apply_contact(&fp, Some(contact), revision)?;
        self.durable().await?;
        Ok(Ok(()))
    }

    /// Sets (or, with `None`, removes) a contact in this store and its name
    /// index, without a flush. `revision` is the shared bucket's, for the
    /// shared contacts (the mirror replays them at every start): a revision
    /// older than the one applied last for this contact is not applied, so
    /// a late event of the mirror never undoes a newer write of this node.
    /// A name that another contact holds here is not taken from it.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn apply_contact(
        &self,
        fp: &Fingerprint,
        contact: Option<&Contact>,
        revision: Option<u64>,
    ) -> Result<(), StoreError> {
        // Held across the check, the write and the cache's forgetting: two
        // writes of one contact (the mirror's and this node's, or two
        // revisions) never interleave.
        let mut applied = self.contact_revisions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(r) = revision {
            let last = applied.entry(*fp).or_default();
            if r <= *last {
                return Ok(());
            }
            *last = r;
        }
        let written = self.write_contact(fp, contact);
        // Whatever part of the write happened, the cached copy may be stale now.
        self.contact_cache.forget(fp);
        drop(applied);
        written
    }

    fn write_contact(&self, fp: &Fingerprint, contact: Option<&Contact>) -> Result<(), StoreError> {
        // The stored record, not the cache's copy: the names to take away are the ones written.
        if let Some(old) = self.stored_contact(fp)? {
            self.remove_names(&old)?;
        }
        match contact {
            Some(c) => {
                self.contacts.insert(fp.as_bytes(), encode(c))?;
                for name in c.names() {
                    let taken = self.names.get(name.as_bytes())?.is_some_and(|v| v.as_ref() != fp.as_bytes());
                    if taken {
                        tracing::warn!(%fp, name, "A shared contact names an alias another contact holds; not taken.");
                        continue;
                    }
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
        let _writing = self.contact_writes.lock().await;
        if self.contact(fp)?.is_none() {
            return Ok(false);
        }
        let revision = match self.shared.get() {
            Some(q) => Some(q.share_contact(fp, None).await?.map_err(StoreError::Shared)?),
            None => None,
        };
        self.apply_contact(fp, None, revision)?;
        self.durable().await?;
        Ok(true)
    }

    /// The contact with this fingerprint.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn contact(&self, fp: &Fingerprint) -> Result<Option<Contact>, StoreError> {
        let generation = match self.contact_cache.get(fp) {
            Ok(contact) => return Ok(Some(contact)),
            Err(generation) => generation,
        };
        let contact = self.stored_contact(fp)?;
        if let Some(c) = &contact {
            self.contact_cache.fill(fp, generation, c);
        }
        Ok(contact)
    }

    /// The contact's record as stored, decoded (no cache).
    fn stored_contact(&self, fp: &Fingerprint) -> Result<Option<Contact>, StoreError> {
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
    async fn change_contact(
        &self,
        fp: &Fingerprint,
        change: impl Fn(&mut Contact) + Send + Sync,
    ) -> Result<(), StoreError> {
        let _writing = self.contact_writes.lock().await;
        let changed = match self.shared.get() {
            Some(q) => {
                let change = |record: &[u8]| {
                    let mut c: Contact = decode(record, "contact").ok()?;
                    change(&mut c);
                    Some(encode(&c))
                };
                match q.update_contact(fp, &change).await? {
                    Some((record, r)) => Some((decode(&record, "contact")?, Some(r))),
                    None => None,
                }
            }
            None => self.contact(fp)?.map(|mut c| {
                change(&mut c);
                (c, None)
            }),
        };
        if let Some((c, revision)) = changed {
            self.apply_contact(fp, Some(&c), revision)?;
            self.durable().await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::contact::ContactCache;

    fn contact(address: &str, email: &str, cert: &[u8]) -> Contact {
        Contact {
            address: address.into(),
            cert: cert.to_vec(),
            email: Some(email.into()),
            allow_send: false,
            server: None,
            gone: false,
            discoverable: false,
        }
    }

    #[test]
    fn a_late_shared_revision_never_undoes_a_newer_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let c = contact("a@localhost", "a@example.org", b"cert a");
        let fp = c.fingerprint();
        let gone = Contact { gone: true, ..c.clone() };
        // This node wrote revision 7 (gone); the mirror then brings revision 6 (not gone).
        store.apply_contact(&fp, Some(&gone), Some(7)).unwrap();
        store.apply_contact(&fp, Some(&c), Some(6)).unwrap();
        assert!(store.contact(&fp).unwrap().unwrap().gone);
        store.apply_contact(&fp, Some(&c), Some(8)).unwrap();
        assert!(!store.contact(&fp).unwrap().unwrap().gone);
        // A shared contact naming an alias another contact holds does not take it.
        let other = contact("b@localhost", "a@example.org", b"cert b");
        store.apply_contact(&other.fingerprint(), Some(&other), Some(9)).unwrap();
        assert_eq!(store.contact_by_name("a@example.org").unwrap().map(|(f, _)| f), Some(fp));
        assert!(store.contact_by_name("b@localhost").unwrap().is_some());
    }

    #[test]
    fn a_cached_contact_follows_every_write_and_a_racing_read_does_not_fill_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let c = contact("a@localhost", "a@example.org", b"cert a");
        let fp = c.fingerprint();
        store.apply_contact(&fp, Some(&c), None).unwrap();
        assert_eq!(store.contact(&fp).unwrap().as_ref(), Some(&c)); // now cached
        let moved = Contact { server: Some("elsewhere.example".into()), ..c.clone() };
        store.apply_contact(&fp, Some(&moved), None).unwrap();
        assert_eq!(store.contact(&fp).unwrap().as_ref(), Some(&moved));
        store.apply_contact(&fp, None, None).unwrap();
        assert_eq!(store.contact(&fp).unwrap(), None);
        assert_eq!(store.contact_by_name("a@example.org").unwrap(), None);

        // A read that missed before a write cannot put what it read back after.
        let cache = ContactCache::default();
        let Err(generation) = cache.get(&fp) else { panic!("an empty cache has nothing") };
        cache.forget(&fp);
        cache.fill(&fp, generation, &c);
        assert!(cache.get(&fp).is_err());
        let Err(generation) = cache.get(&fp) else { panic!("nothing was kept") };
        cache.fill(&fp, generation, &c);
        assert_eq!(cache.get(&fp), Ok(c));
    }
}
