//! The node's sled database (`<data_dir>/queue`): one database and one
//! group commit for the queue ([`super::queue::sled`]), the contacts
//! ([`super::contacts`]), the IRC outbox and subscriptions
//! ([`super::outbox`]), the TOFU pins (`crate::pins`) and the embedded home
//! server's trees.
//!
//! Key layout:
//! - `contacts`: owner fingerprint (32 octets) -> `Contact` (JSON).
//! - `contact_names`: lower-cased LATSSIAM address or email alias -> fingerprint (32).
//! - `bodies`: message id (u64 BE) -> the message octets (an Internet Message),
//!   or, for a message over [`SPOOL_OVER`] octets, [`SPOOLED`]: the octets
//!   are then in the file `spool/<id in hex>` beside the database, written
//!   and fsynced before the entry (sled keeps every value it holds in
//!   memory, whatever its cache size, so large messages stay out of it). A
//!   spool file without an entry is removed at the next start.
//! - `jobs`: job id = message id (u64 BE) ‖ recipient index (u16 BE) -> `Job` (JSON).
//! - `due`: due time (ms since the epoch, u64 BE) ‖ job id -> empty.
//! - `dead`: job id -> `Job` (JSON) with its last error: dead letters.
//! - `irc_outbox`: sequence (u64 BE) -> `IrcPost` (JSON): posts for IRC,
//!   sent strictly in key order by one task.
//! - `irc_subs`: `#channel@network` NUL address (lower case) -> `1`
//!   (subscribed by message) or `0` (unsubscribed by message); these override
//!   the subscribers in the settings.
//! - `tofu_pins`: see `crate::pins`.
//! - the default tree: `health.probe` -> time (u64 BE), written by each health check.
//! - `home.mailboxes`, `home.messages`: the embedded home server's store
//!   (`latssiam::server::store`), sharing this database and its fsyncs.
//!
//! With `queue.backend = "jetstream"` the jobs, bodies and dead letters are
//! on JetStream instead, and `contacts`/`irc_subs` mirror shared buckets
//! ([`super::queue::jetstream`]).

use std::path::Path;
use std::sync::Arc;

use latssiam::group_commit::GroupCommit;
use latssiam::Fingerprint;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::target::now_ms;

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
    /// The embedded home server's mailbox store failed.
    #[error("{0}")]
    Home(#[from] latssiam::server::store::StoreError),
}

pub(crate) fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(what.to_owned())
}

pub(crate) fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serialising these plain structs to JSON cannot fail (no maps with non-string keys).
    serde_json::to_vec(v).unwrap_or_default()
}

/// Messages larger than this are spooled to files, not kept in sled.
pub const SPOOL_OVER: usize = 64 * 1024;

/// The `bodies` value of a spooled message.
pub const SPOOLED: &[u8] = b"\0latssiam-bridge spooled\0";

/// A future of a [`SharedRecords`] method.
pub type SharedFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Where contact and subscription changes go first when several nodes share
/// them (the JetStream queue implements it), before this store applies
/// them. Records travel as this store encodes them, so that nothing here
/// names a backend or the records' types.
pub trait SharedRecords: Send + Sync + 'static {
    /// Writes (or with `None` removes) the contact of `fp` (an encoded
    /// `Contact`); inner `Err` with the reason when one of its names belongs
    /// to another contact. Returns the record's revision.
    fn share_contact<'a>(
        &'a self,
        fp: &'a Fingerprint,
        record: Option<&'a [u8]>,
    ) -> SharedFuture<'a, Result<u64, String>>;

    /// Changes the newest version of the contact of `fp` with `change`
    /// (encoded in, encoded out; `None` leaves it), compare-and-set; the
    /// record written and its revision, or `None` if there is no such contact.
    fn update_contact<'a>(
        &'a self,
        fp: &'a Fingerprint,
        change: &'a (dyn Fn(&[u8]) -> Option<Vec<u8>> + Send + Sync),
    ) -> SharedFuture<'a, Option<(Vec<u8>, u64)>>;

    /// Writes a subscription (key as in the subscriptions tree, its value).
    fn share_subscription<'a>(&'a self, key: &'a [u8], value: &'static [u8]) -> SharedFuture<'a, ()>;
}

/// The gateway's store.
pub struct Store {
    pub(crate) db: sled::Db,
    pub(crate) contacts: sled::Tree,
    pub(crate) names: sled::Tree,
    pub(crate) bodies: sled::Tree,
    pub(crate) jobs: sled::Tree,
    pub(crate) due: sled::Tree,
    pub(crate) dead: sled::Tree,
    pub(crate) irc: sled::Tree,
    pub(crate) subs: sled::Tree,
    /// The IRC bridge's state (see [`super::irc_state`]).
    pub(crate) irc_window: sled::Tree,
    pub(crate) irc_ids: sled::Tree,
    pub(crate) irc_pastes: sled::Tree,
    pub(crate) irc_status: sled::Tree,
    /// Where large message bodies are kept (see the module docs).
    pub(crate) spool: std::path::PathBuf,
    pub(crate) flusher: Arc<GroupCommit>,
    /// Woken when a job becomes due earlier than the worker may think.
    pub wake: Notify,
    /// Woken once, when a write fails for good (see [`Store::broken`]).
    pub failed: Notify,
    pub(crate) broken: std::sync::OnceLock<String>,
    pub(crate) free_space: latssiam::files::FreeSpace,
    /// Woken when a post for IRC is queued.
    pub irc_wake: Notify,
    /// With `queue.backend = "jetstream"`: where contact and subscription changes go first.
    pub(crate) shared: std::sync::OnceLock<Arc<dyn SharedRecords>>,
    /// Held while a contact is checked and written on this node.
    pub(crate) contact_writes: tokio::sync::Mutex<()>,
    /// The shared bucket's revision applied last, per contact; held across
    /// each whole `apply_contact`.
    pub(crate) contact_revisions: std::sync::Mutex<std::collections::HashMap<latssiam::Fingerprint, u64>>,
    /// Contacts decoded, as [`Store::contact`] returns them.
    pub(crate) contact_cache: super::contact::ContactCache,
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
            irc_window: db.open_tree("irc_window")?,
            irc_ids: db.open_tree("irc_ids")?,
            irc_pastes: db.open_tree("irc_pastes")?,
            irc_status: db.open_tree("irc_state")?,
            spool: {
                let spool = dir.join("spool");
                latssiam::files::create_private_dir(&spool).map_err(|e| StoreError::Sled(e.into()))?;
                spool
            },
            db,
            flusher: Arc::new(flusher),
            wake: Notify::new(),
            irc_wake: Notify::new(),
            failed: Notify::new(),
            broken: std::sync::OnceLock::new(),
            free_space: latssiam::files::FreeSpace::new(dir, min_free),
            shared: std::sync::OnceLock::new(),
            contact_writes: tokio::sync::Mutex::new(()),
            contact_revisions: std::sync::Mutex::default(),
            contact_cache: super::contact::ContactCache::default(),
        };
        store.recover()?;
        Ok(Arc::new(store))
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
    /// it, and so does the embedded home server's message log, so the store
    /// is broken until the process opens it anew.
    pub(crate) fn record(&self, e: StoreError) -> StoreError {
        use latssiam::server::store::StoreError as Home;
        let io = matches!(
            e,
            StoreError::Sled(sled::Error::Io(_))
                | StoreError::Flush(latssiam::group_commit::FlushError::Io(_))
                | StoreError::Home(Home::Sled(sled::Error::Io(_)) | Home::Bodies(_))
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

    pub(crate) fn next_message_id(&self) -> Result<u64, StoreError> {
        // generate_id is monotonic across restarts; keep ids non-zero and increasing.
        Ok(self.db.generate_id()? + 1)
    }

    /// Contact and subscription changes go to the shared buckets first (then
    /// to this store, as every node's mirror applies them): `queue.backend = "jetstream"`.
    pub fn share_state(&self, queue: Arc<dyn SharedRecords>) {
        let _ = self.shared.set(queue);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// A failed fdatasync of the embedded home server's log poisons that log
    /// as a failed flush poisons sled: either breaks the store (the gateway
    /// then stops, for its supervisor to start it anew), while a refusal
    /// that is no I/O error does not.
    #[test]
    fn an_io_error_of_the_home_servers_log_breaks_the_store_as_one_of_sled_does() {
        use latssiam::server::store::StoreError as Home;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let _ = store.record(StoreError::Home(Home::Corrupt("a record")));
        let _ = store.record(StoreError::Home(Home::Closed));
        assert_eq!(store.broken(), None);
        let _ = store.record(StoreError::Home(Home::Sled(sled::Error::Io(std::io::Error::other("fdatasync failed")))));
        assert!(store.broken().is_some_and(|e| e.contains("fdatasync failed")), "{:?}", store.broken());

        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let _ = store.record(StoreError::Home(Home::Bodies(std::io::Error::other("no space left"))));
        assert!(store.broken().is_some());
    }
}
