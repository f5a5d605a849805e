//! The delivery queue behind one interface, with two backends
//! (`queue.backend`): `sled` (the default: the queue in the gateway's own
//! database, see [`super::store`]) and `jetstream` (NATS JetStream, shared by
//! several gateway nodes, see [`jetstream`]).
//!
//! Either way a message is acknowledged (`250`, `31`) only after
//! [`Queue::enqueue`] returned: after the fsync with sled, after JetStream's
//! publish ack with jetstream. Contacts, pins, the IRC outbox and
//! subscriptions stay in the node's sled database; with jetstream the
//! contacts are mirrored from a shared key-value bucket.

pub mod jetstream;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::AckKind;

use super::store::{now_ms, Claimed, IrcPost, Job, JobId, Origin, Store, StoreError, Target};

/// Which post [`Queue::next_post`] gave.
pub enum PostKey {
    /// Its key in the sled outbox.
    Sled(sled::IVec),
    /// Its message on the shared outbox.
    Shared(Box<async_nats::jetstream::Message>),
}

/// The queue of this gateway node.
pub enum Queue {
    /// In the gateway's sled database.
    Sled(Arc<Store>),
    /// On NATS JetStream; the node's own sled database keeps the rest.
    JetStream(Arc<jetstream::JetQueue>, Arc<Store>),
}

impl Queue {
    /// The node's sled store (contacts, pins, IRC outbox).
    pub fn store(&self) -> &Arc<Store> {
        match self {
            Queue::Sled(s) | Queue::JetStream(_, s) => s,
        }
    }

    /// The JetStream queue, with that backend.
    pub fn jetstream(&self) -> Option<&Arc<jetstream::JetQueue>> {
        match self {
            Queue::JetStream(j, _) => Some(j),
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
            Queue::JetStream(j, _) => j.new_message_id(),
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
            Queue::JetStream(j, _) => {
                j.enqueue(id, body, targets, origin).await?;
                j.post_irc(id, posts).await
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
            Queue::JetStream(j, _) => Ok(j.next_post().await?.map(|(m, p)| (PostKey::Shared(Box::new(m)), p))),
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
            Queue::JetStream(j, _) => Ok((j.claim(max).await?, Some(0))),
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
            Queue::JetStream(..) => {}
        }
    }

    /// Whether a claimed job is still to be delivered (not deleted or
    /// retried by the operator meanwhile). A job whose state cannot be read is.
    pub fn pending(&self, id: JobId) -> bool {
        match self {
            Queue::Sled(s) => matches!(s.job(id), Ok(Some((_, false))) | Err(_)),
            Queue::JetStream(j, _) => j.holds(id),
        }
    }

    /// The message of a claimed job.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn body(&self, id: JobId) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Queue::Sled(s) => s.body(id.message),
            Queue::JetStream(j, _) => Ok(j.body(id)),
        }
    }

    /// A job is done.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn complete(&self, id: JobId) -> Result<(), StoreError> {
        match self {
            Queue::Sled(s) => s.complete(id),
            Queue::JetStream(j, _) => j.complete(id).await,
        }
    }

    /// A temporary failure: the job is due again at `job.due_ms`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn defer(&self, id: JobId, job: &Job) -> Result<(), StoreError> {
        match self {
            Queue::Sled(s) => s.defer(id, job),
            Queue::JetStream(j, _) => j.defer(id, job).await,
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
            Queue::JetStream(j, _) => {
                let rid = j.new_message_id()?;
                let reported = report.is_some();
                j.kill(id, job, report, rid).await?;
                Ok(reported.then_some(rid))
            }
        }
    }
}
