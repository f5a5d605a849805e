//! The queue on NATS JetStream (`queue.backend = "jetstream"`): several
//! gateway nodes share one queue, and the contacts with it.
//!
//! - Jobs: the work-queue stream `STREAM` (subject `STREAM.jobs`), one
//!   message per recipient: a 4-octet big-endian length, the [`Job`] as JSON,
//!   then the message octets. Each is published with `Nats-Msg-Id` = the job
//!   id, so a re-publish within the stream's duplicate window is dropped, and
//!   a message is acknowledged to whoever handed it over (`250`, `31`) only
//!   after JetStream acknowledged the publish of every job: the durable point
//!   is the stream's ack, not an fsync of ours.
//! - Workers: one durable pull consumer (`workers`) shared by every node,
//!   explicit acks with `queue.ack_wait_secs`; a node keeps every job it holds
//!   (in flight or waiting for its destination) alive with progress acks, so
//!   only a dead node's jobs are handed to another.
//! - Outcomes: `31` (or `250` from the smarthost) -> a marker `JOBID` in the
//!   key-value bucket `STREAM-delivered`, then the acknowledged ack
//!   (`double_ack`); a redelivered job whose marker exists is acked without
//!   being sent again (the node died between the two). A temporary failure ->
//!   the job re-published with its new state (attempts, last error, due time
//!   by the gateway's own backoff), the old one acked; a node handed it before
//!   its time gives it back with `nak` and the delay left. A permanent failure -> the job
//!   on `STREAM.dead` in the stream `STREAM-dead` and its failure report as a
//!   new job (both deduplicated by id), then the ack.
//! - Contacts: the key-value bucket `STREAM-contacts` (fingerprint in hex ->
//!   [`Contact`] as JSON) is the truth; every node mirrors it into its own
//!   sled tree (a watcher from the start of the bucket's history), so lookups
//!   stay local and a change made on any node reaches the others. IRC
//!   subscriptions likewise, in `STREAM-subs` (key: the hex of
//!   `#channel@network NUL address`, value `1` or `0`), and the TOFU pins in
//!   `STREAM-pins` (key: the hex of `host:port`, value: the 32 octets).
//! - IRC: the posts for IRC in the work-queue stream `STREAM-irc` (subject
//!   `STREAM.irc`), read by one consumer with one post in flight (in order);
//!   one node at a time runs the bot: the holder of the lease `irc` in the
//!   bucket `STREAM-leases`, whose entries expire `irc.lease_secs` after
//!   their last renewal (created only if absent, renewed by compare-and-set).
//! - Fragments (PROFILE section 8) from contacts, whichever node took them
//!   off the home server: the bucket `STREAM-partials`, entries kept 25
//!   hours. Per set (`SIGNER` and `SET` in hex, the set as the SHA-256 of its
//!   id): `t.SIGNER.SET` the total, `s.SIGNER.SET.N` slice N (created only if
//!   absent: a second slice N with other octets is refused), `c.SIGNER.SET`
//!   how many slices are in (compare-and-set), and `d.SIGNER.SET` created by
//!   the one node that joins the set (and kept as its tombstone).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream, AckKind};
use bytes::Bytes;
use futures_util::StreamExt as _;
use latssiam::Fingerprint;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    fresh_jobs, now_ms, Boxed, Claimed, Cluster, DigestJob, Job, JobId, JobQueue, Origin, PostTicket, Quiet,
    SharedOffer, Target,
};
use crate::gateway::config::Settings;
use crate::gateway::contacts::Contact;
use crate::gateway::db::{decode, encode, SharedFuture, Store, StoreError};
use crate::gateway::outbox::IrcPost;

/// How long an alias claim whose contact is not (yet) in the bucket still
/// holds: the claim is made first and the contact written after it.
const CLAIM_GRACE: time::Duration = time::Duration::seconds(30);

/// How long a publish may wait for JetStream's ack before the message is
/// refused (`451`): a NATS outage must not hold SMTP sessions.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one fetch waits for jobs when the stream is empty.
const FETCH_WAIT: Duration = Duration::from_secs(2);

/// How long the pieces of a fragment set are kept (the section 8 lifetime
/// and an hour more, so that a set is never half forgotten while it counts).
const PARTIALS_AGE: Duration = Duration::from_secs(25 * 3600);

/// How long a delivered-marker is kept (longer than any redelivery can take).
const MARKER_AGE: Duration = Duration::from_secs(24 * 3600);

/// How long a dead letter is kept on `STREAM-dead`, and how many octets the
/// stream may hold (the oldest go first): each carries its whole message,
/// and a stream without limits grows until every publish fails.
const DEAD_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
const DEAD_BYTES: i64 = 1 << 30;

fn shared(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Shared(format!("{what}: {e}"))
}

/// A job held by this node: the message to ack, and the body it carries.
struct Held {
    message: jetstream::Message,
    body: Bytes,
}

/// The JetStream queue of one node.
pub struct JetQueue {
    client: async_nats::Client,
    stream: String,
    js: jetstream::Context,
    subject: String,
    dead_subject: String,
    consumer: consumer::PullConsumer,
    delivered: kv::Store,
    contacts: kv::Store,
    subs: kv::Store,
    pins: kv::Store,
    leases: kv::Store,
    partials: kv::Store,
    /// Hourly limits every node counts in (see [`crate::gateway::hourly`]).
    hourly: kv::Store,
    /// Which contact holds each name (hex of the lower-cased name -> fingerprint).
    aliases: kv::Store,
    irc_subject: String,
    irc: consumer::PullConsumer,
    held: Mutex<HashMap<JobId, Held>>,
    ack_wait: Duration,
    lease_ttl: Duration,
    /// The longest a job is given back for (`queue.max_retry_secs`): a due
    /// time further ahead (another node's clock, a planted record) is not
    /// obeyed beyond it.
    max_delay: Duration,
}

/// Connects to `queue.nats_url` and makes (or finds) the streams, the
/// consumer and the buckets.
///
/// # Errors
/// A message naming what failed.
pub async fn connect(s: &Settings) -> anyhow::Result<JetQueue> {
    use anyhow::Context as _;
    let q = &s.queue;
    let mut options = async_nats::ConnectOptions::new()
        .name(format!("latssiam-bridge {}", s.gateway.hostname))
        .connection_timeout(Duration::from_secs(10))
        .request_timeout(Some(PUBLISH_TIMEOUT))
        // Reconnects for ever: while NATS is away, mail is refused with 451.
        .max_reconnects(None);
    if !q.nats_user.is_empty() {
        options = options.user_and_password(q.nats_user.clone(), q.nats_password.clone());
    }
    if !q.nats_token.is_empty() {
        options = options.token(q.nats_token.clone());
    }
    if !q.nats_creds.as_os_str().is_empty() {
        options = options
            .credentials_file(&q.nats_creds)
            .await
            .with_context(|| format!("queue.nats_creds {}", q.nats_creds.display()))?;
    }
    if !q.nats_tls_ca.as_os_str().is_empty() {
        options = options.add_root_certificates(q.nats_tls_ca.clone()).require_tls(true);
    }
    if !q.nats_tls_cert.as_os_str().is_empty() {
        options = options.add_client_certificate(q.nats_tls_cert.clone(), q.nats_tls_key.clone()).require_tls(true);
    }
    let client = options.connect(&q.nats_url).await.with_context(|| format!("queue.nats_url {}", q.nats_url))?;
    let js = jetstream::new(client.clone());
    let name = q.stream.clone();
    let subject = format!("{name}.jobs");
    let dead_subject = format!("{name}.dead");
    let replicas = q.nats_replicas.max(1);
    let stream_config = |name: String, subject: &str, retention| stream::Config {
        name,
        subjects: vec![subject.to_owned()],
        retention,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    let work_queue = stream::RetentionPolicy::WorkQueue;
    let jobs = js
        .get_or_create_stream(stream_config(name.clone(), &subject, work_queue))
        .await
        .with_context(|| format!("queue.stream {name}: cannot make the jobs stream"))?;
    js.create_or_update_stream(stream::Config {
        max_age: DEAD_AGE,
        max_bytes: DEAD_BYTES,
        discard: stream::DiscardPolicy::Old,
        ..stream_config(format!("{name}-dead"), &dead_subject, stream::RetentionPolicy::Limits)
    })
    .await
    .with_context(|| format!("queue.stream {name}: cannot make the dead-letter stream"))?;
    let consumer = jobs
        .get_or_create_consumer(
            "workers",
            consumer::pull::Config {
                durable_name: Some("workers".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(q.ack_wait_secs.max(3)),
                // The gateway applies queue.lifetime_secs itself.
                max_deliver: -1,
                max_ack_pending: -1,
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("queue.stream {name}: cannot make the consumer"))?;
    let bucket = |suffix: &str, max_age: Duration| kv::Config {
        bucket: format!("{name}-{suffix}"),
        history: 1,
        max_age,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    };
    // The consumer and buckets may have been made by another node with other
    // settings: the times that matter are the ones they have.
    let ack_wait = consumer.cached_info().config.ack_wait;
    if ack_wait != Duration::from_secs(q.ack_wait_secs.max(3)) {
        warn!(
            ack_wait_secs = ack_wait.as_secs(),
            "The shared consumer's ack wait differs from queue.ack_wait_secs; using the consumer's."
        );
    }
    let delivered = open_bucket(&js, bucket("delivered", MARKER_AGE)).await?;
    let contacts = open_bucket(&js, bucket("contacts", Duration::ZERO)).await?;
    let subs = open_bucket(&js, bucket("subs", Duration::ZERO)).await?;
    let pins = open_bucket(&js, bucket("pins", Duration::ZERO)).await?;
    let leases = open_bucket(&js, bucket("leases", Duration::from_secs(s.irc.lease_secs.max(3)))).await?;
    let lease_ttl = leases.status().await.map(|st| st.max_age()).context("the leases bucket")?;
    // Open sets hold at most what the sled joiner allows all signers together
    // (SETS_IN_ALL largest messages): beyond it a fragment stays on the home
    // server and is offered again later, instead of NATS's store filling up.
    let partials_bytes = i64::try_from(
        (s.smtp.max_message_size + latssiam::fragment::TRACE_ROOM)
            .saturating_mul(usize::try_from(latssiam::fragment::SETS_IN_ALL).unwrap_or(16)),
    )
    .unwrap_or(i64::MAX);
    let partials =
        open_bucket(&js, kv::Config { max_bytes: partials_bytes, ..bucket("partials", PARTIALS_AGE) }).await?;
    // Windows of an hour or a day, kept a little longer than the longest.
    let hourly = open_bucket(&js, bucket("hourly", Duration::from_secs(25 * 3600))).await?;
    let aliases = open_bucket(&js, bucket("aliases", Duration::ZERO)).await?;
    let irc_subject = format!("{name}.irc");
    let irc = js
        .get_or_create_stream(stream_config(format!("{name}-irc"), &irc_subject, work_queue))
        .await
        .with_context(|| format!("queue.stream {name}: cannot make the IRC outbox stream"))?
        .get_or_create_consumer(
            "irc",
            consumer::pull::Config {
                durable_name: Some("irc".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                // Kept alive while a post goes out: a dead leader's post comes back soon.
                ack_wait: super::POST_ACK_WAIT,
                max_deliver: -1,
                // One post at a time: they go out in the order they were queued.
                max_ack_pending: 1,
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("queue.stream {name}: cannot make the IRC outbox consumer"))?;
    info!(url = %q.nats_url, stream = %name, "The queue is on NATS JetStream.");
    Ok(JetQueue {
        client,
        stream: name.clone(),
        js,
        subject,
        dead_subject,
        consumer,
        delivered,
        contacts,
        subs,
        pins,
        leases,
        partials,
        hourly,
        aliases,
        irc_subject,
        irc,
        held: Mutex::new(HashMap::new()),
        ack_wait,
        lease_ttl,
        max_delay: Duration::from_secs(q.max_retry_secs.max(1)),
    })
}

async fn open_bucket(js: &jetstream::Context, config: kv::Config) -> anyhow::Result<kv::Store> {
    let name = config.bucket.clone();
    match js.get_key_value(&name).await {
        Ok(store) => Ok(store),
        Err(_) => js
            .create_key_value(config)
            .await
            .map_err(|e| anyhow::anyhow!("cannot make the key-value bucket {name}: {e}")),
    }
}

fn frame(job: &Job, body: &[u8]) -> Bytes {
    let json = serde_json::to_vec(job).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + json.len() + body.len());
    out.extend_from_slice(&u32::try_from(json.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(body);
    Bytes::from(out)
}

fn unframe(payload: &Bytes) -> Option<(Job, Bytes)> {
    let len: [u8; 4] = payload.get(..4)?.try_into().ok()?;
    let end = 4usize.checked_add(usize::try_from(u32::from_be_bytes(len)).ok()?)?;
    let job = serde_json::from_slice(payload.get(4..end)?).ok()?;
    Some((job, payload.slice(end..)))
}

impl JetQueue {
    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Held>> {
        self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A message id no other node hands out (random, 64 bits).
    ///
    /// # Errors
    /// [`StoreError`] if there is no randomness.
    pub fn new_message_id(&self) -> Result<u64, StoreError> {
        Ok(random_u64()?.max(1))
    }

    /// Publishes one job per target and waits for JetStream's ack of every one.
    ///
    /// # Errors
    /// [`StoreError::Shared`] if any publish failed or was not acknowledged in time.
    pub async fn enqueue(&self, id: u64, body: &[u8], targets: Vec<Target>, origin: &Origin) -> Result<(), StoreError> {
        let now = now_ms();
        let jobs =
            fresh_jobs(id, targets, origin, now).ok_or_else(|| shared("enqueue", "more than 65535 recipients"))?;
        let mut acks = Vec::with_capacity(jobs.len());
        for (jid, job) in &jobs {
            acks.push(self.publish(&self.subject, &jid.to_string(), frame(job, body)).await?);
        }
        for ack in acks {
            wait_ack(ack).await?;
        }
        Ok(())
    }

    /// [`JetQueue::publish`], and its ack awaited.
    async fn publish_acked(&self, subject: &str, msg_id: &str, payload: Bytes) -> Result<(), StoreError> {
        wait_ack(self.publish(subject, msg_id, payload).await?).await
    }

    async fn publish(
        &self,
        subject: &str,
        msg_id: &str,
        payload: Bytes,
    ) -> Result<jetstream::context::PublishAckFuture, StoreError> {
        // While disconnected the client would keep the publish and send it on
        // reconnection, long after the message was refused with 451: a
        // refused message must not be delivered (the sender sends it again).
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(shared("publish", "not connected to NATS"));
        }
        let publish = jetstream::message::PublishMessage::build().payload(payload).message_id(msg_id);
        match tokio::time::timeout(PUBLISH_TIMEOUT, self.js.send_publish(subject.to_owned(), publish)).await {
            Ok(Ok(ack)) => Ok(ack),
            Ok(Err(e)) => Err(shared("publish", e)),
            Err(_) => Err(shared("publish", "timed out")),
        }
    }

    /// Up to `max` jobs for this node, waiting at most [`FETCH_WAIT`] for the first.
    ///
    /// # Errors
    /// [`StoreError::Shared`] if NATS cannot be reached or JetStream answers
    /// with an error status (then the worker waits a second).
    pub async fn claim(&self, max: usize) -> Result<Vec<(JobId, Job)>, StoreError> {
        let batch = self
            .consumer
            .fetch()
            .max_messages(max.max(1))
            .expires(FETCH_WAIT)
            .messages()
            .await
            .map_err(|e| shared("fetch", e))?;
        let mut batch = std::pin::pin!(batch);
        let mut out = Vec::new();
        let now = now_ms();
        while let Some(message) = batch.next().await {
            let message = match message {
                Ok(m) => m,
                Err(e) if out.is_empty() => return Err(shared("fetch", e)),
                Err(e) => {
                    debug!(error = %e, "JetStream fetch ended.");
                    break;
                }
            };
            let Some((job, body)) = unframe(&message.payload) else {
                self.bury_undecodable("job", message).await;
                continue;
            };
            let index = message
                .headers
                .as_ref()
                .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                .and_then(|v| v.as_str().split('/').next().and_then(|id| id.parse::<JobId>().ok()))
                .map_or(0, |id| id.index);
            let id = JobId { message: job.message, index };
            // A deferred job, re-published with its new state, before its time.
            // A due time beyond the longest backoff (another node's clock far
            // ahead, a planted record) is not obeyed: the job is due now, so
            // it cannot be frozen past queue.lifetime_secs.
            let ahead = job.due_ms.saturating_sub(now);
            if ahead > 50 && Duration::from_millis(ahead) <= self.max_delay {
                let _ = message.ack_with(AckKind::Nak(Some(Duration::from_millis(ahead)))).await;
                continue;
            }
            {
                let mut held = self.held();
                if let Some(h) = held.get_mut(&id) {
                    // Handed out again to this very node (its keep-alives were
                    // lost in a NATS outage): the copy it holds goes on, acked
                    // through the newest delivery.
                    h.message = message;
                    continue;
                }
            }
            let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
            if delivered > 1 {
                // Handed out before: to a node that may have delivered it and died before the ack.
                if matches!(self.delivered.get(id.to_string()).await, Ok(Some(_))) {
                    info!(job = %id, "Redelivered job was delivered already; not sent again.");
                    let _ = message.double_ack().await;
                    continue;
                }
            }
            self.held().insert(id, Held { message, body });
            out.push((id, job));
        }
        Ok(out)
    }

    /// Keeps a record that does not decode (a version skew in a rolling
    /// upgrade, or a writer that is not a gateway) as it is, on the
    /// dead-letter subject, and only then terminates it: nothing
    /// acknowledged vanishes without a trace. If that publish fails, the
    /// record comes back later.
    async fn bury_undecodable(&self, what: &str, message: jetstream::Message) {
        let seq = message.info().map(|i| i.stream_sequence).unwrap_or_default();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, format!("undecodable-{}-{seq}", message.subject).as_str());
        headers.insert("LATSSIAM-Bridge-Undecodable", format!("{what} from {}", message.subject).as_str());
        let kept = match self.js.publish_with_headers(self.dead_subject.clone(), headers, message.payload.clone()).await
        {
            Ok(ack) => wait_ack(ack).await,
            Err(e) => Err(shared("publish", e)),
        };
        match kept {
            Ok(()) => {
                warn!(subject = %message.subject, seq, "A {what} that does not decode was moved to the dead letters.");
                let _ = message.ack_with(AckKind::Term).await;
            }
            Err(e) => {
                warn!(error = %e, "Cannot keep a {what} that does not decode; it comes back later.");
                let _ = message.ack_with(AckKind::Nak(Some(Duration::from_secs(10)))).await;
            }
        }
    }

    /// Whether this node holds the job (so it is neither done nor given up).
    pub fn holds(&self, id: JobId) -> bool {
        self.held().contains_key(&id)
    }

    /// The size of a held job's body.
    pub fn body_len(&self, id: JobId) -> Option<usize> {
        self.held().get(&id).map(|h| h.body.len())
    }

    /// The body of a job this node holds.
    pub fn body(&self, id: JobId) -> Option<Vec<u8>> {
        self.held().get(&id).map(|h| h.body.to_vec())
    }

    fn take(&self, id: JobId) -> Result<Held, StoreError> {
        self.held().remove(&id).ok_or_else(|| shared("ack", format!("job {id} is not held by this node")))
    }

    /// Delivered: the marker, then the acknowledged ack.
    ///
    /// # Errors
    /// [`StoreError::Shared`]; the job is then redelivered after the ack wait
    /// (and skipped if the marker was written).
    pub async fn complete(&self, id: JobId) -> Result<(), StoreError> {
        let held = self.take(id)?;
        if let Err(e) = self.delivered.put(id.to_string(), Bytes::new()).await {
            warn!(job = %id, error = %e, "Cannot write the delivered-marker; a redelivery would send it again.");
        }
        held.message.double_ack().await.map_err(|e| shared("ack", e))
    }

    /// A temporary failure (or a job put back unstarted): re-published with
    /// its new state (attempts, last error, due time; JetStream's own
    /// delivery count also counts hand-outs that were no attempt), then the
    /// old message acked. Should the re-publish fail, the old message comes
    /// back when due, with its old state.
    ///
    /// # Errors
    /// [`StoreError::Shared`].
    pub async fn defer(&self, id: JobId, job: &Job) -> Result<(), StoreError> {
        let held = self.take(id)?;
        let delay = Duration::from_millis(job.due_ms.saturating_sub(now_ms()));
        let republished = async {
            // A fresh id for each re-publish (two within the duplicate window must both stay).
            let msg_id = format!("{id}/{:016x}", random_u64()?);
            self.publish_acked(&self.subject, &msg_id, frame(job, &held.body)).await
        };
        if let Err(e) = republished.await {
            let _ = held.message.ack_with(AckKind::Nak(Some(delay))).await;
            return Err(e);
        }
        held.message.double_ack().await.map_err(|e| shared("ack", e))
    }

    /// A permanent failure: the dead letter and the report (a new job),
    /// then the ack. Returns the report's message id.
    ///
    /// # Errors
    /// [`StoreError::Shared`]; the job then comes back in a while and fails
    /// again (the re-publishes are dropped as duplicates within two minutes).
    pub async fn kill(
        &self,
        id: JobId,
        job: &Job,
        report: Option<(Vec<u8>, Target)>,
    ) -> Result<Option<u64>, StoreError> {
        let held = self.take(id)?;
        let recorded = async {
            self.publish_acked(&self.dead_subject, &format!("dead-{id}"), frame(job, &held.body)).await?;
            let Some((body, target)) = report else { return Ok(None) };
            let rjob = Job::fresh(self.new_message_id()?, target, Origin::Gateway, now_ms());
            // Deduplicated by the failed job's id: a second failure of the same
            // job (after a lost ack) reports nothing new.
            self.publish_acked(&self.subject, &format!("report-{id}"), frame(&rjob, &body)).await?;
            Ok(Some(rjob.message))
        };
        let reported = match recorded.await {
            Ok(r) => r,
            Err(e) => {
                let _ = held.message.ack_with(AckKind::Nak(Some(Duration::from_secs(10)))).await;
                return Err(e);
            }
        };
        held.message.double_ack().await.map_err(|e| shared("ack", e))?;
        Ok(reported)
    }

    /// Gives up every held job at once (shutdown): each comes back at once to another node.
    pub async fn release_all(&self) {
        let held: Vec<Held> = self.held().drain().map(|(_, h)| h).collect();
        for h in held {
            let _ = h.message.ack_with(AckKind::Nak(None)).await;
        }
        let _ = self.client.flush().await;
    }

    /// Keeps the held jobs from being handed to another node, until `shutdown`.
    pub async fn keep_alive(self: Arc<Self>, shutdown: CancellationToken) {
        let every = self.ack_wait / 3;
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = shutdown.cancelled() => return,
            }
            let messages: Vec<jetstream::Message> = self.held().values().map(|h| h.message.clone()).collect();
            for m in messages {
                let _ = m.ack_with(AckKind::Progress).await;
            }
        }
    }

    /// The jobs stream's name (`queue.stream`).
    pub fn stream_name(&self) -> &str {
        &self.stream
    }

    /// What the shared queue holds, for `queue list`.
    ///
    /// # Errors
    /// [`StoreError::Shared`].
    pub async fn summary(&self) -> Result<String, StoreError> {
        let count = |name: String| async move {
            let mut stream = self.js.get_stream(&name).await.map_err(|e| shared("stream", e))?;
            let info = stream.info().await.map_err(|e| shared("stream info", e))?;
            Ok::<_, StoreError>(info.state.messages)
        };
        let jobs = count(self.stream.clone()).await?;
        let dead = count(format!("{}-dead", self.stream)).await?;
        let irc = count(format!("{}-irc", self.stream)).await?;
        Ok(format!(
            "-- {jobs} jobs on the JetStream stream {0} (in flight or waiting), {dead} dead letters on {0}-dead, \
             {irc} posts for IRC on {0}-irc; `nats stream view {0}` shows them\n",
            self.stream
        ))
    }

    // ---- contacts ----

    /// Every shared contact.
    ///
    /// # Errors
    /// [`StoreError::Shared`].
    pub async fn contacts(&self) -> Result<Vec<Contact>, StoreError> {
        let keys = self.contacts.keys().await.map_err(|e| shared("contacts bucket", e))?;
        let keys: Vec<String> = keys.filter_map(|k| async move { k.ok() }).collect().await;
        let mut out = Vec::new();
        for key in keys {
            if let Some(value) = self.contacts.get(key).await.map_err(|e| shared("contacts bucket", e))? {
                match serde_json::from_slice::<Contact>(&value) {
                    Ok(c) => out.push(c),
                    Err(e) => warn!(error = %e, "A shared contact does not decode; skipped."),
                }
            }
        }
        Ok(out)
    }

    /// Writes a contact (or its removal) to the shared bucket, its names
    /// claimed first in the alias index (`STREAM-aliases`, by `create`): of
    /// two nodes adding different contacts with one alias at once, exactly
    /// one wins. Returns the revision written, or why it was refused.
    ///
    /// # Errors
    /// [`StoreError::Shared`].
    pub async fn share_contact(
        &self,
        fp: &Fingerprint,
        contact: Option<&Contact>,
    ) -> Result<Result<u64, String>, StoreError> {
        let key = fp.to_string();
        let before = self.shared_contact(&key).await?;
        let old_names: Vec<String> = before.iter().flat_map(|c| c.names().collect::<Vec<_>>()).collect();
        let Some(c) = contact else {
            self.contacts.delete(&key).await.map_err(|e| shared("contacts bucket", e))?;
            for name in &old_names {
                self.release_alias(name, fp).await;
            }
            let revision = self.contacts.entry(&key).await.ok().flatten().map_or(0, |e| e.revision);
            return Ok(Ok(revision));
        };
        let mut claimed = Vec::new();
        for name in c.names() {
            match self.claim_alias(&name, fp).await? {
                Ok(fresh) => {
                    if fresh {
                        claimed.push(name);
                    }
                }
                Err(why) => {
                    for n in &claimed {
                        self.release_alias(n, fp).await;
                    }
                    return Ok(Err(why));
                }
            }
        }
        let value = serde_json::to_vec(c).map_err(|e| shared("contact", e))?;
        let revision = self.contacts.put(&key, value.into()).await.map_err(|e| shared("contacts bucket", e))?;
        for name in old_names.iter().filter(|n| !c.names().any(|m| m == **n)) {
            self.release_alias(name, fp).await;
        }
        Ok(Ok(revision))
    }

    async fn shared_contact(&self, key: &str) -> Result<Option<Contact>, StoreError> {
        let value = self.contacts.get(key).await.map_err(|e| shared("contacts bucket", e))?;
        Ok(value.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Claims `name` for `fp` in the alias index: `Ok(true)` newly claimed,
    /// `Ok(false)` already `fp`'s, `Err` held by another contact. A claim
    /// whose holder no longer names it (a writer that died between the
    /// claim and the contact) is taken over by compare-and-set.
    /// (A claim is stale, and taken over, only once its contact has had
    /// [`CLAIM_GRACE`] to be written and does not name it.)
    async fn claim_alias(&self, name: &str, fp: &Fingerprint) -> Result<Result<bool, String>, StoreError> {
        let key = hex(name.as_bytes());
        let mine = Bytes::from(fp.to_string());
        let taken = || Ok(Err(format!("{name} already belongs to another contact")));
        for _ in 0..5 {
            match self.aliases.create(&key, mine.clone()).await {
                Ok(_) => return Ok(Ok(true)),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => return Err(shared("aliases bucket", e)),
            }
            let Some(entry) = self.aliases.entry(&key).await.map_err(|e| shared("aliases bucket", e))? else {
                continue;
            };
            if entry.operation != kv::Operation::Put {
                continue;
            }
            if entry.value == mine {
                return Ok(Ok(false));
            }
            let holder = String::from_utf8_lossy(&entry.value).into_owned();
            let holds = self.shared_contact(&holder).await?.is_some_and(|c| c.names().any(|n| n == name));
            // A contact is written after its claims: a young claim whose
            // contact is not there yet is one being written now (taking it
            // over let two contacts both win), not a stale one.
            let young = time::OffsetDateTime::now_utc() - entry.created < CLAIM_GRACE;
            if holds || young {
                return taken();
            }
            if self.aliases.update(&key, mine.clone(), entry.revision).await.is_ok() {
                return Ok(Ok(true));
            }
        }
        taken()
    }

    /// Gives up `name` if `fp` holds it (best effort: a stale claim is taken
    /// over by the next contact that names it).
    async fn release_alias(&self, name: &str, fp: &Fingerprint) {
        let key = hex(name.as_bytes());
        if let Ok(Some(entry)) = self.aliases.entry(&key).await {
            if entry.operation == kv::Operation::Put && entry.value == fp.to_string().as_bytes() {
                let _ = self.aliases.delete_expect_revision(&key, Some(entry.revision)).await;
            }
        }
    }

    /// Changes a shared contact by compare-and-set (another node may change
    /// it at the same time): `change` is applied to the newest version;
    /// nothing is done if the contact was removed. Returns the contact as written.
    ///
    /// # Errors
    /// [`StoreError::Shared`], also after five conflicts in a row.
    pub async fn update_contact(
        &self,
        fp: &Fingerprint,
        change: impl Fn(&mut Contact),
    ) -> Result<Option<(Contact, u64)>, StoreError> {
        let key = fp.to_string();
        for _ in 0..5 {
            let Some(entry) = self.contacts.entry(key.clone()).await.map_err(|e| shared("contacts bucket", e))? else {
                return Ok(None);
            };
            if entry.operation != kv::Operation::Put {
                return Ok(None);
            }
            let mut contact: Contact = serde_json::from_slice(&entry.value).map_err(|e| shared("contact", e))?;
            change(&mut contact);
            let value = serde_json::to_vec(&contact).map_err(|e| shared("contact", e))?;
            if let Ok(revision) = self.contacts.update(key.clone(), value.into(), entry.revision).await {
                return Ok(Some((contact, revision)));
            }
        }
        Err(shared("contacts bucket", "changed by others five times in a row"))
    }

    /// Writes a subscription change to the shared bucket.
    ///
    /// # Errors
    /// [`StoreError::Shared`].
    pub async fn share_subscription(
        &self,
        key: &[u8],
        mode: crate::gateway::outbox::Subscription,
    ) -> Result<(), StoreError> {
        let value = Bytes::from_static(mode.as_bytes());
        self.subs.put(hex(key), value).await.map(drop).map_err(|e| shared("subscriptions bucket", e))
    }

    /// Mirrors the shared contacts, subscriptions and pins into this node until
    /// `shutdown`: first everything there is, then each change as it
    /// happens. Returns once the first full pass is applied; the mirrors go
    /// on in tasks.
    ///
    /// # Errors
    /// [`StoreError::Shared`] if a bucket cannot be watched or is not read within 30 s.
    pub async fn mirror(
        self: &Arc<Self>,
        store: Arc<Store>,
        pins: crate::pins::SledPins,
        shutdown: CancellationToken,
    ) -> Result<(), StoreError> {
        let s = Arc::clone(&store);
        let contacts = mirror_bucket(self.contacts.clone(), shutdown.clone(), move |key, value, revision| {
            let Ok(fp) = key.parse::<Fingerprint>() else { return };
            let contact = match value.map(serde_json::from_slice::<Contact>).transpose() {
                Ok(c) => c,
                Err(e) => return warn!(key, error = %e, "A shared contact does not decode; ignored."),
            };
            // A record under another key than its certificate's fingerprint
            // (a writer that is not a gateway) would seal to one person and
            // deliver to another's mailbox.
            if contact.as_ref().is_some_and(|c| c.fingerprint() != fp) {
                return warn!(key, "A shared contact's certificate is not its key's; ignored.");
            }
            if let Err(e) = s.apply_contact(&fp, contact.as_ref(), Some(revision)) {
                warn!(error = %e, "Cannot mirror a shared contact.");
            }
        })
        .await?;
        let pinned = mirror_bucket(self.pins.clone(), shutdown.clone(), move |key, value, _| {
            let Some(peer) = unhex(key).and_then(|k| String::from_utf8(k).ok()) else { return };
            if let Err(e) = pins.apply(&peer, value) {
                warn!(error = %e, "Cannot mirror a shared TOFU pin.");
            }
        })
        .await?;
        let subs = mirror_bucket(self.subs.clone(), shutdown, move |key, value, _| {
            let Some(k) = unhex(key) else { return };
            if let Err(e) = store.apply_subscription(&k, value.map(crate::gateway::outbox::Subscription::from_bytes)) {
                warn!(error = %e, "Cannot mirror a shared subscription.");
            }
        })
        .await?;
        // Mail is taken only once every contact is known (an unknown one would get a 550).
        for mut ready in [contacts, subs, pinned] {
            match tokio::time::timeout(Duration::from_secs(30), ready.wait_for(|r| *r)).await {
                Ok(Ok(_)) => {}
                _ => return Err(shared("mirror", "the shared buckets were not read within 30 s")),
            }
        }
        Ok(())
    }

    // ---- IRC ----

    /// Queues posts for IRC on the shared outbox, in order, acknowledged.
    ///
    /// # Errors
    /// [`StoreError::Shared`].
    pub async fn post_irc(&self, id: u64, posts: &[IrcPost]) -> Result<(), StoreError> {
        for (i, post) in posts.iter().enumerate() {
            let payload = serde_json::to_vec(post).map_err(|e| shared("IRC post", e))?;
            self.publish_acked(&self.irc_subject, &format!("post-{id:016X}-{i}"), payload.into()).await?;
        }
        Ok(())
    }

    /// The next post for IRC (waiting up to [`FETCH_WAIT`]), with the message to ack once it is posted.
    ///
    /// # Errors
    /// [`StoreError::Shared`].
    pub async fn next_post(&self) -> Result<Option<(jetstream::Message, IrcPost)>, StoreError> {
        let batch =
            self.irc.fetch().max_messages(1).expires(FETCH_WAIT).messages().await.map_err(|e| shared("fetch", e))?;
        let mut batch = std::pin::pin!(batch);
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| shared("fetch", e))?;
            match serde_json::from_slice(&m.payload) {
                Ok(post) => return Ok(Some((m, post))),
                Err(e) => {
                    warn!(error = %e, "A post in the IRC outbox does not decode.");
                    self.bury_undecodable("post", m).await;
                }
            }
        }
        Ok(None)
    }

    /// Tries to take (or keep, with the revision of the last renewal) the lease `name`.
    pub async fn lease(&self, name: &str, holder: &str, revision: Option<u64>) -> Option<u64> {
        let value = Bytes::copy_from_slice(holder.as_bytes());
        match revision {
            None => self.leases.create(name, value).await.ok(),
            Some(r) => self.leases.update(name, value, r).await.ok(),
        }
    }

    /// Keeps a contact's fragment where every node sees it (see the module
    /// docs); the node whose fragment completes the set (and that wins the
    /// set's `d.` key) gets the joined message. A set nobody completes goes
    /// with the bucket's age limit.
    ///
    /// # Errors
    /// [`StoreError`] if NATS fails: the fragment is not acknowledged.
    pub async fn offer_fragment(
        &self,
        signer: &Fingerprint,
        fragment: &latssiam::fragment::Fragment<'_>,
        limit: usize,
    ) -> Result<SharedOffer, StoreError> {
        use async_nats::jetstream::kv::CreateErrorKind;
        use latssiam::fragment::Refused;
        let fail = |e: &dyn std::fmt::Display| shared("partials bucket", e);
        let set = set_key(signer, &fragment.id);
        if self.partials.get(format!("d.{set}")).await.map_err(|e| fail(&e))?.is_some() {
            return Ok(SharedOffer::Kept);
        }
        let total = Bytes::copy_from_slice(&fragment.total.to_be_bytes());
        match self.partials.create(format!("t.{set}"), total.clone()).await {
            Ok(_) => {}
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {
                let was = self.partials.get(format!("t.{set}")).await.map_err(|e| fail(&e))?.unwrap_or_default();
                if was != total {
                    let was = was.get(..4).and_then(|b| b.try_into().ok()).map_or(0, u32::from_be_bytes);
                    return Ok(SharedOffer::Refused(Refused::TotalChanged { was, now: fragment.total }));
                }
            }
            Err(e) => return Err(fail(&e)),
        }
        if fragment.slice.len() > limit {
            return Ok(SharedOffer::Refused(Refused::TooLarge(limit)));
        }
        let key = format!("s.{set}.{}", fragment.number);
        let new = match self.partials.create(&key, Bytes::copy_from_slice(fragment.slice)).await {
            Ok(_) => true,
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {
                let held = self.partials.get(&key).await.map_err(|e| fail(&e))?.unwrap_or_default();
                if held.as_ref() != fragment.slice {
                    return Ok(SharedOffer::Refused(Refused::Conflict(fragment.number)));
                }
                false
            }
            Err(e) => return Err(fail(&e)),
        };
        // Count the slices in: by compare-and-set for a new one; for one seen
        // before (its node may have died before counting it) by looking.
        let complete = if new {
            loop {
                let entry = self.partials.entry(format!("c.{set}")).await.map_err(|e| fail(&e))?;
                let (have, revision) = match &entry {
                    Some(e) => (
                        e.value.get(..4).and_then(|b| b.try_into().ok()).map_or(0, u32::from_be_bytes),
                        Some(e.revision),
                    ),
                    None => (0, None),
                };
                let value = Bytes::copy_from_slice(&(have + 1).to_be_bytes());
                let written = match revision {
                    Some(r) => self.partials.update(format!("c.{set}"), value, r).await.is_ok(),
                    None => self.partials.create(format!("c.{set}"), value).await.is_ok(),
                };
                if written {
                    break have + 1 >= fragment.total;
                }
            }
        } else {
            let mut all = true;
            for n in 1..=fragment.total {
                if self.partials.get(format!("s.{set}.{n}")).await.map_err(|e| fail(&e))?.is_none() {
                    all = false;
                    break;
                }
            }
            all
        };
        if !complete {
            return Ok(SharedOffer::Kept);
        }
        // One node joins: the one that makes the set's d. key.
        match self.partials.create(format!("d.{set}"), Bytes::from_static(b"1")).await {
            Ok(_) => {}
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => return Ok(SharedOffer::Kept),
            Err(e) => return Err(fail(&e)),
        }
        let mut whole = Vec::new();
        for n in 1..=fragment.total {
            match self.partials.get(format!("s.{set}.{n}")).await {
                Ok(Some(slice)) if whole.len() + slice.len() <= limit => whole.extend_from_slice(&slice),
                Ok(Some(_)) => {
                    self.forget_set(&set, fragment.total).await;
                    return Ok(SharedOffer::Refused(Refused::TooLarge(limit)));
                }
                other => {
                    // Give the set back for another try.
                    let _ = self.partials.delete(format!("d.{set}")).await;
                    return Err(fail(&format!("slice {n} of a complete set: {:?}", other.map(|o| o.map(|b| b.len())))));
                }
            }
        }
        Ok(SharedOffer::Join(whole))
    }

    /// Removes a joined set's slices (its `d.` key stays as the tombstone).
    pub async fn finish_fragments(&self, signer: &Fingerprint, id: &str, total: u32) {
        self.forget_set(&set_key(signer, id), total).await;
    }

    /// A set this node joined could not be kept (its message is not
    /// acknowledged): the set may be joined again when it comes back.
    pub async fn unjoin_fragments(&self, signer: &Fingerprint, id: &str) {
        if let Err(e) = self.partials.delete(format!("d.{}", set_key(signer, id))).await {
            warn!(error = %e, "Cannot give a fragment set back; it is joined again after the bucket forgets it.");
        }
    }

    async fn forget_set(&self, set: &str, total: u32) {
        for n in 1..=total {
            let _ = self.partials.purge(format!("s.{set}.{n}")).await;
        }
        let _ = self.partials.purge(format!("c.{set}")).await;
        let _ = self.partials.purge(format!("t.{set}")).await;
    }

    /// Gives the lease up (shutdown): another node takes it at once.
    pub async fn release_lease(&self, name: &str, revision: u64) {
        let _ = self.leases.delete_expect_revision(name, Some(revision)).await;
    }
}

impl JetQueue {
    /// Claims the first TOFU pin for `peer` in the shared bucket: written only
    /// if no node pinned it before (`create`, never `put`), so the first pin
    /// is the cluster's whatever order the nodes write in.
    ///
    /// Returns the fingerprint the cluster trusts for `peer`: `fingerprint`
    /// if it was first, or the one another node pinned before.
    ///
    /// # Errors
    /// NATS cannot be asked (or holds something that is no fingerprint): the
    /// connection fails and is tried again later, rather than this node
    /// trusting on its own what an attacker on its path may have shown it.
    async fn claim_pin(&self, peer: &str, fingerprint: Fingerprint) -> Result<Fingerprint, String> {
        let key = hex(peer.as_bytes());
        let value = Bytes::copy_from_slice(fingerprint.as_bytes());
        match tokio::time::timeout(PUBLISH_TIMEOUT, self.pins.create(&key, value)).await {
            Ok(Ok(_)) => return Ok(fingerprint),
            Ok(Err(e)) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Ok(Err(e)) => return Err(format!("cannot claim the TOFU pin for {peer} in the shared bucket: {e}")),
            Err(_) => return Err(format!("no answer from NATS for the TOFU pin of {peer}")),
        }
        match tokio::time::timeout(PUBLISH_TIMEOUT, self.pins.get(&key)).await {
            Ok(Ok(Some(v))) => <[u8; 32]>::try_from(v.as_ref())
                .map(Fingerprint::from_bytes)
                .map_err(|_| format!("the shared TOFU pin for {peer} is not a fingerprint")),
            _ => Err(format!("cannot read the shared TOFU pin for {peer}")),
        }
    }
}

impl crate::pins::SharedPins for JetQueue {
    fn claim<'a>(
        &'a self,
        peer: &'a str,
        fingerprint: Fingerprint,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Fingerprint, String>> + Send + 'a>> {
        Box::pin(self.claim_pin(peer, fingerprint))
    }
}

impl crate::gateway::hourly::SharedCounter for JetQueue {
    fn count<'a>(
        &'a self,
        key: &'a str,
        now: u64,
        max: u32,
        length: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, String>> + Send + 'a>> {
        use crate::gateway::hourly::Window;
        Box::pin(async move {
            let key = hex(key.as_bytes());
            // Compare-and-set, so that two nodes counting at once count twice.
            for _ in 0..5 {
                let entry = self.hourly.entry(&key).await.map_err(|e| e.to_string())?;
                let (current, revision) = match entry {
                    Some(e) if e.operation == kv::Operation::Put => (Window::decode(&e.value), Some(e.revision)),
                    Some(e) => (None, Some(e.revision)),
                    None => (None, None),
                };
                let Some(next) = Window::next(current, now, max, length) else { return Ok(false) };
                let value = Bytes::copy_from_slice(&next.encode());
                let written = match (current, revision) {
                    (Some(_), Some(r)) => self.hourly.update(&key, value, r).await.is_ok(),
                    _ => self.hourly.create(&key, value).await.is_ok(),
                };
                if written {
                    return Ok(true);
                }
            }
            Err("the hourly limits bucket changed under us five times in a row".into())
        })
    }
}

/// Applies every entry of `bucket` (from its start, then as they come) with
/// `apply(key, value or None for a deletion, revision)`; the receiver turns
/// true once the entries there were at the start are applied.
async fn mirror_bucket(
    bucket: kv::Store,
    shutdown: CancellationToken,
    apply: impl Fn(&str, Option<&[u8]>, u64) + Send + 'static,
) -> Result<tokio::sync::watch::Receiver<bool>, StoreError> {
    let mut watch = bucket.watch_all_from_revision(1).await.map_err(|e| shared("watch", e))?;
    let pending = bucket.status().await.map_err(|e| shared("bucket status", e))?.values();
    let (ready, ready_rx) = tokio::sync::watch::channel(pending == 0);
    tokio::spawn(async move {
        let mut seen = 0u64;
        loop {
            let entry = tokio::select! {
                e = watch.next() => e,
                () = shutdown.cancelled() => return,
            };
            let Some(entry) = entry else {
                // The watch ended (NATS went away for long): watch again from the start.
                tokio::time::sleep(Duration::from_secs(1)).await;
                match bucket.watch_all_from_revision(1).await {
                    Ok(w) => watch = w,
                    Err(e) => warn!(error = %e, "Cannot watch a shared bucket; retrying."),
                }
                continue;
            };
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    warn!(error = %e, "A shared bucket's watch failed.");
                    continue;
                }
            };
            match entry.operation {
                kv::Operation::Put => apply(&entry.key, Some(&entry.value), entry.revision),
                kv::Operation::Delete | kv::Operation::Purge => apply(&entry.key, None, entry.revision),
            }
            seen += 1;
            if entry.delta == 0 || seen >= pending {
                let _ = ready.send(true);
            }
        }
    });
    Ok(ready_rx)
}

fn random_u64() -> Result<u64, StoreError> {
    let mut b = [0u8; 8];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| shared("random", "no randomness"))?;
    Ok(u64::from_be_bytes(b))
}

/// A set's part of its keys in the partials bucket.
fn set_key(signer: &Fingerprint, id: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, id.as_bytes());
    format!("{}.{}", hex(signer.as_bytes()), hex(&digest.as_ref()[..16]))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect()
}

async fn wait_ack(ack: jetstream::context::PublishAckFuture) -> Result<(), StoreError> {
    match tokio::time::timeout(PUBLISH_TIMEOUT, ack).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(shared("publish ack", e)),
        Err(_) => Err(shared("publish ack", "timed out")),
    }
}

impl crate::gateway::db::SharedRecords for JetQueue {
    fn share_contact<'a>(
        &'a self,
        fp: &'a Fingerprint,
        record: Option<&'a [u8]>,
    ) -> SharedFuture<'a, Result<u64, String>> {
        Box::pin(async move {
            let contact: Option<Contact> = record.map(|r| decode(r, "contact")).transpose()?;
            JetQueue::share_contact(self, fp, contact.as_ref()).await
        })
    }

    fn update_contact<'a>(
        &'a self,
        fp: &'a Fingerprint,
        change: &'a (dyn Fn(&[u8]) -> Option<Vec<u8>> + Send + Sync),
    ) -> SharedFuture<'a, Option<(Vec<u8>, u64)>> {
        Box::pin(async move {
            let changed = JetQueue::update_contact(self, fp, |c: &mut Contact| {
                if let Some(new) = change(&encode(c)).and_then(|r| decode::<Contact>(&r, "contact").ok()) {
                    *c = new;
                }
            })
            .await?;
            Ok(changed.map(|(c, revision)| (encode(&c), revision)))
        })
    }

    fn share_subscription<'a>(&'a self, key: &'a [u8], value: &'static [u8]) -> SharedFuture<'a, ()> {
        Box::pin(JetQueue::share_subscription(self, key, crate::gateway::outbox::Subscription::from_bytes(value)))
    }
}

/// A post from the shared IRC outbox: the message to ack.
struct SharedPost(jetstream::Message);

impl PostTicket for SharedPost {
    fn alive(&self) -> Quiet<'_> {
        Box::pin(async move {
            let _ = self.0.ack_with(AckKind::Progress).await;
        })
    }

    fn done(self: Box<Self>, posted: bool) -> SharedFuture<'static, ()> {
        let kind = if posted { AckKind::Ack } else { AckKind::Nak(Some(Duration::from_secs(1))) };
        Box::pin(async move { self.0.ack_with(kind).await.map_err(|e| shared("IRC outbox", e)) })
    }
}

impl JobQueue for JetQueue {
    fn shared(&self) -> bool {
        true
    }

    fn new_message_id(&self) -> Result<u64, StoreError> {
        JetQueue::new_message_id(self)
    }

    fn enqueue_with_posts<'a>(
        &'a self,
        id: u64,
        body: &'a [u8],
        targets: Vec<Target>,
        origin: &'a Origin,
        posts: &'a [IrcPost],
    ) -> SharedFuture<'a, ()> {
        Box::pin(async move {
            self.enqueue(id, body, targets, origin).await?;
            self.post_irc(id, posts).await
        })
    }

    fn enqueue_digests<'a>(
        &'a self,
        store: &'a Store,
        keys: &'a [sled::IVec],
        digests: &'a [DigestJob],
    ) -> SharedFuture<'a, ()> {
        Box::pin(async move {
            for d in digests {
                self.enqueue(d.id, &d.body, d.targets.clone(), &Origin::Gateway).await?;
            }
            store.window_remove(keys).await
        })
    }

    fn claim(&self, max: usize) -> SharedFuture<'_, Claimed> {
        // The fetch itself waits for work: look again at once.
        Box::pin(async move { Ok((JetQueue::claim(self, max).await?, Some(0))) })
    }

    fn wait(&self, _next: Option<u64>) -> Quiet<'_> {
        Box::pin(async {})
    }

    fn pending(&self, id: JobId) -> bool {
        self.holds(id)
    }

    fn body(&self, id: JobId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(JetQueue::body(self, id))
    }

    fn body_size(&self, id: JobId) -> Option<usize> {
        self.body_len(id)
    }

    fn complete(&self, id: JobId) -> SharedFuture<'_, ()> {
        Box::pin(JetQueue::complete(self, id))
    }

    fn defer<'a>(&'a self, id: JobId, job: &'a Job) -> SharedFuture<'a, ()> {
        Box::pin(JetQueue::defer(self, id, job))
    }

    fn kill<'a>(&'a self, id: JobId, job: &'a Job, report: Option<(Vec<u8>, Target)>) -> SharedFuture<'a, Option<u64>> {
        Box::pin(JetQueue::kill(self, id, job, report))
    }

    fn keep_alive(self: Arc<Self>, alive: CancellationToken) -> Quiet<'static> {
        Box::pin(JetQueue::keep_alive(self, alive))
    }

    fn release_all(&self) -> Quiet<'_> {
        Box::pin(JetQueue::release_all(self))
    }

    fn next_post(&self) -> SharedFuture<'_, Option<(Box<dyn PostTicket>, IrcPost)>> {
        Box::pin(async move {
            Ok(JetQueue::next_post(self).await?.map(|(m, p)| (Box::new(SharedPost(m)) as Box<dyn PostTicket>, p)))
        })
    }
}

impl Cluster for JetQueue {
    fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    fn lease<'a>(&'a self, name: &'a str, holder: &'a str, revision: Option<u64>) -> Boxed<'a, Option<u64>> {
        Box::pin(JetQueue::lease(self, name, holder, revision))
    }

    fn release_lease<'a>(&'a self, name: &'a str, revision: u64) -> Quiet<'a> {
        Box::pin(JetQueue::release_lease(self, name, revision))
    }

    fn offer_fragment<'a>(
        &'a self,
        signer: &'a Fingerprint,
        fragment: &'a latssiam::fragment::Fragment<'_>,
        limit: usize,
    ) -> SharedFuture<'a, SharedOffer> {
        Box::pin(JetQueue::offer_fragment(self, signer, fragment, limit))
    }

    fn finish_fragments<'a>(&'a self, signer: &'a Fingerprint, id: &'a str, total: u32) -> Quiet<'a> {
        Box::pin(JetQueue::finish_fragments(self, signer, id, total))
    }

    fn unjoin_fragments<'a>(&'a self, signer: &'a Fingerprint, id: &'a str) -> Quiet<'a> {
        Box::pin(JetQueue::unjoin_fragments(self, signer, id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_frame_round_trips_and_junk_does_not_decode() {
        let job = Job {
            message: 42,
            target: Target::Smtp { rcpt: "bob@mail.test".into() },
            origin: Origin::Smtp { from: "a@b.test".into() },
            arrived_ms: 1,
            attempts: 0,
            due_ms: 1,
            last_error: None,
        };
        let framed = frame(&job, b"Subject: hi\r\n\r\nbody\r\n");
        let (back, body) = unframe(&framed).unwrap();
        assert_eq!(back, job);
        assert_eq!(&body[..], b"Subject: hi\r\n\r\nbody\r\n");
        for junk in [&b""[..], b"\0\0", b"\xff\xff\xff\xff{}", b"\0\0\0\x02{x"] {
            assert!(unframe(&Bytes::copy_from_slice(junk)).is_none(), "{junk:?}");
        }
    }

    #[test]
    fn bucket_keys_round_trip_through_hex() {
        let key = b"#chat@irc.example.org\0alice@localhost";
        assert_eq!(unhex(&hex(key)).unwrap(), key);
        assert!(unhex("zz").is_none() && unhex("abc").is_none());
    }
}
