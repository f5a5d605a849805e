//! The delivery queue behind one interface, with two backends
//! (`queue.backend`): `sled` (the default: the queue in the node's own
//! database, see [`sled`]) and `jetstream` (NATS JetStream, shared by
//! several gateway nodes, see [`jetstream`]).
//!
//! Either way a message is acknowledged (`250`, `31`) only after
//! [`Queue::enqueue`] returned: after the fsync with sled, after JetStream's
//! publish ack with jetstream. With jetstream the IRC outbox is on
//! JetStream too, and the contacts, subscriptions and TOFU pins in the
//! node's sled database mirror shared key-value buckets.

pub mod jetstream;
pub mod sled;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use serde::{Deserialize, Serialize};

use super::db::{corrupt, Store, StoreError};
use super::outbox::IrcPost;
pub use super::target::{now_ms, Target};

/// Which post [`Queue::next_post`] gave.
pub enum PostKey {
    /// Its key in the sled outbox.
    Sled(::sled::IVec),
    /// Its message on the shared outbox.
    Shared(Box<async_nats::jetstream::Message>),
}

/// One message queued at once with others (an IRC digest): its id, octets and recipients.
pub struct DigestJob {
    /// From [`Queue::new_message_id`].
    pub id: u64,
    /// The Internet Message.
    pub body: Vec<u8>,
    /// Its recipients.
    pub targets: Vec<Target>,
}

/// The queue of this gateway node.
#[derive(Clone)]
pub enum Queue {
    /// In the gateway's sled database.
    Sled(Arc<Store>),
    /// On NATS JetStream.
    JetStream(Arc<jetstream::JetQueue>),
}

impl Queue {
    /// The JetStream queue, with that backend.
    pub fn jetstream(&self) -> Option<&Arc<jetstream::JetQueue>> {
        match self {
            Queue::JetStream(j) => Some(j),
            Queue::Sled(_) => None,
        }
    }

    /// A fresh message id (unique across nodes with jetstream).
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn new_message_id(&self) -> Result<u64, StoreError> {
        match self {
            Queue::Sled(s) => s.new_message_id(),
            Queue::JetStream(j) => j.new_message_id(),
        }
    }

    /// Queues `body` for each target under a fresh id, durably; returns the id.
    ///
    /// # Errors
    /// [`StoreError`]; then nothing is acknowledged.
    pub async fn enqueue(&self, body: &[u8], targets: Vec<Target>, origin: &Origin) -> Result<u64, StoreError> {
        let id = self.new_message_id()?;
        self.enqueue_with_posts(id, body, targets, origin, &[]).await?;
        Ok(id)
    }

    /// As [`Queue::enqueue`], under an id from [`Queue::new_message_id`].
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

    /// Queues the jobs and the IRC posts: with sled, when this fails neither
    /// remain; with jetstream, what JetStream acknowledged before another
    /// publish failed stays and goes out, so the sender's retry may deliver
    /// that recipient (or post) twice.
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
        match self {
            Queue::Sled(s) => s.enqueue_with_posts(id, body, targets, origin, posts).await,
            Queue::JetStream(j) => {
                j.enqueue(id, body, targets, origin).await?;
                j.post_irc(id, posts).await
            }
        }
    }

    /// Queues IRC digests and takes their lines out of `store`'s window:
    /// with sled in one transaction; with jetstream the digests first (under
    /// ids kept until then, so that a repeat after a crash falls in
    /// JetStream's duplicate window), then the lines.
    ///
    /// # Errors
    /// [`StoreError`]; the lines then still wait.
    pub async fn enqueue_digests(
        &self,
        store: &Store,
        keys: &[::sled::IVec],
        digests: &[DigestJob],
    ) -> Result<(), StoreError> {
        match self {
            Queue::Sled(s) => s.enqueue_digests(keys, digests).await,
            Queue::JetStream(j) => {
                for d in digests {
                    j.enqueue(d.id, &d.body, d.targets.clone(), &Origin::Gateway).await?;
                }
                store.window_remove(keys).await
            }
        }
    }

    /// The oldest post for IRC, waiting a little for one.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn next_post(&self) -> Result<Option<(PostKey, IrcPost)>, StoreError> {
        match self {
            Queue::Sled(s) => {
                if let Some((k, p)) = s.irc_first()? {
                    return Ok(Some((PostKey::Sled(k), p)));
                }
                let _ = tokio::time::timeout(Duration::from_secs(5), s.irc_wake.notified()).await;
                Ok(None)
            }
            Queue::JetStream(j) => Ok(j.next_post().await?.map(|(m, p)| (PostKey::Shared(Box::new(m)), p))),
        }
    }

    /// While a post goes out (with jetstream: keeps it this node's).
    pub async fn post_alive(&self, key: &PostKey) {
        if let (Queue::JetStream(j), PostKey::Shared(m)) = (self, key) {
            j.post_alive(m).await;
        }
    }

    /// The post went out (`true`) or could not (it comes again, first).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn post_done(&self, key: PostKey, posted: bool) -> Result<(), StoreError> {
        match (self, key) {
            (Queue::Sled(s), PostKey::Sled(k)) if posted => s.irc_done(&k),
            (_, PostKey::Shared(m)) => {
                let kind = if posted { AckKind::Ack } else { AckKind::Nak(Some(Duration::from_secs(1))) };
                m.ack_with(kind).await.map_err(|e| StoreError::Shared(format!("IRC outbox: {e}")))
            }
            _ => Ok(()),
        }
    }

    /// Up to `max` jobs to deliver now, and when to look again at the
    /// latest (sled: when the next job falls due; jetstream: at once, the
    /// claim itself waits for work).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn claim(&self, max: usize) -> Result<Claimed, StoreError> {
        match self {
            Queue::Sled(s) => s.claim_due(now_ms(), max),
            Queue::JetStream(j) => Ok((j.claim(max).await?, Some(0))),
        }
    }

    /// Waits until a job may be due (sled), or not at all (jetstream).
    pub async fn wait(&self, next: Option<u64>) {
        match self {
            Queue::Sled(s) => {
                let wait =
                    next.map_or(Duration::from_secs(60), |at| Duration::from_millis(at.saturating_sub(now_ms())));
                tokio::select! {
                    () = s.wake.notified() => {}
                    () = tokio::time::sleep(wait.min(Duration::from_secs(60))) => {}
                }
            }
            Queue::JetStream(_) => {}
        }
    }

    /// Whether a claimed job is still to be delivered (not deleted or
    /// retried by the operator meanwhile). A job whose state cannot be read is.
    pub fn pending(&self, id: JobId) -> bool {
        match self {
            Queue::Sled(s) => matches!(s.job(id), Ok(Some((_, false))) | Err(_)),
            Queue::JetStream(j) => j.holds(id),
        }
    }

    /// The message of a claimed job.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn body(&self, id: JobId) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Queue::Sled(s) => s.body(id.message),
            Queue::JetStream(j) => Ok(j.body(id)),
        }
    }

    /// The size of a job's body without reading it (a spooled body's file
    /// size), if known.
    pub fn body_size(&self, id: JobId) -> Option<usize> {
        match self {
            Queue::Sled(s) => s.body_size(id.message),
            Queue::JetStream(j) => j.body_len(id),
        }
    }

    /// A job is done.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn complete(&self, id: JobId) -> Result<(), StoreError> {
        match self {
            Queue::Sled(s) => s.complete(id),
            Queue::JetStream(j) => j.complete(id).await,
        }
    }

    /// A temporary failure: the job is due again at `job.due_ms`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn defer(&self, id: JobId, job: &Job) -> Result<(), StoreError> {
        match self {
            Queue::Sled(s) => s.defer(id, job),
            Queue::JetStream(j) => j.defer(id, job).await,
        }
    }

    /// A permanent failure: dead-letters the job and queues `report`; returns the report's id.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn kill(
        &self,
        id: JobId,
        job: &Job,
        report: Option<(Vec<u8>, Target)>,
    ) -> Result<Option<u64>, StoreError> {
        match self {
            Queue::Sled(s) => s.kill(id, job, report).await,
            Queue::JetStream(j) => j.kill(id, job, report).await,
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

impl Job {
    /// A job of message `message` for `target`, arrived and due `now`.
    pub fn fresh(message: u64, target: Target, origin: Origin, now: u64) -> Self {
        Self { message, target, origin, arrived_ms: now, attempts: 0, due_ms: now, last_error: None }
    }
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
