//! The delivery queue behind two small traits, with two backends
//! (`queue.backend`): `sled` (the default: the queue in the node's own
//! database, see [`sled`]) and `jetstream` (NATS JetStream, shared by
//! several gateway nodes, see [`jetstream`]).
//!
//! - [`JobQueue`]: the job queue (enqueue, claim, complete, defer, dead
//!   letters) and the IRC outbox, which every node has.
//! - [`Cluster`]: what only exists when several nodes share the work
//!   (leases, fragment sets every node sees, counters every node counts in).
//!   A single node has none.
//!
//! Nothing above these traits names a backend: `start.rs` picks one, and a
//! third backend is one new file implementing them.
//!
//! Either way a message is acknowledged (`250`, `31`) only after
//! [`JobQueue::enqueue_with_posts`] returned: after the fsync with sled,
//! after JetStream's publish ack with jetstream. With jetstream the IRC
//! outbox is on JetStream too, and the contacts, subscriptions and TOFU
//! pins in the node's sled database mirror shared key-value buckets (see
//! [`super::db::SharedRecords`] and `crate::pins::SharedPins`).

pub mod jetstream;
pub mod sled;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use latssiam::Fingerprint;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::db::{corrupt, SharedFuture, Store, StoreError};
use super::outbox::IrcPost;
pub use super::target::{now_ms, Target};

/// How long a post taken from a shared IRC outbox stays this node's
/// without [`PostTicket::alive`] (the bot renews it every third of it).
pub const POST_ACK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A boxed future of a queue method.
pub type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A future that cannot fail, of a queue method.
pub type Quiet<'a> = Boxed<'a, ()>;

/// One message queued at once with others (an IRC digest): its id, octets and recipients.
pub struct DigestJob {
    /// From [`JobQueue::new_message_id`].
    pub id: u64,
    /// The Internet Message.
    pub body: Vec<u8>,
    /// Its recipients.
    pub targets: Vec<Target>,
}

/// A post taken from the IRC outbox, until it is settled.
pub trait PostTicket: Send + Sync {
    /// While the post goes out: keeps it this node's (shared outbox).
    fn alive(&self) -> Quiet<'_>;

    /// The post went out (`true`), or could not (it comes again, first).
    ///
    /// # Errors
    /// [`StoreError`].
    fn done(self: Box<Self>, posted: bool) -> SharedFuture<'static, ()>;
}

/// The job queue of this gateway node, and its IRC outbox.
pub trait JobQueue: Send + Sync + 'static {
    /// Whether other gateway nodes take jobs from this queue too.
    fn shared(&self) -> bool;

    /// A fresh message id (unique across nodes when shared).
    ///
    /// # Errors
    /// [`StoreError`].
    fn new_message_id(&self) -> Result<u64, StoreError>;

    /// Queues `body` for each target under `id` (from
    /// [`JobQueue::new_message_id`]), and the IRC posts, durably. With sled,
    /// when this fails neither remain; with jetstream, what JetStream
    /// acknowledged before another publish failed stays and goes out, so
    /// the sender's retry may deliver that recipient (or post) twice.
    ///
    /// # Errors
    /// [`StoreError`]; then nothing is acknowledged.
    fn enqueue_with_posts<'a>(
        &'a self,
        id: u64,
        body: &'a [u8],
        targets: Vec<Target>,
        origin: &'a Origin,
        posts: &'a [IrcPost],
    ) -> SharedFuture<'a, ()>;

    /// Queues IRC digests and takes their lines (`keys`) out of `store`'s
    /// window: with sled in one transaction; with jetstream the digests
    /// first (under ids kept until then, so that a repeat after a crash
    /// falls in JetStream's duplicate window), then the lines.
    ///
    /// # Errors
    /// [`StoreError`]; the lines then still wait.
    fn enqueue_digests<'a>(
        &'a self,
        store: &'a Store,
        keys: &'a [::sled::IVec],
        digests: &'a [DigestJob],
    ) -> SharedFuture<'a, ()>;

    /// Up to `max` jobs to deliver now, and when to look again at the
    /// latest (sled: when the next job falls due; jetstream: at once, the
    /// claim itself waits for work).
    ///
    /// # Errors
    /// [`StoreError`].
    fn claim(&self, max: usize) -> SharedFuture<'_, Claimed>;

    /// Waits until a job may be due (`next` from [`JobQueue::claim`]).
    fn wait(&self, next: Option<u64>) -> Quiet<'_>;

    /// Whether a claimed job is still to be delivered (not deleted or
    /// retried by the operator meanwhile). A job whose state cannot be read is.
    fn pending(&self, id: JobId) -> bool;

    /// The message of a claimed job.
    ///
    /// # Errors
    /// [`StoreError`].
    fn body(&self, id: JobId) -> Result<Option<Vec<u8>>, StoreError>;

    /// The size of a job's body without reading it, if known.
    fn body_size(&self, id: JobId) -> Option<usize>;

    /// A job is done.
    ///
    /// # Errors
    /// [`StoreError`].
    fn complete(&self, id: JobId) -> SharedFuture<'_, ()>;

    /// A temporary failure: the job is due again at `job.due_ms`.
    ///
    /// # Errors
    /// [`StoreError`].
    fn defer<'a>(&'a self, id: JobId, job: &'a Job) -> SharedFuture<'a, ()>;

    /// A permanent failure: dead-letters the job and queues `report`;
    /// returns the report's id.
    ///
    /// # Errors
    /// [`StoreError`].
    fn kill<'a>(&'a self, id: JobId, job: &'a Job, report: Option<(Vec<u8>, Target)>) -> SharedFuture<'a, Option<u64>>;

    /// Keeps the jobs this node claimed its own until `alive` is cancelled
    /// (a shared queue hands unclaimed-looking jobs to other nodes).
    fn keep_alive(self: Arc<Self>, _alive: CancellationToken) -> Quiet<'static> {
        Box::pin(async {})
    }

    /// Gives back at once every job claimed but not delivered (shutdown).
    fn release_all(&self) -> Quiet<'_> {
        Box::pin(async {})
    }

    /// The oldest post for IRC, waiting a little for one.
    ///
    /// # Errors
    /// [`StoreError`].
    fn next_post(&self) -> SharedFuture<'_, Option<(Box<dyn PostTicket>, IrcPost)>>;
}

impl dyn JobQueue {
    /// Queues `body` for each target under a fresh id, durably; returns the id.
    ///
    /// # Errors
    /// [`StoreError`]; then nothing is acknowledged.
    pub async fn enqueue(&self, body: &[u8], targets: Vec<Target>, origin: &Origin) -> Result<u64, StoreError> {
        let id = self.new_message_id()?;
        self.enqueue_with_posts(id, body, targets, origin, &[]).await?;
        Ok(id)
    }

    /// As [`JobQueue::enqueue_with_posts`], without posts.
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
}

/// What [`Cluster::offer_fragment`] did.
pub enum SharedOffer {
    /// Kept (or seen before); the set is not complete, or another node joins it.
    Kept,
    /// This node joins the set: the original message.
    Join(Vec<u8>),
    /// Refused by section 8.
    Refused(latssiam::fragment::Refused),
}

/// What several gateway nodes sharing one queue coordinate through: leases
/// (one IRC bot per network), fragment sets every node sees, and the
/// hourly counters every node counts in.
pub trait Cluster: super::hourly::SharedCounter + Send + Sync + 'static {
    /// The lease time of leases (`irc.lease_secs` of the node that made the bucket).
    fn lease_ttl(&self) -> std::time::Duration;

    /// Tries to take (or keep, with the revision of the last renewal) the
    /// lease `name` for `holder`; the new revision while held.
    fn lease<'a>(&'a self, name: &'a str, holder: &'a str, revision: Option<u64>) -> Boxed<'a, Option<u64>>;

    /// Gives the lease up (shutdown): another node takes it at once.
    fn release_lease<'a>(&'a self, name: &'a str, revision: u64) -> Quiet<'a>;

    /// Keeps a contact's fragment where every node sees it; the node whose
    /// fragment completes the set gets the joined message.
    ///
    /// # Errors
    /// [`StoreError`]: the fragment is not acknowledged.
    fn offer_fragment<'a>(
        &'a self,
        signer: &'a Fingerprint,
        fragment: &'a latssiam::fragment::Fragment<'_>,
        limit: usize,
    ) -> SharedFuture<'a, SharedOffer>;

    /// Removes a joined set's pieces.
    fn finish_fragments<'a>(&'a self, signer: &'a Fingerprint, id: &'a str, total: u32) -> Quiet<'a>;

    /// A set this node joined could not be kept: it may be joined again.
    fn unjoin_fragments<'a>(&'a self, signer: &'a Fingerprint, id: &'a str) -> Quiet<'a>;
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

impl Job {
    /// A job of message `message` for `target`, arrived and due `now`.
    pub fn fresh(message: u64, target: Target, origin: Origin, now: u64) -> Self {
        Self { message, target, origin, arrived_ms: now, attempts: 0, due_ms: now, last_error: None }
    }
}

/// The fresh jobs of message `message`, one per target in order, each with
/// its id; `None` past 65,535 targets (a job's index is a `u16`), which
/// every caller reports as its own error.
pub(crate) fn fresh_jobs(
    message: u64,
    targets: impl IntoIterator<Item = Target>,
    origin: &Origin,
    now: u64,
) -> Option<Vec<(JobId, Job)>> {
    targets
        .into_iter()
        .enumerate()
        .map(|(i, target)| {
            let index = u16::try_from(i).ok()?;
            Some((JobId { message, index }, Job::fresh(message, target, origin.clone(), now)))
        })
        .collect()
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
    pub(crate) fn key(self) -> [u8; 10] {
        let mut k = [0u8; 10];
        k[..8].copy_from_slice(&self.message.to_be_bytes());
        k[8..].copy_from_slice(&self.index.to_be_bytes());
        k
    }

    pub(crate) fn from_key(k: &[u8]) -> Result<Self, StoreError> {
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
