//! Durable mailboxes for the reference server, in sled.
//!
//! Key layout:
//! - tree `mailboxes`: owner fingerprint (32 octets) -> mailbox record:
//!   state tag (1 active, 2 pending, 3 gone, 4 moved + u16 host length + host),
//!   then u32 length + owner certificate DER, u32 length + attestation DER.
//! - tree `messages`: owner fingerprint (32) ‖ sequence (u64 big-endian) ->
//!   sender fingerprint (32) ‖ 0xFF ‖ where its put record is (24 octets,
//!   see [`super::bodies`]). The body, in a put record of the log in
//!   `bodies/`, is u32 signature length ‖ signature DER ‖ message DER. A
//!   store written before the log kept the body in the value itself
//!   (sender ‖ body: its octet 32 is then the top octet of the signature
//!   length, 0); those are read as they are.
//! - tree `log`: `checkpoint` -> the log's checkpoint (segment u64, offset
//!   u64): the records before it need not be applied again at open.
//!
//! Invariants:
//! - Sequence numbers come from `Db::generate_id`, which is monotonic across
//!   restarts, so key order within a mailbox is arrival order (oldest first).
//! - [`Store::store_message`] and every other mutation return only after an
//!   fsync that covers the write. Concurrent callers share one fsync (group
//!   commit on a dedicated flusher thread), which is what lets many writers be
//!   durable without paying one fsync each. Storing and deleting a message
//!   sync only the log (its records are applied to `messages` again at open
//!   if sled had not written them); the other mutations flush sled too.
//! - Deleting a message removes its key; nothing else refers to it (no
//!   history). Its body stays in its segment until the segment holds no
//!   live body (see [`super::bodies`] for when segments go).
//! - The in-memory unread counts (per mailbox, per sender) are rebuilt from
//!   `messages` at open and kept in step with every insert and delete.
//! - Offers (in memory only): a message handed to one `ACCEPT`
//!   ([`Store::offer_oldest`]) is held by that session's [`Offer`] and skipped
//!   by every other `ACCEPT` of the mailbox until the offer is answered (the
//!   message is deleted first, then the offer let go) or dropped unanswered
//!   (let go, and waiting `ACCEPT`s woken, so it is offered again: delivery
//!   stays at-least-once). A session holds at most one offer at a time, so
//!   the set holds at most one entry per live session. A restart forgets
//!   every offer, which is the same as every session having ended.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::bodies::{decode_position, encode_position, Bodies, Opening, Pointer, Record};
use crate::group_commit::{FlushError, GroupCommit};

use crate::fingerprint::Fingerprint;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// sled failed (I/O, or the data directory is locked by another process).
    #[error("mailbox store: {0}")]
    Sled(#[from] sled::Error),
    /// A message body cannot be written or read.
    #[error("mailbox store, message bodies: {0}")]
    Bodies(#[from] std::io::Error),
    /// A record does not decode.
    #[error("mailbox store is corrupt: {0}")]
    Corrupt(&'static str),
    /// The flusher thread is gone.
    #[error("mailbox store is shutting down")]
    Closed,
}

/// Where a mailbox stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MailboxState {
    /// Receives messages.
    Active,
    /// Registered, waiting for the operator's approval.
    Pending,
    /// Deregistered: `SEND` gets `38`.
    Gone,
    /// Moved to another host: `SEND` gets `35 Mailbox moved <host>`.
    Moved(String),
}

impl MailboxState {
    /// A short name for listings.
    pub fn name(&self) -> String {
        match self {
            MailboxState::Active => "active".into(),
            MailboxState::Pending => "pending".into(),
            MailboxState::Gone => "gone".into(),
            MailboxState::Moved(h) => format!("moved to {h}"),
        }
    }
}

/// A mailbox record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    /// Where it stands.
    pub state: MailboxState,
    /// The owner's certificate, DER.
    pub owner_cert: Vec<u8>,
    /// The owner's attestation of the server's key, DER.
    pub attestation: Vec<u8>,
}

/// The address (lower case) a certificate names, if any.
fn owner_address(cert: &[u8]) -> Option<String> {
    crate::identity::CertInfo::from_der(cert).ok()?.address.map(|a| a.to_string().to_ascii_lowercase())
}

/// A stored message, as `ACCEPT` hands it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Its sequence number in the mailbox.
    pub id: u64,
    /// Who sent it (the TLS client certificate of the `SEND`).
    pub sender: Fingerprint,
    /// The sender's detached signature, if one came with it.
    pub signature: Option<Vec<u8>>,
    /// The `ENCRYPTED MESSAGE` DER.
    pub message: Vec<u8>,
}

#[derive(Default)]
struct Counts {
    total: HashMap<Fingerprint, u32>,
    per_sender: HashMap<(Fingerprint, Fingerprint), u32>,
}

impl Counts {
    fn add(&mut self, owner: Fingerprint, sender: Fingerprint) {
        *self.total.entry(owner).or_default() += 1;
        *self.per_sender.entry((owner, sender)).or_default() += 1;
    }

    fn remove(&mut self, owner: Fingerprint, sender: Fingerprint) {
        if let Some(n) = self.total.get_mut(&owner) {
            *n = n.saturating_sub(1);
        }
        if let Some(n) = self.per_sender.get_mut(&(owner, sender)) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_sender.remove(&(owner, sender));
            }
        }
    }
}

/// The server's durable state.
pub struct Store {
    db: sled::Db,
    mailboxes: sled::Tree,
    messages: sled::Tree,
    counts: Mutex<Counts>,
    flusher: Arc<GroupCommit>,
    waiters: Mutex<HashMap<Fingerprint, Arc<Notify>>>,
    /// (owner, message id) of every message offered to a session that has not
    /// answered yet: one entry per live [`Offer`].
    offered: Mutex<HashSet<(Fingerprint, u64)>>,
    /// Owner address (lower case) -> the fingerprints of every mailbox
    /// record naming it (old keys too): built at open, kept by
    /// [`Store::put_mailbox`].
    by_address: Mutex<HashMap<String, Vec<Fingerprint>>>,
    bodies: Arc<Bodies>,
    /// The log's checkpoint, in sled.
    log_meta: sled::Tree,
    /// Syncs the log alone, for stores and deletes.
    log_commit: GroupCommit,
    /// Stops the compaction thread when dropped; joined on drop.
    compactor: Mutex<Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>>,
    /// Activations of a mailbox begun, written, and known flushed (see
    /// [`Store::commit`]).
    activations: Activations,
}

/// How the body log is kept.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tuning {
    /// A segment of bodies is started when the active one would pass this.
    pub(crate) segment_limit: u64,
    /// A sealed segment is compacted only this long after it was sealed, so
    /// that the bodies of messages about to be taken are not copied.
    pub(crate) grace: Duration,
    /// Whether a thread writes checkpoints and compacts (tests call
    /// [`Store::durable`] and [`compact`] themselves).
    pub(crate) compactor: bool,
}

impl Default for Tuning {
    fn default() -> Self {
        Self { segment_limit: 16 << 20, grace: Duration::from_secs(60), compactor: true }
    }
}

/// Octet 32 of a `messages` value whose body is in the body log.
const LOGGED: u8 = 0xFF;

/// Where a message's body is.
enum Held<'a> {
    /// In the value (a store written before the body log).
    Inline(&'a [u8]),
    /// In a segment.
    Logged(Pointer),
}

/// A `messages` value: the sender, and where the body is.
fn parse_value(value: &[u8]) -> Result<(Fingerprint, Held<'_>), StoreError> {
    let sender = fingerprint_from(value.get(..32).ok_or(StoreError::Corrupt("message sender"))?)?;
    let rest = value.get(32..).ok_or(StoreError::Corrupt("message"))?;
    match rest.split_first() {
        Some((&LOGGED, pointer)) => {
            Ok((sender, Held::Logged(Pointer::decode(pointer).ok_or(StoreError::Corrupt("body pointer"))?)))
        }
        _ => Ok((sender, Held::Inline(rest))),
    }
}

fn logged_value(sender: &Fingerprint, pointer: &Pointer) -> [u8; 33 + Pointer::LEN] {
    let mut value = [0u8; 33 + Pointer::LEN];
    value[..32].copy_from_slice(sender.as_bytes());
    value[32] = LOGGED;
    value[33..].copy_from_slice(&pointer.encode());
    value
}

fn message_key(owner: &Fingerprint, id: u64) -> [u8; 40] {
    let mut key = [0u8; 40];
    key[..32].copy_from_slice(owner.as_bytes());
    key[32..].copy_from_slice(&id.to_be_bytes());
    key
}

fn fingerprint_from(bytes: &[u8]) -> Result<Fingerprint, StoreError> {
    let arr: [u8; 32] = bytes.try_into().map_err(|_| StoreError::Corrupt("fingerprint length"))?;
    Ok(Fingerprint::from_bytes(arr))
}

fn owner_of(key: &[u8]) -> Result<Fingerprint, StoreError> {
    fingerprint_from(key.get(..32).ok_or(StoreError::Corrupt("message key"))?)
}

/// The sequence number in a `messages` key.
fn id_of(key: &[u8]) -> Result<u64, StoreError> {
    key.get(32..40).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).ok_or(StoreError::Corrupt("message key"))
}

fn decode_message(key: &[u8], sender: Fingerprint, body: &[u8]) -> Result<StoredMessage, StoreError> {
    let id = id_of(key)?;
    let mut r = Reader(body);
    let sig = r.chunk32()?;
    Ok(StoredMessage { id, sender, signature: (!sig.is_empty()).then(|| sig.to_vec()), message: r.0.to_vec() })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.0.len() < n {
            return Err(StoreError::Corrupt("record too short"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn chunk32(&mut self) -> Result<&'a [u8], StoreError> {
        let len = self.take(4)?;
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        self.take(len)
    }
}

fn push32(out: &mut Vec<u8>, bytes: &[u8]) {
    // Certificates and messages are far below 4 GiB (the wire caps them at 19,200 octets).
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(bytes);
}

impl Mailbox {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.owner_cert.len() + self.attestation.len() + 16);
        match &self.state {
            MailboxState::Active => out.push(1),
            MailboxState::Pending => out.push(2),
            MailboxState::Gone => out.push(3),
            MailboxState::Moved(host) => {
                out.push(4);
                out.extend_from_slice(&u16::try_from(host.len()).unwrap_or(0).to_be_bytes());
                out.extend_from_slice(host.as_bytes());
            }
        }
        push32(&mut out, &self.owner_cert);
        push32(&mut out, &self.attestation);
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let mut r = Reader(bytes);
        let state = match r.take(1)?[0] {
            1 => MailboxState::Active,
            2 => MailboxState::Pending,
            3 => MailboxState::Gone,
            4 => {
                let len = r.take(2)?;
                let host = r.take(usize::from(u16::from_be_bytes([len[0], len[1]])))?;
                MailboxState::Moved(String::from_utf8(host.to_vec()).map_err(|_| StoreError::Corrupt("host"))?)
            }
            _ => return Err(StoreError::Corrupt("mailbox state")),
        };
        let owner_cert = r.chunk32()?.to_vec();
        let attestation = r.chunk32()?.to_vec();
        Ok(Self { state, owner_cert, attestation })
    }
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    ///
    /// # Errors
    /// [`StoreError::Sled`] if sled cannot open it (for example another
    /// process holds it), [`StoreError::Corrupt`] if a message does not decode.
    pub fn open(dir: &Path) -> Result<Arc<Self>, StoreError> {
        Self::open_tuned(dir, Tuning::default())
    }

    /// As [`Store::open`], tuned.
    pub(crate) fn open_tuned(dir: &Path, tuning: Tuning) -> Result<Arc<Self>, StoreError> {
        let db = crate::group_commit::open_db(dir)?;
        let flusher =
            GroupCommit::start(db.clone(), "latssiam-flusher").map_err(|e| StoreError::Sled(sled::Error::Io(e)))?;
        Self::in_db_tuned(db, Arc::new(flusher), "", &dir.join("bodies"), tuning)
    }

    /// Opens the store in trees of an open database, named with `prefix`,
    /// and makes it durable through `flusher` (which flushes `db`): a program
    /// that keeps its own state in `db` then shares every fsync with the
    /// server (one seal and one fsync of the log for both).
    ///
    /// Message bodies go to segment files in `bodies` (a directory of
    /// their own, created if need be), made durable by the same flusher
    /// just before it flushes `db`.
    ///
    /// # Errors
    /// As [`Store::open`], and [`StoreError::Bodies`] if `bodies` cannot be
    /// read or a segment created.
    pub fn in_db(
        db: sled::Db,
        flusher: Arc<GroupCommit>,
        prefix: &str,
        bodies: &Path,
    ) -> Result<Arc<Self>, StoreError> {
        Self::in_db_tuned(db, flusher, prefix, bodies, Tuning::default())
    }

    fn in_db_tuned(
        db: sled::Db,
        flusher: Arc<GroupCommit>,
        prefix: &str,
        bodies: &Path,
        tuning: Tuning,
    ) -> Result<Arc<Self>, StoreError> {
        let mailboxes = db.open_tree(format!("{prefix}mailboxes"))?;
        let messages = db.open_tree(format!("{prefix}messages"))?;
        let log_meta = db.open_tree(format!("{prefix}log"))?;
        let from = match log_meta.get(CHECKPOINT)? {
            Some(v) => decode_position(&v).ok_or(StoreError::Corrupt("log checkpoint"))?,
            None => (0, 0),
        };
        let mut counts = Counts::default();
        let mut opening = Opening::scan(bodies)?;
        opening.replay(from, |record| {
            let insert = |key: [u8; 40], sender: [u8; 32], pointer: Pointer| {
                messages.insert(key, &logged_value(&Fingerprint::from_bytes(sender), &pointer)[..]).map(|_| ())
            };
            match record {
                Record::Put { key, sender, pointer } => insert(key, sender, pointer),
                Record::Move { key, sender, pointer } => match messages.contains_key(key) {
                    Ok(true) => insert(key, sender, pointer),
                    other => other.map(|_| ()),
                },
                Record::Delete { key } => messages.remove(key).map(|_| ()),
            }
            .map_err(std::io::Error::other)
        })?;
        // One pass over the mailbox records for the address index and for
        // the gone mailboxes. Messages left in a gone mailbox (a
        // deregistration whose deletes failed part way, or a message taken
        // back whose delete had not reached the disk at a crash): nobody can
        // read them. A record that does not decode is left out of both, not
        // fatal: reading it answers `53`, its messages stay, and the other
        // mailboxes are served.
        let mut by_address = HashMap::new();
        let mut gone = HashSet::new();
        for kv in mailboxes.iter() {
            let (k, v) = kv?;
            let Ok(mailbox) = Mailbox::decode(&v) else {
                tracing::warn!("A mailbox record does not decode; left out of the address index.");
                continue;
            };
            let Ok(fp) = fingerprint_from(&k) else { continue };
            if mailbox.state == MailboxState::Gone {
                gone.insert(fp);
            }
            if let Some(address) = owner_address(&mailbox.owner_cert) {
                by_address.entry(address).or_insert_with(Vec::new).push(fp);
            }
        }
        let mut orphans = Vec::new();
        let mut refused = Vec::new();
        for kv in messages.iter() {
            let (k, v) = kv?;
            let (sender, held) = parse_value(&v)?;
            if gone.contains(&owner_of(&k)?) {
                orphans.push(k);
                continue;
            }
            if let Held::Logged(pointer) = held {
                if !opening.holds(&pointer)? {
                    refused.push(k);
                    continue;
                }
            }
            counts.add(owner_of(&k)?, sender);
        }
        if !refused.is_empty() {
            // Records appended after the last sync whose pointers sled
            // wrote on its own: never acknowledged.
            tracing::info!(
                "{} stored messages were cut off by a crash before they were acknowledged; they are removed.",
                refused.len(),
            );
            for k in refused {
                messages.remove(k)?;
            }
        }
        if !orphans.is_empty() {
            tracing::info!("{} messages left in deregistered mailboxes are removed.", orphans.len());
            for k in orphans {
                messages.remove(k)?;
            }
        }
        db.flush()?;
        let bodies = Arc::new(opening.start(from, tuning.segment_limit, tuning.grace)?);
        let start = bodies.start_position();
        write_checkpoint(&log_meta, start)?;
        db.flush()?;
        bodies.checkpointed(start);
        let synced = Arc::clone(&bodies);
        flusher.before_flush(Arc::new(move || synced.sync()));
        let synced = Arc::clone(&bodies);
        let log_commit = GroupCommit::start_with("latssiam-log", move || synced.sync())
            .map_err(|e| StoreError::Sled(sled::Error::Io(e)))?;
        let compactor = if tuning.compactor {
            let keeper = Keeper { db: db.clone(), messages: messages.clone(), log_meta: log_meta.clone(), last: None };
            Some(spawn_housekeeper(keeper, Arc::clone(&bodies), tuning.grace)?)
        } else {
            None
        };
        Ok(Arc::new(Self {
            db,
            mailboxes,
            messages,
            counts: Mutex::new(counts),
            flusher,
            waiters: Mutex::default(),
            offered: Mutex::default(),
            by_address: Mutex::new(by_address),
            bodies,
            log_meta,
            log_commit,
            compactor: Mutex::new(compactor),
            activations: Activations::default(),
        }))
    }

    /// Waits until everything written so far is on disk.
    ///
    /// # Errors
    /// [`StoreError::Sled`] if the fsync failed, [`StoreError::Closed`] if the flusher is gone.
    pub async fn durable(&self) -> Result<(), StoreError> {
        // The flush makes sled hold every record before the candidate.
        let checkpoint = self.bodies.checkpoint_candidate();
        write_checkpoint(&self.log_meta, checkpoint)?;
        // Segments emptied before this flush may go once it is done.
        let doomed = self.bodies.take_doomed();
        // Every activation written before the flush starts is in it.
        let activations = self.activations.written.load(Ordering::SeqCst);
        let result = self.flusher.durable().await.map_err(flush_error);
        if result.is_ok() {
            self.bodies.checkpointed(checkpoint);
            self.activations.flushed.fetch_max(activations, Ordering::SeqCst);
        }
        self.bodies.reap(doomed, result.is_ok());
        result
    }

    /// Waits until every message stored or deleted so far is durable: one
    /// fdatasync of the log, shared by concurrent callers (sled is written
    /// in its own time, and brought up to date from the log at open). What
    /// [`Store::insert_message`] needs before [`Store::publish_message`].
    ///
    /// While a record that made a mailbox active (a registration, an
    /// approval) is not known to be flushed, this is the full
    /// [`Store::durable`] instead: the message may have been let in by that
    /// record, and must not be acknowledged before the record is on disk
    /// (after a power cut it would be kept for a mailbox that was never
    /// active). "Known" means a flush that began after the record was
    /// written has succeeded: if the activation's own flush failed or its
    /// caller went away, the next full flush settles it, which is the first
    /// commit after.
    ///
    /// A client who registers over and over puts others' commits on the
    /// full flush during each of its own flushes: they share those flushes
    /// (group commit), which the registrations cost anyway.
    ///
    /// # Errors
    /// [`StoreError::Sled`] if the fdatasync failed, [`StoreError::Closed`]
    /// if the flusher is gone.
    pub async fn commit(&self) -> Result<(), StoreError> {
        // `begun` is raised before the record is written, so a caller that
        // read the record sees it raised here.
        if self.activations.begun.load(Ordering::SeqCst) > self.activations.flushed.load(Ordering::SeqCst) {
            return self.durable().await;
        }
        let doomed = self.bodies.take_doomed();
        let result = self.log_commit.durable().await.map_err(flush_error);
        self.bodies.reap(doomed, result.is_ok());
        result
    }

    /// The mailbox of `owner`, if one was ever registered.
    ///
    /// # Errors
    /// [`StoreError`] if the record cannot be read.
    pub fn mailbox(&self, owner: &Fingerprint) -> Result<Option<Mailbox>, StoreError> {
        self.mailboxes.get(owner.as_bytes())?.map(|v| Mailbox::decode(&v)).transpose()
    }

    /// Writes a mailbox record durably.
    ///
    /// # Errors
    /// [`StoreError`] if the write or the fsync fails.
    pub async fn put_mailbox(&self, owner: &Fingerprint, mailbox: &Mailbox) -> Result<(), StoreError> {
        // Only an active mailbox lets messages in (see `Store::commit`).
        let activation = (mailbox.state == MailboxState::Active).then(|| self.activations.begin());
        let written = self.mailboxes.insert(owner.as_bytes(), mailbox.encode());
        if let Some(activation) = activation {
            // Counted written even if the write failed: it may have happened.
            self.activations.written(activation);
        }
        written?;
        if let Some(address) = owner_address(&mailbox.owner_cert) {
            let mut index = self.by_address.lock().unwrap_or_else(|e| e.into_inner());
            let holders = index.entry(address).or_default();
            if !holders.contains(owner) {
                holders.push(*owner);
            }
        }
        self.durable().await
    }

    /// The certificate (DER) of the active mailbox of `address`
    /// (`mailbox@host`, any case), if there is one: what the Gemini capsule
    /// and WebFinger serve. A pending, moved or deregistered mailbox has none.
    ///
    /// # Errors
    /// [`StoreError`] if the record cannot be read.
    pub fn active_certificate(&self, address: &str) -> Result<Option<Vec<u8>>, StoreError> {
        for fp in self.holders(address) {
            if let Some(m) = self.mailbox(&fp)?.filter(|m| m.state == MailboxState::Active) {
                return Ok(Some(m.owner_cert));
            }
        }
        Ok(None)
    }

    /// Whether a mailbox other than `owner`'s that is active or pending
    /// names `address`: then `owner` may not register it (one address, one
    /// certificate, or the capsule and WebFinger could be made to serve an
    /// impostor's).
    ///
    /// # Errors
    /// [`StoreError`] if a record cannot be read.
    pub fn address_taken(&self, address: &str, owner: &Fingerprint) -> Result<bool, StoreError> {
        for fp in self.holders(address).into_iter().filter(|fp| fp != owner) {
            if self.mailbox(&fp)?.is_some_and(|m| matches!(m.state, MailboxState::Active | MailboxState::Pending)) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn holders(&self, address: &str) -> Vec<Fingerprint> {
        let index = self.by_address.lock().unwrap_or_else(|e| e.into_inner());
        index.get(&address.to_ascii_lowercase()).cloned().unwrap_or_default()
    }

    /// Changes a mailbox's state (operator approval, move). Returns false if there is no such mailbox.
    ///
    /// # Errors
    /// [`StoreError`] if the write or the fsync fails.
    pub async fn set_state(&self, owner: &Fingerprint, state: MailboxState) -> Result<bool, StoreError> {
        let Some(mut mailbox) = self.mailbox(owner)? else {
            return Ok(false);
        };
        mailbox.state = state;
        self.put_mailbox(owner, &mailbox).await?;
        Ok(true)
    }

    /// Every mailbox with the number of messages waiting in it.
    ///
    /// # Errors
    /// [`StoreError`] if a record cannot be read.
    pub fn list(&self) -> Result<Vec<(Fingerprint, Mailbox, u32)>, StoreError> {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        self.mailboxes
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let fp = fingerprint_from(&k)?;
                Ok((fp, Mailbox::decode(&v)?, counts.total.get(&fp).copied().unwrap_or(0)))
            })
            .collect()
    }

    /// Unread messages in `owner`'s mailbox: in all, and from `sender`.
    pub fn unread(&self, owner: &Fingerprint, sender: &Fingerprint) -> (u32, u32) {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        (counts.total.get(owner).copied().unwrap_or(0), counts.per_sender.get(&(*owner, *sender)).copied().unwrap_or(0))
    }

    /// Stores a message durably and wakes any `ACCEPT` waiting on the mailbox.
    ///
    /// # Errors
    /// [`StoreError`] if the write or the fsync fails; then nothing may be acknowledged.
    pub async fn store_message(
        &self,
        owner: &Fingerprint,
        sender: &Fingerprint,
        signature: Option<&[u8]>,
        message: &[u8],
    ) -> Result<u64, StoreError> {
        let id = self.insert_message(owner, sender, signature, message)?;
        self.commit_and_publish(owner, id).await?;
        Ok(id)
    }

    /// Makes a message written by [`Store::insert_message`] durable
    /// ([`Store::commit`]) and publishes it; if that fails, takes it back
    /// out so that it is neither delivered nor counted.
    ///
    /// # Errors
    /// [`StoreError`] if the fsync fails; then nothing may be acknowledged.
    pub async fn commit_and_publish(&self, owner: &Fingerprint, id: u64) -> Result<(), StoreError> {
        if let Err(e) = self.commit().await {
            self.discard_message(owner, id);
            return Err(e);
        }
        self.publish_message(owner, id);
        Ok(())
    }

    /// Writes a message (counted at once) without making it durable, and
    /// hidden from `ACCEPT` (as if offered to a session) until
    /// [`Store::publish_message`]: the caller makes it durable with
    /// [`Store::commit`] (or a flush of the shared database) and publishes
    /// it, or takes it back with [`Store::discard_message`] if that failed.
    /// So nothing is handed out before it is on disk.
    ///
    /// # Errors
    /// [`StoreError`] if the write fails.
    pub fn insert_message(
        &self,
        owner: &Fingerprint,
        sender: &Fingerprint,
        signature: Option<&[u8]>,
        message: &[u8],
    ) -> Result<u64, StoreError> {
        let id = self.db.generate_id()?;
        let sig = signature.unwrap_or_default();
        let mut body = Vec::with_capacity(4 + sig.len() + message.len());
        push32(&mut body, sig);
        body.extend_from_slice(message);
        let key = message_key(owner, id);
        let pointer = self.bodies.put(&key, sender.as_bytes(), &body)?;
        self.lock_offered().insert((*owner, id));
        // Counted before it is visible, so that a removal that finds it
        // (a deregistration's scan, at any moment after the insert) takes
        // back a count that is there.
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).add(*owner, *sender);
        let inserted = self.messages.insert(key, &logged_value(sender, &pointer)[..]);
        if inserted.is_err() {
            self.counts.lock().unwrap_or_else(|e| e.into_inner()).remove(*owner, *sender);
            self.lock_offered().remove(&(*owner, id));
            self.bodies.release(&pointer);
            // So that the put is not applied at open; if this fails too
            // the log refuses writes, and the put was never acknowledged.
            if let Ok(delete) = self.bodies.delete(&key) {
                self.bodies.applied(&delete);
            }
        }
        self.bodies.applied(&pointer);
        inserted?;
        Ok(id)
    }

    /// A message written by [`Store::insert_message`] is durable: `ACCEPT`
    /// may hand it out now, and waiting ones are woken.
    pub fn publish_message(&self, owner: &Fingerprint, id: u64) {
        self.lock_offered().remove(&(*owner, id));
        self.notifier(owner).notify_waiters();
    }

    /// Takes back a message written by [`Store::insert_message`] that was
    /// not acknowledged. If even that fails (the store refuses writes), it
    /// stays hidden from `ACCEPT` until the process ends.
    pub fn discard_message(&self, owner: &Fingerprint, id: u64) {
        if self.remove_message(owner, id).is_ok() {
            self.lock_offered().remove(&(*owner, id));
        }
    }

    /// The oldest message in `owner`'s mailbox, offered or not (see
    /// [`Store::offer_oldest`] for what `ACCEPT` hands out).
    ///
    /// # Errors
    /// [`StoreError`] if it cannot be read.
    pub fn oldest(&self, owner: &Fingerprint) -> Result<Option<StoredMessage>, StoreError> {
        for kv in self.messages.scan_prefix(owner.as_bytes()) {
            let (k, v) = kv?;
            if let Some(message) = self.read_message(&k, v)? {
                return Ok(Some(message));
            }
        }
        Ok(None)
    }

    /// Offers the oldest message of `owner`'s mailbox that no other session
    /// holds an offer for: the message, and the [`Offer`] that keeps it from
    /// every other caller until it is answered or dropped.
    ///
    /// # Errors
    /// [`StoreError`] if the mailbox cannot be read.
    pub fn offer_oldest(self: &Arc<Self>, owner: &Fingerprint) -> Result<Option<(StoredMessage, Offer)>, StoreError> {
        for key in self.messages.scan_prefix(owner.as_bytes()).keys() {
            let key = key?;
            let id = id_of(&key)?;
            if !self.lock_offered().insert((*owner, id)) {
                continue; // Offered to another session.
            }
            let offer = Offer { store: Arc::clone(self), owner: *owner, id, answered: false };
            // Read it again now that it is ours: the session that held it
            // before may have answered (deleted it, then let go) since the scan saw it.
            match self.messages.get(&key)? {
                Some(value) => match self.read_message(&key, value)? {
                    Some(message) => return Ok(Some((message, offer))),
                    None => offer.forget(),
                },
                None => offer.forget(),
            }
        }
        Ok(None)
    }

    fn lock_offered(&self) -> std::sync::MutexGuard<'_, HashSet<(Fingerprint, u64)>> {
        self.offered.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How many messages are offered to sessions that have not answered yet.
    pub fn offered(&self) -> usize {
        self.lock_offered().len()
    }

    /// The message under `key`, whose value was `value`, with its body. If
    /// a compaction moved the body (and its old segment is gone) since
    /// `value` was read, the value is read again; `None` if the message
    /// was deleted meanwhile, or if its body is not what was written (then
    /// it is removed, logged as an error: kept, it would stop its mailbox
    /// for good).
    fn read_message(&self, key: &[u8], mut value: sled::IVec) -> Result<Option<StoredMessage>, StoreError> {
        // A body moves at most once per compaction: three reads cover a move
        // racing the first read, and more means something is wrong.
        for _ in 0..3 {
            let (sender, held) = parse_value(&value)?;
            let pointer = match held {
                Held::Inline(body) => return decode_message(key, sender, body).map(Some),
                Held::Logged(pointer) => pointer,
            };
            match self.bodies.read(key, &pointer) {
                Ok(body) => return decode_message(key, sender, &body).map(Some),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => match self.messages.get(key)? {
                    Some(again) if again != value => value = again,
                    Some(_) => return Err(e.into()),
                    None => return Ok(None),
                },
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    tracing::error!("A stored message's body is damaged ({e}); the message is removed.");
                    if let Ok(id) = id_of(key) {
                        self.remove_message(&owner_of(key)?, id)?;
                    }
                    return Ok(None);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Corrupt("a message body that keeps moving"))
    }

    fn remove_message(&self, owner: &Fingerprint, id: u64) -> Result<bool, StoreError> {
        let key = message_key(owner, id);
        if !self.messages.contains_key(key)? {
            return Ok(false);
        }
        // Logged first (in flight until the removal is made, so that no
        // checkpoint passes it before a flush has seen the removal): if the
        // log takes no more, nothing has changed.
        let delete = self.bodies.delete(&key)?;
        let removed = self.messages.remove(key);
        self.bodies.applied(&delete);
        match removed? {
            Some(v) => {
                let (sender, held) = parse_value(&v)?;
                if let Held::Logged(pointer) = held {
                    self.bodies.release(&pointer);
                }
                self.counts.lock().unwrap_or_else(|e| e.into_inner()).remove(*owner, sender);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Deletes a delivered (or refused) message durably.
    ///
    /// # Errors
    /// [`StoreError`] if the delete or the fsync fails.
    pub async fn delete_message(&self, owner: &Fingerprint, id: u64) -> Result<(), StoreError> {
        if self.remove_message(owner, id)? {
            self.commit().await?;
        }
        Ok(())
    }

    /// Marks a mailbox gone and deletes its messages, durably. On a mailbox
    /// already gone, deletes what an earlier deregistration left (one whose
    /// deletes failed part way), and flushes only if there was any.
    ///
    /// # Errors
    /// [`StoreError`] if a write or the fsync fails.
    pub async fn deregister(&self, owner: &Fingerprint) -> Result<bool, StoreError> {
        let Some(mut mailbox) = self.mailbox(owner)? else {
            return Ok(false);
        };
        let was_gone = mailbox.state == MailboxState::Gone;
        if !was_gone {
            // Gone before the messages are deleted: a `SEND` that writes one
            // after the scan sees the state and takes it back
            // (`Shared::insert_while_active`). Each side writes, then reads
            // what the other wrote; sled's writes and reads go through
            // SeqCst atomics (and crossbeam-epoch's SeqCst fence), so one of
            // the two reads sees the other's write.
            mailbox.state = MailboxState::Gone;
            self.mailboxes.insert(owner.as_bytes(), mailbox.encode())?;
        }
        let ids: Vec<u64> = self
            .messages
            .scan_prefix(owner.as_bytes())
            .keys()
            .filter_map(|k| k.ok().and_then(|k| id_of(&k).ok()))
            .collect();
        let mut removed = false;
        for id in ids {
            removed |= self.remove_message(owner, id)?;
        }
        if !was_gone || removed {
            self.durable().await?;
        }
        self.notifier(owner).notify_waiters();
        Ok(true)
    }

    /// The wake-up signal of `owner`'s mailbox, for long-polling `ACCEPT`s.
    pub fn notifier(&self, owner: &Fingerprint) -> Arc<Notify> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner()).entry(*owner).or_default().clone()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.compactor.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            drop(stop);
            let _ = thread.join();
        }
    }
}

/// What the housekeeping thread needs of the store.
struct Keeper {
    db: sled::Db,
    messages: sled::Tree,
    log_meta: sled::Tree,
    /// The checkpoint it wrote last: an idle store is not flushed again.
    last: Option<super::bodies::Position>,
}

impl Keeper {
    /// Writes a checkpoint and flushes sled, so that fewer records are
    /// applied again at open and segments whose deletes are no longer needed
    /// can go; then unlinks those.
    fn checkpoint(&mut self, bodies: &Bodies) -> Result<(), StoreError> {
        let checkpoint = bodies.checkpoint_candidate();
        if self.last == Some(checkpoint) {
            return Ok(());
        }
        write_checkpoint(&self.log_meta, checkpoint)?;
        self.db.flush()?;
        bodies.checkpointed(checkpoint);
        self.last = Some(checkpoint);
        let doomed = bodies.take_doomed();
        let synced = bodies.sync();
        bodies.reap(doomed, synced.is_ok());
        Ok(synced?)
    }
}

/// Starts the thread that writes checkpoints and compacts sparse segments:
/// it looks every `grace` (within 50 ms and 1 s) and stops when its sender
/// is dropped.
fn spawn_housekeeper(
    mut keeper: Keeper,
    bodies: Arc<Bodies>,
    grace: Duration,
) -> Result<(mpsc::Sender<()>, std::thread::JoinHandle<()>), StoreError> {
    let (stop, stopped) = mpsc::channel::<()>();
    let tick = grace.clamp(Duration::from_millis(50), Duration::from_secs(1));
    let thread = std::thread::Builder::new().name("latssiam-log-keeper".into()).spawn(move || {
        let stopping = || matches!(stopped.try_recv(), Err(mpsc::TryRecvError::Disconnected));
        while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(tick) {
            if let Err(e) = keeper.checkpoint(&bodies) {
                tracing::warn!("Writing the message log's checkpoint failed (tried again later): {e}");
            }
            if let Err(e) = compact(&keeper.messages, &bodies, &stopping) {
                tracing::warn!("Compacting the message log failed (tried again later): {e}");
            }
        }
    })?;
    Ok((stop, thread))
}

/// Counts of the mailbox records that made a mailbox active: `begun`
/// before each is written, `written` after, and `flushed` the `written` a
/// successful full flush read before it began. `written <= begun` always;
/// when `flushed == begun`, every such record a reader could have seen is
/// on disk.
#[derive(Default)]
struct Activations {
    begun: AtomicU64,
    written: AtomicU64,
    flushed: AtomicU64,
}

/// One activation between [`Activations::begin`] and [`Activations::written`].
struct Activation;

impl Activations {
    fn begin(&self) -> Activation {
        self.begun.fetch_add(1, Ordering::SeqCst);
        Activation
    }

    fn written(&self, _: Activation) {
        self.written.fetch_add(1, Ordering::SeqCst);
    }
}

fn flush_error(e: FlushError) -> StoreError {
    match e {
        FlushError::Closed => StoreError::Closed,
        other => StoreError::Sled(sled::Error::Io(std::io::Error::other(other))),
    }
}

/// The key of the log's checkpoint in the `log` tree.
const CHECKPOINT: &[u8] = b"checkpoint";

/// Writes `checkpoint` unless a later one is there: the housekeeping thread
/// and [`Store::durable`] each take a candidate and write it, in either
/// order, and the checkpoint must never go back to before a segment that
/// was unlinked once it was passed.
fn write_checkpoint(log_meta: &sled::Tree, checkpoint: super::bodies::Position) -> sled::Result<()> {
    log_meta.update_and_fetch(CHECKPOINT, |old| {
        let old = old.and_then(decode_position);
        Some(encode_position(old.map_or(checkpoint, |old| old.max(checkpoint))).to_vec())
    })?;
    Ok(())
}

/// Moves the live bodies of every sparse segment to the active one: copies
/// them, syncs the copies, and only then moves each pointer by
/// compare-and-swap (sled may write a pointer to disk at any moment, and it
/// must never name a copy that is not durable). A message deleted meanwhile
/// stays deleted, and its copy is released. Each emptied segment goes after
/// the next flush. Stops early when `stopping` says so. Returns how many
/// bodies moved.
fn compact(messages: &sled::Tree, bodies: &Bodies, stopping: &dyn Fn() -> bool) -> Result<usize, StoreError> {
    let sparse = bodies.sparse();
    if sparse.is_empty() {
        return Ok(0);
    }
    let mut copies = Vec::new();
    let copied = (|| {
        for kv in messages.iter() {
            if stopping() {
                break;
            }
            let (key, value) = kv?;
            let Ok((sender, Held::Logged(pointer))) = parse_value(&value) else {
                continue;
            };
            if !sparse.contains(&pointer.segment()) {
                continue;
            }
            let Ok(key_array) = <[u8; 40]>::try_from(&key[..]) else {
                continue;
            };
            let body = match bodies.read(&key, &pointer) {
                Ok(body) => body,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                // Damaged: left where it is, and its segment not tried again.
                Err(e) => {
                    tracing::warn!("A stored body cannot be moved ({e}); its segment is left as it is.");
                    bodies.stuck(pointer.segment());
                    continue;
                }
            };
            let copy = bodies.moved(&key_array, sender.as_bytes(), &body)?;
            copies.push((key_array, sender, value, pointer, copy));
        }
        bodies.sync()
    })();
    if let Err(e) = copied {
        // Not one pointer moved. The moves in the log hold the bodies their
        // messages have, and are applied at open only to messages still there.
        for (_, _, _, _, copy) in &copies {
            bodies.release(copy);
            bodies.applied(copy);
        }
        return Err(e.into());
    }
    let mut moved = 0;
    let mut failed = None;
    for (key, sender, value, pointer, copy) in copies {
        match messages.compare_and_swap(key, Some(&value), Some(&logged_value(&sender, &copy)[..])) {
            Ok(Ok(())) => {
                bodies.release(&pointer);
                moved += 1;
            }
            // Deleted since it was read (its move is then not applied at
            // open, before or after the delete), or sled failed.
            Ok(Err(_)) => bodies.release(&copy),
            Err(e) => {
                bodies.release(&copy);
                failed = Some(e);
            }
        }
        bodies.applied(&copy);
    }
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(moved),
    }
}

/// A message offered to one session: while this lives, no other
/// [`Store::offer_oldest`] hands it out. [`Offer::answered`] deletes it;
/// dropping the offer unanswered lets the message go back to the mailbox and
/// wakes the `ACCEPT`s waiting on it.
#[must_use = "dropping an offer puts the message back at once"]
pub struct Offer {
    store: Arc<Store>,
    owner: Fingerprint,
    id: u64,
    answered: bool,
}

impl std::fmt::Debug for Offer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offer").field("owner", &self.owner).field("id", &self.id).finish_non_exhaustive()
    }
}

impl Offer {
    /// The offered message's sequence number.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The session answered (`31`, `32` or `52`): deletes the message, lets
    /// the offer go, and waits for the fsync. If the delete fails the message
    /// is offered again.
    ///
    /// # Errors
    /// [`StoreError`] if the delete or the fsync fails.
    pub async fn answered(mut self) -> Result<(), StoreError> {
        let store = Arc::clone(&self.store);
        // Delete before letting go, so that no other session is offered it in between.
        let removed = store.remove_message(&self.owner, self.id)?;
        self.answered = true;
        drop(self);
        if removed {
            store.commit().await?;
        }
        Ok(())
    }

    /// Lets go of an offer whose message is already gone, waking nobody.
    fn forget(mut self) {
        self.answered = true;
    }
}

impl Drop for Offer {
    fn drop(&mut self) {
        self.store.lock_offered().remove(&(self.owner, self.id));
        if !self.answered {
            self.store.notifier(&self.owner).notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_come_back_oldest_first_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let owner = Fingerprint::of(b"owner");
        let (a, b) = (Fingerprint::of(b"a"), Fingerprint::of(b"b"));
        {
            let store = Store::open(dir.path()).unwrap();
            let mb = Mailbox { state: MailboxState::Active, owner_cert: vec![1, 2], attestation: vec![3] };
            store.put_mailbox(&owner, &mb).await.unwrap();
            store.store_message(&owner, &a, Some(b"sig"), b"first").await.unwrap();
            store.store_message(&owner, &b, None, b"second").await.unwrap();
            store.store_message(&owner, &a, None, b"third").await.unwrap();
            assert_eq!(store.unread(&owner, &a), (3, 2));
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.unread(&owner, &a), (3, 2), "counts rebuilt at open");
        let first = store.oldest(&owner).unwrap().unwrap();
        assert_eq!(
            (first.message.as_slice(), first.signature.as_deref(), first.sender),
            (&b"first"[..], Some(&b"sig"[..]), a)
        );
        store.delete_message(&owner, first.id).await.unwrap();
        let second = store.oldest(&owner).unwrap().unwrap();
        assert_eq!((second.message.as_slice(), second.signature.as_deref()), (&b"second"[..], None));
        assert_eq!(store.unread(&owner, &a), (2, 1));
        assert!(store.deregister(&owner).await.unwrap());
        assert_eq!(store.oldest(&owner).unwrap(), None);
        assert_eq!(store.mailbox(&owner).unwrap().unwrap().state, MailboxState::Gone);
        assert_eq!(store.unread(&owner, &a), (0, 0));
    }

    /// A message let in by a mailbox record (a registration, an approval)
    /// must not be acknowledged before that record is on disk: while the
    /// record is not known flushed, a commit waits for a flush of sled too
    /// (also when the record's own flush failed); once a flush has taken
    /// it, a commit is the log's fdatasync alone again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_is_not_acknowledged_before_the_mailbox_record_that_let_it_in() {
        const PASS: u8 = 0;
        const HOLD: u8 = 1;
        const FAIL: u8 = 2;
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        // What flushes of sled do: pass, wait while held, or fail.
        let mode = Arc::new((Mutex::new(PASS), std::sync::Condvar::new()));
        let set = |m: u8| {
            *mode.0.lock().unwrap() = m;
            mode.1.notify_all();
        };
        let (gate, flushed) = (Arc::clone(&mode), db.clone());
        let flusher = GroupCommit::start_with("test-flusher", move || {
            let mut m = gate.0.lock().unwrap();
            while *m == HOLD {
                m = gate.1.wait(m).unwrap();
            }
            if *m == FAIL {
                return Err(std::io::Error::other("injected"));
            }
            flushed.flush().map(|_| ()).map_err(std::io::Error::other)
        })
        .unwrap();
        let store = Store::in_db(db, Arc::new(flusher), "", &dir.path().join("bodies")).unwrap();
        let (owner, other, sender) = (Fingerprint::of(b"owner"), Fingerprint::of(b"other"), Fingerprint::of(b"sender"));
        let active = Mailbox { state: MailboxState::Active, owner_cert: vec![1], attestation: vec![2] };
        // Whether a commit finishes while sled's flushes are held (each ends with them let go).
        let commits_while_held = |store: Arc<Store>, wait: Duration| {
            set(HOLD);
            let mut commit = tokio::spawn(async move { store.commit().await });
            async move {
                let early = tokio::time::timeout(wait, &mut commit).await;
                set(PASS);
                let quick = early.is_ok();
                match early {
                    Ok(done) => done,
                    Err(_) => commit.await,
                }
                .unwrap()
                .unwrap();
                quick
            }
        };

        // The approval's flush is held: a message for the mailbox now.
        set(HOLD);
        let approval = tokio::spawn({
            let (store, active) = (Arc::clone(&store), active.clone());
            async move { store.put_mailbox(&owner, &active).await }
        });
        while store.mailbox(&owner).unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        store.insert_message(&owner, &sender, None, b"first").unwrap();
        let quick = commits_while_held(Arc::clone(&store), Duration::from_millis(300)).await;
        assert!(!quick, "the message was committed before the mailbox record that let it in was flushed");
        approval.await.unwrap().unwrap();

        // The record is flushed: a commit no longer waits for sled.
        store.insert_message(&owner, &sender, None, b"second").unwrap();
        let quick = commits_while_held(Arc::clone(&store), Duration::from_secs(30)).await;
        assert!(quick, "a commit waited for sled with every activation flushed");

        // An activation whose flush failed: the next commit takes the full flush, the one after not.
        set(FAIL);
        assert!(store.put_mailbox(&other, &active).await.is_err());
        set(PASS);
        store.insert_message(&other, &sender, None, b"third").unwrap();
        let quick = commits_while_held(Arc::clone(&store), Duration::from_millis(300)).await;
        assert!(!quick, "committed with the record that let it in not known to be on disk");
        let quick = commits_while_held(Arc::clone(&store), Duration::from_secs(30)).await;
        assert!(quick, "a commit waited for sled after a full flush took the record");
    }

    /// A deregistration whose deletes failed part way leaves messages in a
    /// gone mailbox; deregistering again deletes them.
    #[tokio::test]
    async fn deregistering_a_gone_mailbox_deletes_what_is_left_in_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (owner, sender) = (Fingerprint::of(b"owner"), Fingerprint::of(b"sender"));
        let mb = Mailbox { state: MailboxState::Active, owner_cert: vec![1], attestation: vec![2] };
        store.put_mailbox(&owner, &mb).await.unwrap();
        assert!(store.deregister(&owner).await.unwrap());
        // What a failed delete would have left.
        store.store_message(&owner, &sender, None, b"left").await.unwrap();
        assert_eq!(store.unread(&owner, &sender), (1, 1));
        assert!(store.deregister(&owner).await.unwrap());
        assert_eq!(store.oldest(&owner).unwrap(), None);
        assert_eq!(store.unread(&owner, &sender), (0, 0));
        assert_eq!(store.mailbox(&owner).unwrap().unwrap().state, MailboxState::Gone);
    }

    /// A message in a gone mailbox at open (its delete failed, or did not
    /// reach the disk before a crash) is removed and not counted; other
    /// mailboxes keep theirs.
    #[tokio::test]
    async fn messages_left_in_a_gone_mailbox_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (owner, other, sender) = (Fingerprint::of(b"owner"), Fingerprint::of(b"other"), Fingerprint::of(b"sender"));
        {
            let store = Store::open(dir.path()).unwrap();
            let mb = Mailbox { state: MailboxState::Active, owner_cert: vec![1], attestation: vec![2] };
            store.put_mailbox(&owner, &mb).await.unwrap();
            store.put_mailbox(&other, &mb).await.unwrap();
            assert!(store.deregister(&owner).await.unwrap());
            // What a failed or unsynced delete would have left.
            store.store_message(&owner, &sender, None, b"left").await.unwrap();
            store.store_message(&other, &sender, None, b"kept").await.unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.oldest(&owner).unwrap(), None);
        assert_eq!(store.unread(&owner, &sender), (0, 0));
        assert_eq!(store.oldest(&other).unwrap().unwrap().message, b"kept");
        assert_eq!(store.unread(&other, &sender), (1, 1));
    }

    #[tokio::test]
    async fn an_offered_message_is_skipped_until_answered_or_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (owner, other, sender) = (Fingerprint::of(b"owner"), Fingerprint::of(b"other"), Fingerprint::of(b"s"));
        store.store_message(&owner, &sender, None, b"first").await.unwrap();
        store.store_message(&owner, &sender, None, b"second").await.unwrap();
        store.store_message(&other, &sender, None, b"elsewhere").await.unwrap();
        let (m1, o1) = store.offer_oldest(&owner).unwrap().unwrap();
        let (m2, o2) = store.offer_oldest(&owner).unwrap().unwrap();
        assert_eq!((m1.message.as_slice(), m2.message.as_slice()), (&b"first"[..], &b"second"[..]));
        assert!(store.offer_oldest(&owner).unwrap().is_none(), "both are offered");
        assert_eq!(store.oldest(&owner).unwrap().unwrap(), m1, "oldest ignores offers");
        let (m3, o3) = store.offer_oldest(&other).unwrap().unwrap();
        assert_eq!(m3.message, b"elsewhere", "offers are per mailbox");
        assert_eq!(store.offered(), 3);
        // Let go unanswered: offered again, and waiting ACCEPTs are woken.
        let notify = store.notifier(&owner);
        let woken = notify.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        drop(o1);
        tokio::time::timeout(std::time::Duration::from_secs(1), woken).await.unwrap();
        let (again, o1) = store.offer_oldest(&owner).unwrap().unwrap();
        assert_eq!(again, m1);
        // Answered: deleted, never offered again.
        o1.answered().await.unwrap();
        o2.answered().await.unwrap();
        o3.answered().await.unwrap();
        assert_eq!(store.offered(), 0);
        assert!(store.offer_oldest(&owner).unwrap().is_none());
        assert_eq!(store.unread(&owner, &sender), (0, 0));
    }

    #[test]
    fn mailbox_records_round_trip() {
        for state in
            [MailboxState::Active, MailboxState::Pending, MailboxState::Gone, MailboxState::Moved("h.example".into())]
        {
            let mb = Mailbox { state, owner_cert: vec![9; 300], attestation: vec![] };
            assert_eq!(Mailbox::decode(&mb.encode()).unwrap(), mb);
        }
        assert!(Mailbox::decode(&[9]).is_err());
        assert!(Mailbox::decode(&[1, 0, 0, 1]).is_err());
    }

    /// Segments of `limit` octets, compacted as soon as they are sealed, by
    /// the test's own calls only.
    fn tuned(limit: u64) -> Tuning {
        Tuning { segment_limit: limit, grace: Duration::ZERO, compactor: false }
    }

    /// A store on `dir` with segments of `limit` octets (see [`tuned`]),
    /// and the messages `bodies` (`body(i, len)` for each `i`) stored from
    /// `b"sender"` to `b"owner"`: the store and their sequence numbers.
    async fn filled(dir: &Path, limit: u64, bodies: std::ops::Range<u32>, len: usize) -> (Arc<Store>, Vec<u64>) {
        let (owner, sender) = (Fingerprint::of(b"owner"), Fingerprint::of(b"sender"));
        let store = Store::open_tuned(dir, tuned(limit)).unwrap();
        let mut ids = Vec::new();
        for i in bodies {
            ids.push(store.store_message(&owner, &sender, None, &body(i, len)).await.unwrap());
        }
        (store, ids)
    }

    fn segments(dir: &Path) -> Vec<(String, u64)> {
        let mut found: Vec<_> = std::fs::read_dir(dir.join("bodies"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name().into_string().unwrap(), e.metadata().unwrap().len())
            })
            .collect();
        found.sort();
        found
    }

    fn on_disk(dir: &Path) -> u64 {
        segments(dir).iter().map(|(_, len)| len).sum()
    }

    /// `len` octets that differ from every other `i`'s.
    fn body(i: u32, len: usize) -> Vec<u8> {
        (0..len).map(|j| u8::try_from((i as usize * 31 + j * 7) % 251).unwrap()).collect()
    }

    #[tokio::test]
    async fn a_body_is_written_once_to_a_segment_and_sled_keeps_a_pointer() {
        let dir = tempfile::tempdir().unwrap();
        let (owner, sender) = (Fingerprint::of(b"owner"), Fingerprint::of(b"sender"));
        {
            let store = Store::open(dir.path()).unwrap();
            for i in 0..20 {
                store.store_message(&owner, &sender, Some(b"sig"), &body(i, 5000)).await.unwrap();
            }
            for kv in store.messages.iter() {
                assert_eq!(kv.unwrap().1.len(), 33 + Pointer::LEN, "sled holds the pointer, not the body");
            }
        }
        // Each body once, in its record: its signature's length, the signature, the message.
        assert_eq!(on_disk(dir.path()), 20 * (super::super::bodies::HEADER as u64 + 4 + 3 + 5000));
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.unread(&owner, &sender), (20, 20));
        for i in 0..20 {
            let m = store.oldest(&owner).unwrap().unwrap();
            assert_eq!((m.message, m.signature.as_deref()), (body(i, 5000), Some(&b"sig"[..])), "message {i}");
            store.delete_message(&owner, m.id).await.unwrap();
        }
        assert_eq!(store.oldest(&owner).unwrap(), None);
    }

    /// Four messages of 1,000 octets stored, the store closed, and its
    /// log changed by `damage` as a crash can leave it.
    async fn four_then(damage: impl FnOnce(&mut Vec<u8>)) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let (owner, sender) = (Fingerprint::of(b"owner"), Fingerprint::of(b"sender"));
        {
            let store = Store::open(dir.path()).unwrap();
            for i in 0..4 {
                store.store_message(&owner, &sender, None, &body(i, 1000)).await.unwrap();
            }
        }
        let segment = dir.path().join("bodies").join(&segments(dir.path())[0].0);
        let mut octets = std::fs::read(&segment).unwrap();
        assert_eq!(octets.len(), 4 * RECORD);
        damage(&mut octets);
        std::fs::write(&segment, &octets).unwrap();
        dir
    }

    /// Octets of the log record of a 1,000-octet message without signature.
    const RECORD: usize = super::super::bodies::HEADER + 1004;

    /// A crash can leave a pointer on disk (sled writes on its own too)
    /// whose record was not synced: cut short, or not what was written. Such
    /// a message was never acknowledged, nor any after it (an fdatasync
    /// that covered a later record covered it too): opening removes them,
    /// cuts the log after the last whole record, and keeps the rest.
    #[tokio::test]
    async fn messages_whose_records_did_not_reach_the_disk_are_removed_at_open_and_the_rest_kept() {
        let (owner, sender) = (Fingerprint::of(b"owner"), Fingerprint::of(b"sender"));
        for (what, damage, kept) in [
            (
                "the fourth cut short",
                Box::new(|o: &mut Vec<u8>| o.truncate(3 * RECORD + 10)) as Box<dyn FnOnce(&mut Vec<u8>)>,
                3,
            ),
            ("the second changed", Box::new(|o: &mut Vec<u8>| o[RECORD + 500] ^= 1), 1),
        ] {
            let dir = four_then(damage).await;
            for round in 0..2 {
                let store = Store::open(dir.path()).unwrap();
                assert_eq!(store.unread(&owner, &sender), (kept, kept), "{what}, round {round}");
                let mut offers = Vec::new();
                for i in 0..kept {
                    let (m, offer) = store.offer_oldest(&owner).unwrap().unwrap();
                    assert_eq!(m.message, body(i, 1000), "{what}, round {round}");
                    offers.push(offer);
                }
                assert!(store.offer_oldest(&owner).unwrap().is_none(), "{what}, round {round}");
            }
            assert_eq!(
                segments(dir.path())[0].1,
                kept as u64 * RECORD as u64,
                "{what}: cut after the last whole record"
            );
        }
    }

    #[tokio::test]
    async fn a_segment_goes_once_its_last_body_is_deleted_and_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let owner = Fingerprint::of(b"owner");
        // No compaction: only deletes empty segments here.
        let (store, ids) = filled(dir.path(), 16 << 10, 0..10, 5000).await;
        // Three bodies of 5,004 octets fit in 16 KiB: segments 1 to 4.
        let names: Vec<String> = segments(dir.path()).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), 4, "{names:?}");
        for id in &ids[..3] {
            store.delete_message(&owner, *id).await.unwrap();
        }
        // Once a checkpoint passes it (the housekeeping thread writes one every second).
        store.durable().await.unwrap();
        let left: Vec<String> = segments(dir.path()).into_iter().map(|(n, _)| n).collect();
        assert_eq!(left, names[1..], "the first segment went with its last body");
        for id in &ids[3..] {
            store.delete_message(&owner, *id).await.unwrap();
        }
        store.durable().await.unwrap();
        let left: Vec<String> = segments(dir.path()).into_iter().map(|(n, _)| n).collect();
        assert_eq!(left, names[3..], "only the active segment is left");
    }

    /// The attack on a log of bodies: a mailbox never read keeps one body in
    /// every segment while another is read as fast as it fills. Without
    /// compaction every segment would stay for its one small body.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn segments_kept_for_a_few_bodies_are_compacted_so_the_disk_holds_at_most_four_times_the_live_octets() {
        let dir = tempfile::tempdir().unwrap();
        let (idle, busy, sender) = (Fingerprint::of(b"idle"), Fingerprint::of(b"busy"), Fingerprint::of(b"s"));
        let limit = 32 << 10;
        {
            let store = Store::open_tuned(dir.path(), tuned(limit)).unwrap();
            for round in 0..40 {
                store.store_message(&idle, &sender, None, &body(round, 1000)).await.unwrap();
                for i in 0..6 {
                    store.store_message(&busy, &sender, None, &body(1000 + i, 5000)).await.unwrap();
                }
                while let Some((_, offer)) = store.offer_oldest(&busy).unwrap() {
                    offer.answered().await.unwrap();
                }
            }
            compact(&store.messages, &store.bodies, &|| false).unwrap();
            store.durable().await.unwrap();
            let live = 40 * RECORD as u64;
            let (held, counted_live) = store.bodies.usage();
            assert_eq!(counted_live, live);
            assert_eq!(held, on_disk(dir.path()), "what is counted is what is on disk");
            assert!(held <= 4 * live + 2 * limit, "{held} octets on disk for {live} live");
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.unread(&idle, &sender), (40, 40));
        for round in 0..40 {
            let (m, offer) = store.offer_oldest(&idle).unwrap().unwrap();
            assert_eq!(m.message, body(round, 1000), "message {round}");
            offer.answered().await.unwrap();
        }
    }

    /// Five records of 3,085 octets per 16 KiB segment: 11 make segments 1 to 3.
    async fn three_segments(dir: &Path) -> (Fingerprint, Fingerprint) {
        let (store, _) = filled(dir, 16 << 10, 0..11, 3000).await;
        // A checkpoint past segments 1 and 2: they are not read again at open.
        store.durable().await.unwrap();
        (Fingerprint::of(b"owner"), Fingerprint::of(b"sender"))
    }

    #[tokio::test]
    async fn a_lower_segment_missing_or_cut_short_fails_the_open_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        three_segments(dir.path()).await;
        let first = dir.path().join("bodies").join(&segments(dir.path())[0].0);
        let kept = std::fs::read(&first).unwrap();
        std::fs::remove_file(&first).unwrap();
        let Err(e) = Store::open(dir.path()) else { panic!("opened without a segment") };
        assert!(e.to_string().contains(&*first.to_string_lossy()) && e.to_string().contains("not there"), "{e}");
        assert!(!e.to_string().contains(['\\', '\n']), "one line: {e:?}");
        std::fs::write(&first, &kept[..kept.len() - 1]).unwrap();
        let Err(e) = Store::open(dir.path()) else { panic!("opened with a segment cut short") };
        assert!(e.to_string().contains("cut short"), "{e}");
        std::fs::write(&first, &kept).unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.unread(&Fingerprint::of(b"owner"), &Fingerprint::of(b"sender")), (11, 11));
        drop(store);
        std::fs::remove_dir_all(dir.path().join("bodies")).unwrap();
        assert!(Store::open(dir.path()).is_err(), "a database without its bodies/ does not open as empty");
    }

    /// A lower segment is durable and whole: a record after the checkpoint
    /// that is not is damage, and opening says where.
    #[tokio::test]
    async fn a_damaged_record_after_the_checkpoint_in_a_lower_segment_fails_the_open() {
        let dir = tempfile::tempdir().unwrap();
        // No checkpoint is written after open's: every record is read again.
        drop(filled(dir.path(), 16 << 10, 0..11, 3000).await);
        let first = dir.path().join("bodies").join(&segments(dir.path())[0].0);
        let mut octets = std::fs::read(&first).unwrap();
        octets[100] ^= 1;
        std::fs::write(&first, &octets).unwrap();
        let Err(e) = Store::open(dir.path()) else { panic!("opened over a damaged record") };
        assert!(e.to_string().contains(&*first.to_string_lossy()) && e.to_string().contains("damaged"), "{e}");
    }

    #[tokio::test]
    async fn a_damaged_body_in_a_lower_segment_is_removed_when_read_and_the_mailbox_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (owner, sender) = three_segments(dir.path()).await;
        let first = dir.path().join("bodies").join(&segments(dir.path())[0].0);
        let mut octets = std::fs::read(&first).unwrap();
        octets[10] ^= 1; // The first body.
        std::fs::write(&first, &octets).unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.unread(&owner, &sender), (11, 11), "a lower segment is not read at open");
        let (m, offer) = store.offer_oldest(&owner).unwrap().unwrap();
        assert_eq!(m.message, body(1, 3000), "the damaged one is skipped");
        assert_eq!(store.unread(&owner, &sender), (10, 10), "and removed");
        offer.answered().await.unwrap();
        assert_eq!(store.oldest(&owner).unwrap().unwrap().message, body(2, 3000));
    }

    /// [`three_segments`] reopened with its first nine messages taken:
    /// segment 1 is empty and segment 2 one fifth live.
    async fn a_sparse_second_segment(dir: &Path) -> (Arc<Store>, Fingerprint, Fingerprint) {
        let (owner, sender) = three_segments(dir).await;
        let store = Store::open_tuned(dir, tuned(16 << 10)).unwrap();
        for _ in 0..9 {
            let (_, offer) = store.offer_oldest(&owner).unwrap().unwrap();
            offer.answered().await.unwrap();
        }
        (store, owner, sender)
    }

    /// sled may write a moved pointer to disk at any moment, so the copies
    /// must be durable before any pointer moves: if they cannot be synced,
    /// no pointer moves. A failed fdatasync then refuses every later write.
    #[tokio::test]
    async fn if_the_copies_cannot_be_synced_no_pointer_moves_and_no_write_is_taken_after() {
        let dir = tempfile::tempdir().unwrap();
        let (store, owner, sender) = a_sparse_second_segment(dir.path()).await;
        let before: Vec<_> = store.messages.iter().map(Result::unwrap).collect();
        store.bodies.fail_the_next_sync();
        assert!(compact(&store.messages, &store.bodies, &|| false).is_err());
        let after: Vec<_> = store.messages.iter().map(Result::unwrap).collect();
        assert_eq!(before, after, "a pointer moved to a copy that is not durable");
        assert!(store.store_message(&owner, &sender, None, b"later").await.is_err());
        assert!(store.durable().await.is_err());
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.unread(&owner, &sender), (2, 2));
        assert_eq!(store.oldest(&owner).unwrap().unwrap().message, body(9, 3000));
    }

    /// With the sync working, the same compaction moves the live body.
    #[tokio::test]
    async fn a_compaction_moves_every_live_body_of_a_sparse_segment() {
        let dir = tempfile::tempdir().unwrap();
        let (store, owner, sender) = a_sparse_second_segment(dir.path()).await;
        assert_eq!(compact(&store.messages, &store.bodies, &|| false).unwrap(), 1, "segment 2's one live body");
        store.durable().await.unwrap();
        assert_eq!(store.unread(&owner, &sender), (2, 2));
        assert_eq!(store.oldest(&owner).unwrap().unwrap().message, body(9, 3000));
    }

    /// The active segment is written ahead with zeros, so that a sync
    /// overwrites and commits no new size; a sealed segment, and the
    /// active one of a store closed or crashed, end with their last record.
    #[tokio::test]
    async fn the_log_is_written_ahead_and_every_segment_ends_with_its_last_record() {
        let dir = tempfile::tempdir().unwrap();
        let (owner, sender) = (Fingerprint::of(b"owner"), Fingerprint::of(b"sender"));
        let limit = 64 << 10;
        let record = (super::super::bodies::HEADER + 4 + 5000) as u64;
        {
            let store = Store::open_tuned(dir.path(), tuned(limit)).unwrap();
            store.store_message(&owner, &sender, None, &body(0, 5000)).await.unwrap();
            assert_eq!(segments(dir.path()), [("0000000000000001.log".to_owned(), limit)], "written ahead");
            for i in 1..15 {
                store.store_message(&owner, &sender, None, &body(i, 5000)).await.unwrap();
            }
            // Twelve records fill the first segment; the second is written ahead.
            assert_eq!(
                segments(dir.path()),
                [("0000000000000001.log".to_owned(), 12 * record), ("0000000000000002.log".to_owned(), limit)]
            );
        }
        assert_eq!(segments(dir.path())[1].1, 3 * record, "closed: cut after the last record");
        // Were a sealed segment not cut before its sealing sync, it would be
        // damage at open (it is read to its end after the checkpoint).
        let first = dir.path().join("bodies/0000000000000001.log");
        std::fs::OpenOptions::new().write(true).open(&first).unwrap().set_len(limit).unwrap();
        let Err(e) = Store::open(dir.path()) else { panic!("opened over a sealed segment with zeros") };
        assert!(e.to_string().contains("damaged"), "{e}");
        std::fs::OpenOptions::new().write(true).open(&first).unwrap().set_len(12 * record).unwrap();
        // As a crash leaves it: the zeros still there.
        let second = dir.path().join("bodies/0000000000000002.log");
        std::fs::OpenOptions::new().write(true).open(&second).unwrap().set_len(limit).unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(segments(dir.path())[1].1, 3 * record, "opened: cut after the last record");
        assert_eq!(store.unread(&owner, &sender), (15, 15));
    }

    /// Written ahead a step (1 MiB) at a time.
    #[tokio::test]
    async fn the_log_is_written_ahead_a_step_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = filled(dir.path(), 3 << 20, 0..12, 100_000).await;
        assert_eq!(segments(dir.path())[0].1, 2 << 20, "1.2 MB of records, written ahead to 2 MiB");
        drop(store);
        assert_eq!(segments(dir.path())[0].1, 12 * (super::super::bodies::HEADER as u64 + 100_004));
    }

    /// sled's files of `dir` (all but the log), copied to `to`: what sled
    /// had on disk at that moment.
    fn copy_sled(dir: &Path, to: &Path) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let (name, target) = (entry.file_name(), to.join(entry.file_name()));
            if name == "bodies" {
                continue;
            }
            if entry.file_type().unwrap().is_dir() {
                std::fs::create_dir_all(&target).unwrap();
                copy_sled(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).unwrap();
            }
        }
    }

    /// Puts back sled's files as they were when copied: a sled that never
    /// wrote what came after, beside the log that has it.
    fn put_sled_back(snapshot: &Path, dir: &Path) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name() == "bodies" {
                continue;
            }
            if entry.file_type().unwrap().is_dir() {
                std::fs::remove_dir_all(entry.path()).unwrap();
            } else {
                std::fs::remove_file(entry.path()).unwrap();
            }
        }
        copy_sled(snapshot, dir);
    }

    /// Storing and deleting sync only the log; sled writes in its own time.
    /// A sled that lags the log (as after a crash) is brought up to date
    /// at open: stores it lacks are made, deletes it lacks are done.
    #[tokio::test]
    async fn the_log_brings_a_sled_that_lags_up_to_date_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let snapshot = tempfile::tempdir().unwrap();
        let (owner, sender) = (Fingerprint::of(b"owner"), Fingerprint::of(b"sender"));
        let ids = {
            let (store, ids) = filled(dir.path(), 16 << 10, 0..3, 3000).await;
            store.durable().await.unwrap();
            ids
        };
        copy_sled(dir.path(), snapshot.path());
        {
            let (store, _) = filled(dir.path(), 16 << 10, 3..9, 3000).await;
            store.delete_message(&owner, ids[0]).await.unwrap();
            store.delete_message(&owner, ids[2]).await.unwrap();
        }
        put_sled_back(snapshot.path(), dir.path());
        for round in 0..2 {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.unread(&owner, &sender), (7, 7), "round {round}");
            let mut offers = Vec::new();
            for i in [1, 3, 4, 5, 6, 7, 8] {
                let (m, offer) = store.offer_oldest(&owner).unwrap().unwrap();
                assert_eq!(m.message, body(i, 3000), "round {round}");
                offers.push(offer);
            }
        }
    }

    /// A compaction reads a message, the message is deleted and the delete
    /// acknowledged, then the compaction's copy reaches the log: at open,
    /// after a crash that left sled behind, the copy does not bring the
    /// message back.
    #[tokio::test]
    async fn a_compactions_copy_of_a_message_deleted_meanwhile_does_not_bring_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let snapshot = tempfile::tempdir().unwrap();
        let (owner, sender) = (Fingerprint::of(b"owner"), Fingerprint::of(b"sender"));
        let store = Store::open_tuned(dir.path(), tuned(16 << 10)).unwrap();
        let kept = store.store_message(&owner, &sender, None, &body(0, 1000)).await.unwrap();
        let gone = store.store_message(&owner, &sender, None, &body(1, 1000)).await.unwrap();
        store.durable().await.unwrap();
        copy_sled(dir.path(), snapshot.path());
        // The compaction read both, then `gone` was deleted, then the copies were written.
        let read: Vec<_> =
            [kept, gone].iter().map(|id| store.messages.get(message_key(&owner, *id)).unwrap().unwrap()).collect();
        store.delete_message(&owner, gone).await.unwrap();
        for (id, value) in [kept, gone].iter().zip(&read) {
            let Ok((_, Held::Logged(pointer))) = parse_value(value) else { panic!("not in the log") };
            let key = message_key(&owner, *id);
            let copy =
                store.bodies.moved(&key, sender.as_bytes(), &store.bodies.read(&key, &pointer).unwrap()).unwrap();
            store.bodies.applied(&copy);
        }
        store.bodies.sync().unwrap();
        drop(store);
        put_sled_back(snapshot.path(), dir.path());
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.unread(&owner, &sender), (1, 1));
        assert_eq!(store.oldest(&owner).unwrap().unwrap().message, body(0, 1000));
    }

    #[tokio::test]
    async fn a_missing_segment_after_the_checkpoint_or_a_development_body_file_fails_the_open() {
        let dir = tempfile::tempdir().unwrap();
        // No checkpoint after open's: segments 1 to 3 are all read again.
        drop(filled(dir.path(), 16 << 10, 0..11, 3000).await);
        let second = dir.path().join("bodies").join(&segments(dir.path())[1].0);
        let kept = std::fs::read(&second).unwrap();
        std::fs::remove_file(&second).unwrap();
        let Err(e) = Store::open(dir.path()) else { panic!("opened without a segment it needs") };
        assert!(e.to_string().contains(&*second.to_string_lossy()) && e.to_string().contains("missing"), "{e}");
        std::fs::write(&second, kept).unwrap();
        // The checkpoint's own segment (open's, empty: the highest) gone.
        drop(Store::open(dir.path()).unwrap());
        let last = dir.path().join("bodies").join(&segments(dir.path()).last().unwrap().0);
        std::fs::remove_file(&last).unwrap();
        let Err(e) = Store::open(dir.path()) else { panic!("opened without the checkpoint's segment") };
        assert!(e.to_string().contains(&*last.to_string_lossy()) && e.to_string().contains("missing"), "{e}");
        std::fs::write(&last, b"").unwrap();
        drop(Store::open(dir.path()).unwrap());
        std::fs::write(dir.path().join("bodies/0000000000000001.body"), b"").unwrap();
        let Err(e) = Store::open(dir.path()) else { panic!("opened over a development version's bodies") };
        assert!(e.to_string().contains("development version"), "{e}");
    }

    /// The same attack with the compaction thread doing the work.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_compaction_thread_reclaims_segments_kept_for_a_few_bodies() {
        let dir = tempfile::tempdir().unwrap();
        let (idle, busy, sender) = (Fingerprint::of(b"idle"), Fingerprint::of(b"busy"), Fingerprint::of(b"s"));
        let limit = 32 << 10;
        let store = Store::open_tuned(dir.path(), Tuning { compactor: true, ..tuned(limit) }).unwrap();
        for round in 0..20 {
            store.store_message(&idle, &sender, None, &body(round, 1000)).await.unwrap();
            for i in 0..6 {
                store.store_message(&busy, &sender, None, &body(1000 + i, 5000)).await.unwrap();
            }
            while let Some((_, offer)) = store.offer_oldest(&busy).unwrap() {
                offer.answered().await.unwrap();
            }
        }
        let live = 20 * RECORD as u64;
        // Kept whole, the segments the attack went through would hold over four times the bound.
        let last = segments(dir.path()).last().map(|(name, _)| u64::from_str_radix(&name[..16], 16).unwrap()).unwrap();
        assert!(last * limit > 4 * (4 * live + 2 * limit), "the attack went through {last} segments");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        // Each flush unlinks what the thread emptied before it.
        while on_disk(dir.path()) > 4 * live + 2 * limit {
            assert!(std::time::Instant::now() < deadline, "not compacted: {} octets on disk", on_disk(dir.path()));
            tokio::time::sleep(Duration::from_millis(50)).await;
            store.durable().await.unwrap();
        }
        for round in 0..20 {
            let (m, offer) = store.offer_oldest(&idle).unwrap().unwrap();
            assert_eq!(m.message, body(round, 1000), "message {round}");
            offer.answered().await.unwrap();
        }
    }

    #[tokio::test]
    async fn messages_stored_before_the_body_log_are_read_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (owner, sender) = (Fingerprint::of(b"owner"), Fingerprint::of(b"sender"));
        {
            let db = crate::group_commit::open_db(dir.path()).unwrap();
            let mut value = sender.as_bytes().to_vec();
            push32(&mut value, b"sig");
            value.extend_from_slice(b"an old body");
            db.open_tree("messages").unwrap().insert(message_key(&owner, 7), value).unwrap();
            db.flush().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.unread(&owner, &sender), (1, 1));
        store.store_message(&owner, &sender, None, b"a new body").await.unwrap();
        let (old, o1) = store.offer_oldest(&owner).unwrap().unwrap();
        let (new, o2) = store.offer_oldest(&owner).unwrap().unwrap();
        assert_eq!(
            (old.id, old.message.as_slice(), old.signature.as_deref()),
            (7, &b"an old body"[..], Some(&b"sig"[..]))
        );
        assert_eq!(new.message, b"a new body");
        o1.answered().await.unwrap();
        o2.answered().await.unwrap();
        assert_eq!(store.unread(&owner, &sender), (0, 0));
    }

    use proptest::strategy::Strategy as _;

    #[derive(Debug, Clone)]
    enum Op {
        Store(usize, usize),
        Take(usize),
        Compact,
        Reopen,
    }

    fn run_against_the_model(ops: &[Op]) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let owners = [Fingerprint::of(b"a"), Fingerprint::of(b"b"), Fingerprint::of(b"c")];
        let sender = Fingerprint::of(b"s");
        let limit = 8 << 10;
        let open = || Store::open_tuned(dir.path(), tuned(limit)).unwrap();
        let mut store = open();
        let mut model: [std::collections::VecDeque<Vec<u8>>; 3] = Default::default();
        for (n, op) in ops.iter().enumerate() {
            match *op {
                Op::Store(owner, len) => {
                    let b = body(u32::try_from(n).unwrap(), len);
                    runtime.block_on(store.store_message(&owners[owner], &sender, None, &b)).unwrap();
                    model[owner].push_back(b);
                }
                Op::Take(owner) => {
                    let got = store.offer_oldest(&owners[owner]).unwrap();
                    assert_eq!(got.as_ref().map(|(m, _)| &m.message), model[owner].front(), "op {n}");
                    if let Some((_, offer)) = got {
                        runtime.block_on(offer.answered()).unwrap();
                        model[owner].pop_front();
                    }
                }
                Op::Compact => {
                    compact(&store.messages, &store.bodies, &|| false).unwrap();
                    runtime.block_on(store.durable()).unwrap();
                }
                Op::Reopen => {
                    drop(store);
                    store = open();
                }
            }
            for (owner, queue) in owners.iter().zip(&model) {
                assert_eq!(store.unread(owner, &sender).0 as usize, queue.len(), "op {n}");
            }
            let live: u64 = model.iter().flatten().map(|b| (super::super::bodies::HEADER + b.len() + 4) as u64).sum();
            let (held, counted) = store.bodies.usage();
            assert_eq!(counted, live, "op {n}");
            if matches!(op, Op::Compact) {
                assert!(held <= 4 * live + 2 * limit, "op {n}: {held} octets held for {live} live");
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]
        /// Any mix of stores, takes, compactions and reopens reads back what
        /// a queue per mailbox would, and counts the live octets exactly.
        #[test]
        fn the_store_with_its_body_log_behaves_as_a_queue_per_mailbox(
            ops in proptest::collection::vec(
                proptest::prop_oneof![
                    4 => (0..3usize, 1..6000usize).prop_map(|(o, l)| Op::Store(o, l)),
                    3 => (0..3usize).prop_map(Op::Take),
                    1 => proptest::strategy::Just(Op::Compact),
                    1 => proptest::strategy::Just(Op::Reopen),
                ],
                1..60,
            )
        ) {
            run_against_the_model(&ops);
        }
    }
}
