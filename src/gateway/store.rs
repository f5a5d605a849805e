//! The gateway's durable state in sled: contacts and the delivery queue.
//!
//! Key layout (one sled database in `<data_dir>/queue`):
//! - `contacts`: owner fingerprint (32 octets) -> [`Contact`] (JSON).
//! - `contact_names`: lower-cased LATSSIAM address or email alias -> fingerprint (32).
//! - `bodies`: message id (u64 BE) -> the message octets (an Internet Message).
//! - `jobs`: job id = message id (u64 BE) ‖ recipient index (u16 BE) -> [`Job`] (JSON).
//! - `due`: due time (ms since the epoch, u64 BE) ‖ job id -> empty.
//! - `dead`: job id -> [`Job`] (JSON) with its last error: dead letters.
//! - `irc_outbox`: sequence (u64 BE) -> [`IrcPost`] (JSON): posts for IRC,
//!   sent strictly in key order by one task.
//! - `irc_subs`: `#channel@network` NUL address (lower case) -> `1`
//!   (subscribed by message) or `0` (unsubscribed by message); these override
//!   the subscribers in the settings.
//! - `tofu_pins`: see `crate::pins`.
//! - the default tree: `health.probe` -> time (u64 BE), written by each health check.
//! - `home.mailboxes`, `home.messages`: the embedded home server's store
//!   (`latssiam::server::store`), sharing this database and its fsyncs.
//!
//! Invariants:
//! - A message is acknowledged to whoever handed it over only after
//!   [`Store::enqueue`] returned, which is after an fsync covering its body and
//!   every job (group commit: concurrent writers share one fsync).
//! - Every job has a body under its message id; a body with neither jobs
//!   nor dead letters is garbage and is removed.
//! - `due` is an index of `jobs` and is rebuilt from it at every open, so a
//!   crash between the writes of the two trees loses nothing. While the
//!   gateway runs, a job that a worker has claimed has no `due` entry.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use latssiam::group_commit::GroupCommit;
use latssiam::Fingerprint;
use serde::{Deserialize, Serialize};
use sled::Transactional as _;
use tokio::sync::Notify;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// sled failed, or the data directory is held by another process.
    #[error("queue store: {0}")]
    Sled(#[from] sled::Error),
    /// The flush did not happen.
    #[error("queue store: {0}")]
    Flush(#[from] latssiam::group_commit::FlushError),
    /// A record does not decode.
    #[error("queue store is corrupt: {0}")]
    Corrupt(String),
    /// The shared queue (NATS JetStream) failed or did not answer in time.
    #[error("shared queue: {0}")]
    Shared(String),
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

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
}

impl Contact {
    /// The fingerprint of the certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.cert)
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

/// Where a job delivers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Target {
    /// To a LATSSIAM contact, by fingerprint; `address` is how the sender named them.
    Latssiam { fingerprint: String, address: String },
    /// To an email address, through the smarthost.
    Smtp { rcpt: String },
}

impl Target {
    /// The channel's name.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Latssiam { .. } => "latssiam",
            Target::Smtp { .. } => "smtp",
        }
    }

    /// For listings.
    pub fn describe(&self) -> String {
        match self {
            Target::Latssiam { fingerprint, address } => format!("latssiam:<{address}> {fingerprint}"),
            Target::Smtp { rcpt } => format!("smtp:<{rcpt}>"),
        }
    }
}

/// Who handed the message over: where failures are reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Origin {
    /// An SMTP client; `from` is the envelope sender (empty for `<>`).
    Smtp { from: String },
    /// A LATSSIAM contact, by fingerprint; `from` is the envelope sender used towards email.
    Latssiam { fingerprint: String, from: String },
    /// The gateway itself (bounces and notices): never reported on.
    Gateway,
}

impl Origin {
    /// The envelope sender towards email (empty for `<>`).
    pub fn envelope_from(&self) -> &str {
        match self {
            Origin::Smtp { from } | Origin::Latssiam { from, .. } => from,
            Origin::Gateway => "",
        }
    }
}

/// One recipient of one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// The message's id (its body's key).
    pub message: u64,
    /// Where it goes.
    pub target: Target,
    /// Who sent it.
    pub origin: Origin,
    /// When the message arrived (ms).
    pub arrived_ms: u64,
    /// Attempts so far.
    pub attempts: u32,
    /// When it is next due (ms).
    pub due_ms: u64,
    /// The last failure, if any.
    pub last_error: Option<String>,
}

/// A job id: message id and recipient index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId {
    /// The message.
    pub message: u64,
    /// The recipient's index in it.
    pub index: u16,
}

impl JobId {
    fn key(self) -> [u8; 10] {
        let mut k = [0u8; 10];
        k[..8].copy_from_slice(&self.message.to_be_bytes());
        k[8..].copy_from_slice(&self.index.to_be_bytes());
        k
    }

    fn from_key(k: &[u8]) -> Result<Self, StoreError> {
        let m: [u8; 8] = k.get(..8).and_then(|s| s.try_into().ok()).ok_or_else(|| corrupt("job key"))?;
        let i: [u8; 2] = k.get(8..10).and_then(|s| s.try_into().ok()).ok_or_else(|| corrupt("job key"))?;
        Ok(Self { message: u64::from_be_bytes(m), index: u16::from_be_bytes(i) })
    }
}

impl std::fmt::Display for JobId {
    /// `MESSAGEID.N`, the message id in upper-case hex as Postfix shows queue ids.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:012X}.{}", self.message, self.index)
    }
}

impl std::str::FromStr for JobId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a queue id (like 00000000002A.0)");
        let (m, i) = s.split_once('.').ok_or_else(bad)?;
        Ok(Self { message: u64::from_str_radix(m, 16).map_err(|_| bad())?, index: i.parse().map_err(|_| bad())? })
    }
}

/// The display form of a message id.
pub fn message_id_string(id: u64) -> String {
    format!("{id:012X}")
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(what.to_owned())
}

fn due_key(due_ms: u64, id: JobId) -> [u8; 18] {
    let mut k = [0u8; 18];
    k[..8].copy_from_slice(&due_ms.to_be_bytes());
    k[8..].copy_from_slice(&id.key());
    k
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// Every job in a tree of job id -> [`Job`], in id order.
fn list_jobs(tree: &sled::Tree) -> Result<Vec<(JobId, Job)>, StoreError> {
    tree.iter()
        .map(|kv| kv.map_err(StoreError::from).and_then(|(k, v)| Ok((JobId::from_key(&k)?, decode(&v, "job")?))))
        .collect()
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serialising these plain structs to JSON cannot fail (no maps with non-string keys).
    serde_json::to_vec(v).unwrap_or_default()
}

/// Lines for an IRC channel or nick.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IrcPost {
    /// A channel or a nick.
    pub target: String,
    /// The lines, formatted.
    pub lines: Vec<String>,
}

/// Jobs claimed, and when the next one falls due.
pub type Claimed = (Vec<(JobId, Job)>, Option<u64>);

/// Counts for metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct Depth {
    /// Jobs waiting for their first attempt or in flight.
    pub active: u64,
    /// Jobs waiting for a retry after a failure.
    pub deferred: u64,
    /// Dead letters.
    pub dead: u64,
}

/// The gateway's store.
pub struct Store {
    db: sled::Db,
    contacts: sled::Tree,
    names: sled::Tree,
    bodies: sled::Tree,
    jobs: sled::Tree,
    due: sled::Tree,
    dead: sled::Tree,
    irc: sled::Tree,
    subs: sled::Tree,
    flusher: Arc<GroupCommit>,
    /// Woken when a job becomes due earlier than the worker may think.
    pub wake: Notify,
    /// Woken once, when a write fails for good (see [`Store::broken`]).
    pub failed: Notify,
    broken: std::sync::OnceLock<String>,
    free_space: latssiam::files::FreeSpace,
    /// Woken when a post for IRC is queued.
    pub irc_wake: Notify,
    last_id: AtomicU64,
    /// With `queue.backend = "jetstream"`: where contact changes go first.
    shared: std::sync::OnceLock<Arc<crate::gateway::queue::jetstream::JetQueue>>,
}

impl Store {
    /// Opens (or creates) the store in `dir` and rebuilds the due index.
    ///
    /// # Errors
    /// [`StoreError`] if sled cannot open it (another process holds it) or a record is corrupt.
    pub fn open(dir: &Path) -> Result<Arc<Self>, StoreError> {
        Self::open_keeping(dir, 0)
    }

    /// As [`Store::open`], with [`Store::room`] keeping `min_free` octets free on `dir`'s filesystem.
    ///
    /// # Errors
    /// As [`Store::open`].
    pub fn open_keeping(dir: &Path, min_free: u64) -> Result<Arc<Self>, StoreError> {
        let db = latssiam::group_commit::open_db(dir)?;
        let flusher = GroupCommit::start(db.clone(), "gateway-flusher").map_err(|e| StoreError::Sled(e.into()))?;
        let store = Self {
            contacts: db.open_tree("contacts")?,
            names: db.open_tree("contact_names")?,
            bodies: db.open_tree("bodies")?,
            jobs: db.open_tree("jobs")?,
            due: db.open_tree("due")?,
            dead: db.open_tree("dead")?,
            irc: db.open_tree("irc_outbox")?,
            subs: db.open_tree("irc_subs")?,
            db,
            flusher: Arc::new(flusher),
            wake: Notify::new(),
            irc_wake: Notify::new(),
            failed: Notify::new(),
            broken: std::sync::OnceLock::new(),
            free_space: latssiam::files::FreeSpace::new(dir, min_free),
            last_id: AtomicU64::new(0),
            shared: std::sync::OnceLock::new(),
        };
        store.recover()?;
        Ok(Arc::new(store))
    }

    fn recover(&self) -> Result<(), StoreError> {
        self.due.clear()?;
        for kv in self.jobs.iter() {
            let (k, v) = kv?;
            let job: Job = decode(&v, "job")?;
            self.due.insert(due_key(job.due_ms, JobId::from_key(&k)?), &[])?;
        }
        for kv in self.bodies.iter() {
            let (k, _) = kv?;
            if self.jobs.scan_prefix(&k).next().is_none() && self.dead.scan_prefix(&k).next().is_none() {
                self.bodies.remove(&k)?;
            }
        }
        Ok(())
    }

    /// The sled database (for the pin store and the embedded home server).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// The group commit that makes the database durable, to share with
    /// others who write in it (the embedded home server).
    pub fn flusher(&self) -> Arc<GroupCommit> {
        Arc::clone(&self.flusher)
    }

    /// Waits until everything written so far is on disk.
    ///
    /// # Errors
    /// [`StoreError::Flush`].
    pub async fn durable(&self) -> Result<(), StoreError> {
        self.flusher.durable().await.map_err(|e| self.record(e.into()))
    }

    /// Notes `e` if it is an I/O error: sled keeps the first I/O error of its
    /// log (a full disk, a failed fsync) and refuses every later write with
    /// it, so the store is broken until the process opens it anew.
    fn record(&self, e: StoreError) -> StoreError {
        let io = matches!(
            e,
            StoreError::Sled(sled::Error::Io(_)) | StoreError::Flush(latssiam::group_commit::FlushError::Io(_))
        );
        if io && self.broken.set(e.to_string()).is_ok() {
            self.failed.notify_one();
        }
        e
    }

    /// Whether the filesystem of the queue keeps `queue.min_free_mb` (see
    /// [`latssiam::files::FreeSpace`]); `Err` with the octets free.
    ///
    /// # Errors
    /// The octets free, when below the minimum.
    pub fn room(&self) -> Result<(), u64> {
        self.free_space.check()
    }

    /// A durable write that nothing reads: whether the queue can keep a message now.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn probe(&self) -> Result<(), StoreError> {
        self.db.insert(b"health.probe", &now_ms().to_be_bytes()).map_err(|e| self.record(e.into()))?;
        self.durable().await
    }

    /// Why the store can no longer write, once it cannot (see [`Store::failed`]).
    pub fn broken(&self) -> Option<&str> {
        self.broken.get().map(String::as_str)
    }

    fn next_message_id(&self) -> Result<u64, StoreError> {
        // generate_id is monotonic across restarts; keep ids non-zero and increasing.
        let id = self.db.generate_id()? + 1;
        self.last_id.fetch_max(id, Ordering::Relaxed);
        Ok(id)
    }

    // ---- contacts ----

    /// Adds or replaces a contact (by fingerprint), durably.
    ///
    /// # Errors
    /// [`StoreError`]; or an email alias already used by another contact.
    pub async fn put_contact(&self, contact: &Contact) -> Result<Result<(), String>, StoreError> {
        let fp = contact.fingerprint();
        let mut names = vec![contact.address.to_lowercase()];
        names.extend(contact.email.as_ref().map(|e| e.to_lowercase()));
        for n in &names {
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

    /// Contact changes go to the shared bucket first (then to this store, as
    /// every node's mirror applies them): `queue.backend = "jetstream"`.
    pub fn share_contacts(&self, queue: Arc<crate::gateway::queue::jetstream::JetQueue>) {
        let _ = self.shared.set(queue);
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
                self.names.insert(c.address.to_lowercase().as_bytes(), fp.as_bytes())?;
                if let Some(e) = &c.email {
                    self.names.insert(e.to_lowercase().as_bytes(), fp.as_bytes())?;
                }
            }
            None => {
                self.contacts.remove(fp.as_bytes())?;
            }
        }
        Ok(())
    }

    fn remove_names(&self, c: &Contact) -> Result<(), StoreError> {
        self.names.remove(c.address.to_lowercase().as_bytes())?;
        if let Some(e) = &c.email {
            self.names.remove(e.to_lowercase().as_bytes())?;
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
        if let Some(mut c) = self.contact(fp)? {
            if !c.gone {
                c.gone = true;
                self.share(fp, Some(&c)).await?;
                self.contacts.insert(fp.as_bytes(), encode(&c))?;
                self.durable().await?;
            }
        }
        Ok(())
    }

    /// Points a contact at another server (after `35 Mailbox moved`).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn move_contact(&self, fp: &Fingerprint, server: &str) -> Result<(), StoreError> {
        if let Some(mut c) = self.contact(fp)? {
            c.server = Some(server.to_owned());
            self.share(fp, Some(&c)).await?;
            self.contacts.insert(fp.as_bytes(), encode(&c))?;
            self.durable().await?;
        }
        Ok(())
    }

    // ---- queue ----

    /// Queues `body` for each target, durably, and returns the message id.
    ///
    /// # Errors
    /// [`StoreError`]; then nothing is acknowledged (a partial write is
    /// either completed by recovery or collected as garbage).
    pub async fn enqueue(&self, body: &[u8], targets: Vec<Target>, origin: &Origin) -> Result<u64, StoreError> {
        let id = self.next_message_id()?;
        self.enqueue_as(id, body, targets, origin).await?;
        Ok(id)
    }

    /// A fresh message id, for a message that names its id (a `Received:` header) before it is queued.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn new_message_id(&self) -> Result<u64, StoreError> {
        self.next_message_id()
    }

    /// As [`Store::enqueue`], under an id from [`Store::new_message_id`].
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn enqueue_as(
        &self,
        id: u64,
        body: &[u8],
        targets: Vec<Target>,
        origin: &Origin,
    ) -> Result<(), StoreError> {
        self.enqueue_with_posts(id, body, targets, origin, &[]).await
    }

    /// As [`Store::enqueue_as`], and queues `posts` for IRC (after everything
    /// queued before) in the same durable step: when this fails, neither the
    /// jobs nor the posts remain.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn enqueue_with_posts(
        &self,
        id: u64,
        body: &[u8],
        targets: Vec<Target>,
        origin: &Origin,
        posts: &[IrcPost],
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let mut jobs = sled::Batch::default();
        let mut due = sled::Batch::default();
        let has_jobs = !targets.is_empty();
        for (i, target) in targets.into_iter().enumerate() {
            let index = u16::try_from(i).map_err(|_| corrupt("more than 65535 recipients"))?;
            let jid = JobId { message: id, index };
            let job = Job {
                message: id,
                target,
                origin: origin.clone(),
                arrived_ms: now,
                attempts: 0,
                due_ms: now,
                last_error: None,
            };
            jobs.insert(&jid.key(), encode(&job));
            due.insert(&due_key(now, jid), &[]);
        }
        let mut post_keys = Vec::new();
        let written = async {
            for post in posts {
                let key = self.db.generate_id()?.to_be_bytes();
                self.irc.insert(key, encode(post))?;
                post_keys.push(key);
            }
            if has_jobs {
                self.bodies.insert(id.to_be_bytes(), body)?;
                self.jobs.apply_batch(jobs)?;
            }
            self.durable().await
        };
        if let Err(e) = written.await {
            // Not acknowledged, so not to be delivered: take back what was written.
            self.discard_message(id);
            for key in post_keys {
                let _ = self.irc.remove(key);
            }
            return Err(self.record(e));
        }
        if !posts.is_empty() {
            self.irc_wake.notify_one();
        }
        if !has_jobs {
            return Ok(());
        }
        // The due index is rebuilt from the jobs at every open: no flush needed,
        // and the message is kept now, so a failure here must not refuse it.
        if let Err(e) = self.due.apply_batch(due) {
            tracing::warn!(error = %e, "Cannot index queued jobs; they are due again after a restart.");
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Queues posts for IRC on their own, durably; returns their keys (for
    /// [`Store::unqueue_posts`]).
    ///
    /// # Errors
    /// [`StoreError`]; then none of them remains.
    pub async fn queue_posts(&self, posts: &[IrcPost]) -> Result<Vec<[u8; 8]>, StoreError> {
        let mut keys = Vec::new();
        let written = async {
            for post in posts {
                let key = self.db.generate_id()?.to_be_bytes();
                self.irc.insert(key, encode(post))?;
                keys.push(key);
            }
            self.durable().await
        };
        if let Err(e) = written.await {
            self.unqueue_posts(&keys);
            return Err(self.record(e));
        }
        Ok(keys)
    }

    /// Takes back posts that were queued for a message that was then not acknowledged (best effort).
    pub fn unqueue_posts(&self, keys: &[[u8; 8]]) {
        for key in keys {
            let _ = self.irc.remove(key);
        }
    }

    /// Removes a message that was not acknowledged, with its jobs (best effort).
    fn discard_message(&self, id: u64) {
        let prefix = id.to_be_bytes();
        for key in self.jobs.scan_prefix(prefix).keys().flatten() {
            let _ = self.jobs.remove(key);
        }
        let _ = self.bodies.remove(prefix);
    }

    /// The body of a message.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn body(&self, message: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.bodies.get(message.to_be_bytes())?.map(|v| v.to_vec()))
    }

    /// Claims up to `max` jobs due at `now`: removes their due entries and
    /// returns them. Returns also the time the next job falls due, if any.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn claim_due(&self, now: u64, max: usize) -> Result<Claimed, StoreError> {
        let mut out = Vec::new();
        for kv in self.due.iter() {
            let (k, _) = kv?;
            let at: [u8; 8] = k.get(..8).and_then(|s| s.try_into().ok()).ok_or_else(|| corrupt("due key"))?;
            let at = u64::from_be_bytes(at);
            if at > now || out.len() >= max {
                return Ok((out, Some(at)));
            }
            self.due.remove(&k)?;
            let jid = JobId::from_key(&k[8..])?;
            if let Some(v) = self.jobs.get(jid.key())? {
                out.push((jid, decode(&v, "job")?));
            }
        }
        Ok((out, None))
    }

    /// A job is done: removes it, and its body if it was the last.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn complete(&self, id: JobId) -> Result<(), StoreError> {
        self.jobs.remove(id.key())?;
        self.collect_body(id.message)
    }

    fn collect_body(&self, message: u64) -> Result<(), StoreError> {
        let prefix = message.to_be_bytes();
        if self.jobs.scan_prefix(prefix).next().is_none() && self.dead.scan_prefix(prefix).next().is_none() {
            self.bodies.remove(prefix)?;
        }
        Ok(())
    }

    /// A temporary failure: records it and schedules the job at `due_ms`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn defer(&self, id: JobId, job: &Job) -> Result<(), StoreError> {
        self.jobs.insert(id.key(), encode(job))?;
        self.due.insert(due_key(job.due_ms, id), &[])?;
        // The worker may be asleep until a later job: let it look again.
        self.wake.notify_one();
        Ok(())
    }

    /// A permanent failure: moves the job to the dead letters and, if given,
    /// queues the failure report (a message and its one target) in the same
    /// transaction, durably. Returns the report's message id.
    ///
    /// # Errors
    /// [`StoreError`]: if the transaction failed nothing was changed; if only
    /// the flush failed, the change may or may not survive a crash, and the
    /// report becomes due at the next start.
    pub async fn kill(
        &self,
        id: JobId,
        job: &Job,
        report: Option<(Vec<u8>, Target)>,
    ) -> Result<Option<u64>, StoreError> {
        let now = now_ms();
        let report = match report {
            Some((body, target)) => {
                let rid = JobId { message: self.next_message_id()?, index: 0 };
                let rjob = Job {
                    message: rid.message,
                    target,
                    origin: Origin::Gateway,
                    arrived_ms: now,
                    attempts: 0,
                    due_ms: now,
                    last_error: None,
                };
                Some((rid, body, encode(&rjob)))
            }
            None => None,
        };
        let dead = encode(job);
        (&self.bodies, &self.jobs, &self.dead)
            .transaction(|(bodies, jobs, dead_letters)| {
                dead_letters.insert(&id.key(), dead.as_slice())?;
                jobs.remove(&id.key())?;
                if let Some((rid, body, rjob)) = &report {
                    bodies.insert(&rid.message.to_be_bytes(), body.as_slice())?;
                    jobs.insert(&rid.key(), rjob.as_slice())?;
                }
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
                sled::transaction::TransactionError::Abort(()) => corrupt("dead-letter transaction aborted"),
            })?;
        self.durable().await?;
        Ok(match report {
            Some((rid, _, _)) => {
                self.due.insert(due_key(now, rid), &[])?;
                self.wake.notify_one();
                Some(rid.message)
            }
            None => None,
        })
    }

    /// Every queued job, in id order.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn jobs(&self) -> Result<Vec<(JobId, Job)>, StoreError> {
        list_jobs(&self.jobs)
    }

    /// Every dead letter, in id order.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn dead_letters(&self) -> Result<Vec<(JobId, Job)>, StoreError> {
        list_jobs(&self.dead)
    }

    /// One job, queued or dead (and whether it is dead).
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn job(&self, id: JobId) -> Result<Option<(Job, bool)>, StoreError> {
        if let Some(v) = self.jobs.get(id.key())? {
            return Ok(Some((decode(&v, "job")?, false)));
        }
        Ok(self.dead.get(id.key())?.map(|v| decode(&v, "job")).transpose()?.map(|j| (j, true)))
    }

    /// Makes a queued job due now, or puts a dead letter back in the queue.
    /// Returns false if there is no such job.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn retry(&self, id: JobId) -> Result<bool, StoreError> {
        let now = now_ms();
        let found = if let Some((mut job, dead)) = self.job(id)? {
            if !dead {
                self.due.remove(due_key(job.due_ms, id))?;
            }
            job.due_ms = now;
            if dead {
                job.arrived_ms = now;
                job.attempts = 0;
            }
            self.jobs.insert(id.key(), encode(&job))?;
            self.dead.remove(id.key())?;
            self.due.insert(due_key(now, id), &[])?;
            true
        } else {
            false
        };
        self.durable().await?;
        self.wake.notify_one();
        Ok(found)
    }

    /// Deletes a queued job or dead letter. Returns false if there is no such job.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn delete(&self, id: JobId) -> Result<bool, StoreError> {
        let Some((job, _)) = self.job(id)? else { return Ok(false) };
        self.due.remove(due_key(job.due_ms, id))?;
        self.jobs.remove(id.key())?;
        self.dead.remove(id.key())?;
        self.collect_body(id.message)?;
        self.durable().await?;
        Ok(true)
    }

    /// The oldest post for IRC.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn irc_first(&self) -> Result<Option<(sled::IVec, IrcPost)>, StoreError> {
        match self.irc.first()? {
            Some((k, v)) => Ok(Some((k, decode(&v, "irc post")?))),
            None => Ok(None),
        }
    }

    /// A post went out.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn irc_done(&self, key: &[u8]) -> Result<(), StoreError> {
        self.irc.remove(key)?;
        Ok(())
    }

    /// Records a (un)subscription by message, durably.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn set_subscription(&self, channel: &str, address: &str, on: bool) -> Result<(), StoreError> {
        let key = format!("{}\0{}", channel.to_lowercase(), address.to_lowercase());
        if let Some(q) = self.shared.get() {
            q.share_subscription(key.as_bytes(), on).await?;
        }
        self.apply_subscription(key.as_bytes(), Some(on))?;
        self.durable().await
    }

    /// Sets (or, with `None`, forgets) a subscription record by its key,
    /// without a flush: for the mirror of the shared subscriptions.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn apply_subscription(&self, key: &[u8], on: Option<bool>) -> Result<(), StoreError> {
        match on {
            Some(on) => self.subs.insert(key, if on { &b"1"[..] } else { &b"0"[..] })?,
            None => self.subs.remove(key)?,
        };
        Ok(())
    }

    /// The subscribers of `channel` (`#name@network`): `configured`, changed by messages.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn subscribers(&self, channel: &str, configured: &[String]) -> Result<Vec<String>, StoreError> {
        let prefix = format!("{}\0", channel.to_lowercase());
        let mut out: Vec<String> = configured.iter().map(|a| a.to_lowercase()).collect();
        for kv in self.subs.scan_prefix(prefix.as_bytes()) {
            let (k, v) = kv?;
            let address = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            out.retain(|a| *a != address);
            if v.as_ref() == b"1" {
                out.push(address);
            }
        }
        Ok(out)
    }

    /// Queue depth by state.
    pub fn depth(&self) -> Depth {
        let mut d = Depth { dead: self.dead.len() as u64, ..Depth::default() };
        for (_, v) in self.jobs.iter().flatten() {
            match decode::<Job>(&v, "job") {
                Ok(j) if j.attempts > 0 => d.deferred += 1,
                _ => d.active += 1,
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smtp(rcpt: &str) -> Target {
        Target::Smtp { rcpt: rcpt.into() }
    }

    #[tokio::test]
    async fn jobs_survive_reopening_and_bodies_go_with_the_last_job() {
        let dir = tempfile::tempdir().unwrap();
        let origin = Origin::Smtp { from: "a@example.org".into() };
        let id = {
            let s = Store::open(dir.path()).unwrap();
            let id = s.enqueue(b"body", vec![smtp("x@e"), smtp("y@e")], &origin).await.unwrap();
            let (claimed, _) = s.claim_due(now_ms(), 10).unwrap();
            assert_eq!(claimed.len(), 2);
            // Claimed jobs are not handed out twice while the gateway runs.
            assert!(s.claim_due(now_ms(), 10).unwrap().0.is_empty());
            id
        };
        let s = Store::open(dir.path()).unwrap();
        // After a restart the due index is rebuilt: both jobs are due again.
        let (claimed, _) = s.claim_due(now_ms(), 10).unwrap();
        assert_eq!(claimed.len(), 2);
        s.complete(claimed[0].0).unwrap();
        assert_eq!(s.body(id).unwrap().as_deref(), Some(&b"body"[..]));
        let report = Some((b"report".to_vec(), smtp("a@example.org")));
        let rid = s.kill(claimed[1].0, &claimed[1].1, report).await.unwrap().unwrap();
        assert!(s.body(id).unwrap().is_some(), "a dead letter keeps its body");
        // The report is queued with the dead letter, and due.
        let (reports, _) = s.claim_due(now_ms(), 10).unwrap();
        assert_eq!(reports.len(), 1);
        assert_eq!((reports[0].0.message, &reports[0].1.target), (rid, &smtp("a@example.org")));
        assert_eq!(s.body(rid).unwrap().as_deref(), Some(&b"report"[..]));
        s.complete(reports[0].0).unwrap();
        assert!(s.delete(claimed[1].0).await.unwrap());
        assert_eq!(s.body(id).unwrap(), None);
        assert!(s.jobs().unwrap().is_empty() && s.dead_letters().unwrap().is_empty());
    }

    #[tokio::test]
    async fn deferred_jobs_wait_for_their_time_and_retry_brings_them_forward() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.enqueue(b"b", vec![smtp("x@e")], &Origin::Gateway).await.unwrap();
        let (mut claimed, _) = s.claim_due(now_ms(), 10).unwrap();
        let (id, mut job) = claimed.remove(0);
        job.attempts = 1;
        job.due_ms = now_ms() + 60_000;
        s.defer(id, &job).unwrap();
        let (none, next) = s.claim_due(now_ms(), 10).unwrap();
        assert!(none.is_empty());
        assert_eq!(next, Some(job.due_ms));
        assert_eq!(s.depth().deferred, 1);
        assert!(s.retry(id).await.unwrap());
        assert_eq!(s.claim_due(now_ms(), 10).unwrap().0.len(), 1);
        assert!(!s.retry(JobId { message: 999, index: 0 }).await.unwrap());
    }

    #[test]
    fn job_ids_print_and_parse() {
        let id = JobId { message: 42, index: 3 };
        assert_eq!(id.to_string(), "00000000002A.3");
        assert_eq!("00000000002A.3".parse::<JobId>().unwrap(), id);
        assert!("nope".parse::<JobId>().is_err());
    }
}
