//! The delivery worker: takes due jobs from the queue, delivers them to
//! LATSSIAM (sealed to the recipient, signed by the gateway, over a pooled
//! TLS connection per server) or to the smarthost, and acts on the result:
//! delete after `31`, back off after a temporary failure, dead-letter and
//! bounce after a permanent one.
//!
//! One destination (a LATSSIAM server host, or the smarthost) has at most
//! `queue.destination_concurrency` deliveries in flight; its further jobs
//! wait in memory (at most [`MAX_PARKED`] per destination, [`MAX_PARKED_SHARED`]
//! with the shared queue; beyond that they
//! go back to the queue for a second) without holding a worker slot, so a
//! slow or stalled server holds only its share. Every connection and TLS
//! handshake is bounded by `queue.connect_timeout_secs`, every read and
//! write after it by the client's timeouts.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use latssiam::client::{Client, ClientError};
use latssiam::wire::{Code, Status};
use latssiam::{crypto, fragment, Fingerprint};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::contacts::Contact;
use super::db::StoreError;
use super::mail::{self, Failure};
use super::queue::{now_ms, Job, JobId, Origin, Target};
use super::Gateway;

/// Pooled connections idle longer than this are dropped rather than reused
/// (servers hang up on idle sessions).
const POOL_IDLE: Duration = Duration::from_secs(60);

/// Idle LATSSIAM sessions, per server host.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<String, Vec<(Client, Instant)>>>,
}

impl Pool {
    async fn take(&self, host: &str) -> Option<Client> {
        let mut idle = self.idle.lock().await;
        let list = idle.get_mut(host)?;
        while let Some((client, since)) = list.pop() {
            if since.elapsed() < POOL_IDLE {
                return Some(client);
            }
        }
        None
    }

    async fn put(&self, host: &str, client: Client) {
        let mut idle = self.idle.lock().await;
        let list = idle.entry(host.to_owned()).or_default();
        if list.len() < 32 {
            list.push((client, Instant::now()));
        }
    }
}

/// MiB of large message bodies the worker holds in memory at once (three
/// messages of 10 MB).
pub const LARGE_BODIES_MIB: u32 = 32;

/// How long to wait after a `37 Slow down`, however many attempts before.
const SLOW_DOWN_MS: u64 = 2000;

/// Most jobs waiting in memory for one destination's free slot.
pub const MAX_PARKED: usize = 1000;

/// With the shared queue, the jobs one destination may have waiting on this
/// node: the rest go back to the stream at once (due again in about half a
/// minute), so that a stalled destination holds no more than its share and
/// no job another node could deliver waits here.
pub const MAX_PARKED_SHARED: usize = 2;

/// Deliveries in flight and jobs waiting, per destination.
#[derive(Default)]
pub struct Destinations {
    state: std::sync::Mutex<HashMap<String, Destination>>,
}

#[derive(Default)]
struct Destination {
    active: usize,
    parked: VecDeque<(JobId, Job)>,
}

/// What to do with a claimed job.
enum Admit {
    /// Deliver it now.
    Go(JobId, Job),
    /// It waits for the destination (nothing to do now).
    Parked,
    /// The destination is full and so is its waiting line: back to the queue.
    Full(JobId, Job),
}

impl Destinations {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Destination>> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn admit(&self, key: &str, limit: usize, max_parked: usize, id: JobId, job: Job) -> Admit {
        let mut state = self.lock();
        let d = state.entry(key.to_owned()).or_default();
        if d.active < limit.max(1) {
            d.active += 1;
            Admit::Go(id, job)
        } else if d.parked.len() < max_parked {
            d.parked.push_back((id, job));
            Admit::Parked
        } else {
            Admit::Full(id, job)
        }
    }

    /// A delivery to `key` ended: the next waiting job, which keeps its slot.
    fn next(&self, key: &str) -> Option<(JobId, Job)> {
        let mut state = self.lock();
        let d = state.get_mut(key)?;
        if let Some(job) = d.parked.pop_front() {
            return Some(job);
        }
        d.active = d.active.saturating_sub(1);
        if d.active == 0 {
            state.remove(key);
        }
        None
    }

    /// Gives up a slot without taking a waiting job (shutdown, or a task
    /// that ended abnormally); the waiting jobs are due again at the next start.
    fn release(&self, key: &str) {
        let mut state = self.lock();
        if let Some(d) = state.get_mut(key) {
            d.active = d.active.saturating_sub(1);
            if d.active == 0 && d.parked.is_empty() {
                state.remove(key);
            }
        }
    }

    /// Deliveries in flight to `key` (for tests and metrics).
    pub fn active(&self, key: &str) -> usize {
        self.lock().get(key).map_or(0, |d| d.active)
    }
}

/// A destination's delivery slot held by one task.
struct Slot<'a> {
    gw: &'a Gateway,
    key: &'a str,
    held: bool,
}

impl Slot<'_> {
    /// The next waiting job for the destination (the slot passes to it), or
    /// none (the slot is released). A job deleted or retried by the operator
    /// meanwhile is skipped; one whose state cannot be read is delivered.
    fn hand_on(&mut self) -> Option<(JobId, Job)> {
        while let Some((id, job)) = self.gw.destinations.next(self.key) {
            if self.gw.queue.pending(id) {
                return Some((id, job));
            }
        }
        self.held = false;
        None
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if self.held {
            self.gw.destinations.release(self.key);
        }
    }
}

/// Deliveries made while an SMTP session waits (see [`deliver_in_session`]),
/// per destination: at most `queue.destination_concurrency` in flight,
/// beside the worker's own, and none for [`IN_SESSION_PAUSE`] after one
/// met a server in trouble.
#[derive(Default)]
pub struct InSession(std::sync::Mutex<HashMap<String, InSessionState>>);

#[derive(Default)]
struct InSessionState {
    active: usize,
    paused_until: Option<Instant>,
}

/// One delivery in flight during an SMTP session, given back when dropped.
struct InSessionSlot<'a> {
    table: &'a InSession,
    key: String,
}

impl InSession {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, InSessionState>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn take(&self, key: String, limit: usize, now: Instant) -> Option<InSessionSlot<'_>> {
        let mut map = self.lock();
        let d = map.entry(key.clone()).or_default();
        if d.paused_until.is_some_and(|until| now < until) || d.active >= limit.max(1) {
            return None;
        }
        d.paused_until = None;
        d.active += 1;
        Some(InSessionSlot { table: self, key })
    }

    #[cfg(test)]
    fn active(&self, key: &str) -> usize {
        self.lock().get(key).map_or(0, |d| d.active)
    }
}

impl InSessionSlot<'_> {
    /// No delivery during SMTP sessions to this destination for
    /// [`IN_SESSION_PAUSE`]: its mail goes through the queue meanwhile.
    fn pause(&self) {
        if let Some(d) = self.table.lock().get_mut(&self.key) {
            d.paused_until = Some(Instant::now() + IN_SESSION_PAUSE);
        }
    }
}

impl Drop for InSessionSlot<'_> {
    fn drop(&mut self) {
        let mut map = self.table.lock();
        if let Some(d) = map.get_mut(&self.key) {
            d.active = d.active.saturating_sub(1);
            if d.active == 0 && d.paused_until.is_none() {
                map.remove(&self.key);
            }
        }
    }
}

/// The longest the deliveries of one mail during its SMTP session may take
/// together; the recipients not done by then are queued.
pub const IN_SESSION_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a destination gets no deliveries during SMTP sessions after one
/// found it in trouble (no answer in time, a broken session, `37`, `50`,
/// `51`, `53`, `54`), so that a slow or refusing server costs SMTP clients
/// one wait a minute, not one per mail, and a `31` that came too late
/// makes one duplicate, not one per mail.
pub const IN_SESSION_PAUSE: Duration = Duration::from_secs(60);

/// Sends `body` (one block's worth) to `contact` on another server while
/// its SMTP session waits, over an idle pooled session to that server: true
/// once the server answered `31`, which it sends only when it holds the
/// message durably, so the gateway need not queue it. False, with nothing to
/// undo, when there is no idle session to the server, its destination
/// already has `queue.destination_concurrency` such deliveries in flight or
/// is paused, or anything but `31` came back by `deadline`: the message is
/// then queued like any other, and the worker delivers it and acts on what
/// the server answers (moved, gone, full, refused). A server that stored it
/// but answered too late gets it again from the queue (delivery is
/// at-least-once).
pub async fn deliver_in_session(gw: &Gateway, contact: &Contact, body: &[u8], deadline: Instant) -> bool {
    let host = contact.server_host();
    let now = Instant::now();
    if now >= deadline {
        return false;
    }
    let key = latssiam_destination(host);
    let Some(slot) = gw.in_session.take(key, gw.settings.queue.destination_concurrency, now) else {
        return false;
    };
    let Some(mut client) = gw.pool.take(host).await else { return false };
    let Ok((sealed, signature)) = Pieces::Whole(body).sealed(gw, contact, 1) else { return false };
    let sent = client.send(contact.fingerprint(), &sealed, Some(&signature));
    let error = match tokio::time::timeout_at(deadline.into(), sent).await {
        Ok(Ok(status)) if status.code() == Code::MessageAccepted => {
            gw.pool.put(host, client).await;
            return true;
        }
        Ok(Ok(status)) => {
            let code = status.code();
            if !still_in_step(code) || matches!(code, Code::SlowDown | Code::InternalError) {
                slot.pause();
            }
            if still_in_step(code) {
                gw.pool.put(host, client).await;
            }
            status.to_string()
        }
        Ok(Err(e)) => {
            slot.pause();
            e.to_string()
        }
        Err(_) => {
            slot.pause();
            "no answer in time".to_owned()
        }
    };
    info!(%host, fingerprint = %contact.fingerprint(), %error, "Not delivered during the SMTP session; queued.");
    false
}

/// The destination a job counts against.
fn destination(gw: &Gateway, job: &Job) -> String {
    match &job.target {
        Target::Smtp { .. } => "smtp:smarthost".to_owned(),
        Target::Latssiam { fingerprint, .. } => {
            let contact = fingerprint.parse::<Fingerprint>().ok().and_then(|fp| gw.store.contact(&fp).ok().flatten());
            latssiam_destination(contact.as_ref().map_or("", |c| c.server_host()))
        }
    }
}

/// The destination of LATSSIAM deliveries to the server `host`.
fn latssiam_destination(host: &str) -> String {
    format!("latssiam:{}", host.to_ascii_lowercase())
}

/// Whether a session that answered `code` is still in step, and so may go
/// back to the pool: not after a `54` (the server hung up), `50` or `51`.
fn still_in_step(code: Code) -> bool {
    !matches!(code, Code::Timeout | Code::SyntaxError | Code::SequencingError)
}

/// What one attempt came to.
pub enum Outcome {
    Delivered,
    /// Temporary: try again later.
    Retry(String),
    /// Try again after this many milliseconds, whatever the backoff: `0` when
    /// the mailbox moved (the contact was updated), [`SLOW_DOWN_MS`] after `37`.
    RetryIn(u64, String),
    /// Permanent: dead-letter and report, with an enhanced status code.
    Fail {
        status: &'static str,
        diagnostic: String,
    },
}

/// Runs until `shutdown`, then waits for deliveries in flight.
pub async fn run(gw: Arc<Gateway>, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(gw.settings.queue.concurrency));
    let tracker = TaskTracker::new();
    // With jetstream, the jobs this node holds stay its own while it lives:
    // until the last delivery in flight has ended, past `shutdown`.
    let alive = CancellationToken::new();
    tokio::spawn(Arc::clone(&gw.queue).keep_alive(alive.clone()));
    // Jobs taken from the shared queue are another node's to take while they
    // wait here: only a few per destination wait, the rest go back at once.
    // (Subtracting waiting jobs from what is claimed instead let one stalled
    // destination stop every claim on every node.)
    let max_parked = if gw.queue.shared() { MAX_PARKED_SHARED } else { MAX_PARKED };
    while !shutdown.is_cancelled() {
        let free = slots.available_permits();
        if free == 0 {
            tokio::select! {
                p = Arc::clone(&slots).acquire_owned() => drop(p),
                () = shutdown.cancelled() => break,
            }
            continue;
        }
        let claimed = tokio::select! {
            c = gw.queue.claim(free) => c,
            () = shutdown.cancelled() => break,
        };
        let (jobs, next) = match claimed {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "Cannot read the queue; retrying in a second.");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let limit = gw.settings.queue.destination_concurrency;
        // Only jobs that start count as progress: parked ones leave the slots free.
        let mut started = 0;
        for (id, job) in jobs {
            let key = destination(&gw, &job);
            let (id, job) = match gw.destinations.admit(&key, limit, max_parked, id, job) {
                Admit::Go(id, job) => (id, job),
                Admit::Parked => continue,
                Admit::Full(id, mut job) => {
                    // Its destination has a full waiting line: look again in half a minute or so.
                    job.due_ms = now_ms() + 30_000 + u64::from(id.index) * 7 + id.message % 1000;
                    if let Err(e) = gw.queue.defer(id, &job).await {
                        warn!(job = %id, error = %e, "Cannot put a job back in the queue.");
                    }
                    continue;
                }
            };
            started += 1;
            let Ok(permit) = Arc::clone(&slots).acquire_owned().await else { break };
            let (gw, shutdown) = (Arc::clone(&gw), shutdown.clone());
            tracker.spawn(async move {
                // Releases the destination's slot whatever happens (a panic too);
                // its waiting jobs then stay for the next start (they have no due entry).
                let mut slot = Slot { gw: &gw, key: &key, held: true };
                let mut next = Some((id, job));
                while let Some((id, job)) = next.take() {
                    deliver(&gw, id, job).await;
                    if shutdown.is_cancelled() {
                        break;
                    }
                    next = slot.hand_on();
                }
                drop(slot);
                drop(permit);
            });
        }
        let got = started;
        tokio::task::yield_now().await;
        if got == free {
            continue;
        }
        tokio::select! {
            () = gw.queue.wait(next) => {}
            () = shutdown.cancelled() => break,
        }
    }
    tracker.close();
    tracker.wait().await;
    // Jobs claimed but not started (waiting for their destination) go back at once.
    gw.queue.release_all().await;
    alive.cancel();
}

fn backoff(gw: &Gateway, attempts: u32) -> u64 {
    let q = &gw.settings.queue;
    let factor = 1u64.checked_shl(attempts.saturating_sub(1).min(30)).unwrap_or(u64::MAX);
    q.first_retry_secs.saturating_mul(factor).min(q.max_retry_secs).saturating_mul(1000)
}

async fn deliver(gw: &Arc<Gateway>, id: JobId, mut job: Job) {
    let outcome = match &job.target {
        Target::Latssiam { fingerprint, .. } => to_latssiam(gw, id, &job, fingerprint).await,
        Target::Smtp { rcpt } => to_smtp(gw, id, &job, rcpt).await,
    };
    let results = match job.target {
        Target::Latssiam { .. } => &gw.metrics.to_latssiam,
        Target::Smtp { .. } => &gw.metrics.to_smtp,
    };
    let now = now_ms();
    let expired = now.saturating_sub(job.arrived_ms) >= gw.settings.queue.lifetime_secs.saturating_mul(1000);
    let outcome = match outcome {
        Outcome::Retry(e) | Outcome::RetryIn(_, e) if expired => {
            Outcome::Fail { status: "5.4.7", diagnostic: format!("delivery time expired; last error: {e}") }
        }
        // A mailbox that moved again and again: follow it no faster than the backoff.
        Outcome::RetryIn(0, e) if job.attempts >= 3 => Outcome::Retry(e),
        o => o,
    };
    if matches!(outcome, Outcome::Delivered | Outcome::Fail { .. }) && !gw.progress.is_empty() {
        clear_progress(gw, id);
    }
    let stored = match outcome {
        Outcome::Delivered => {
            results.ok.inc();
            gw.metrics.end_to_end.observe(Duration::from_millis(now.saturating_sub(job.arrived_ms)));
            info!(job = %id, target = job.target.kind(), "Delivered.");
            gw.queue.complete(id).await
        }
        Outcome::Retry(e) => {
            results.deferred.inc();
            job.attempts += 1;
            job.due_ms = now + backoff(gw, job.attempts);
            info!(job = %id, attempts = job.attempts, error = %e, "Deferred.");
            job.last_error = Some(e);
            gw.queue.defer(id, &job).await
        }
        Outcome::RetryIn(delay, e) => {
            results.deferred.inc();
            job.attempts += 1;
            job.due_ms = now + delay;
            job.last_error = Some(e);
            gw.queue.defer(id, &job).await
        }
        Outcome::Fail { status, diagnostic } => {
            results.failed.inc();
            warn!(job = %id, status, error = %diagnostic, "Delivery failed for good; dead-lettered.");
            job.last_error = Some(diagnostic.clone());
            let report = failure_report(gw, id, &job, status, &diagnostic).await;
            match gw.queue.kill(id, &job, report).await {
                Ok(Some(bounce)) => {
                    info!(bounce = %super::queue::message_id_string(bounce), "Queued a failure report to the sender.");
                    Ok(())
                }
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            }
        }
    };
    if let Err(e) = stored {
        warn!(job = %id, error = %e, "Cannot record the delivery result; the job will be retried after a restart.");
    }
}

/// The report of a permanent failure to whoever sent the message: an RFC
/// 3464 DSN to an email sender, a notice to a LATSSIAM sender; nothing for
/// `<>`, the gateway's own messages, or an address that had
/// `queue.max_bounces_per_hour` reports already (backscatter).
async fn failure_report(
    gw: &Gateway,
    id: JobId,
    job: &Job,
    status: &str,
    diagnostic: &str,
) -> Option<(Vec<u8>, Target)> {
    let original = gw.queue.body(id).ok().flatten()?;
    let recipient = match &job.target {
        Target::Latssiam { address, .. } => address.clone(),
        Target::Smtp { rcpt } => rcpt.clone(),
    };
    let hostname = &gw.settings.gateway.hostname;
    let to = match &job.origin {
        Origin::Gateway => return None,
        Origin::Smtp { from } if from.is_empty() => return None,
        Origin::Smtp { from } | Origin::Latssiam { from, .. } => from,
    };
    // Per address, and in all (forged senders that change each time): 100 times the per-address number.
    let per_hour = gw.settings.queue.max_bounces_per_hour;
    if !gw.bounces.allow(to, per_hour).await || !gw.bounces.allow("*", per_hour.saturating_mul(100)).await {
        warn!(to = %to, "Failure reports to this address are over their hourly limit; not sent.");
        return None;
    }
    Some(match &job.origin {
        Origin::Latssiam { fingerprint, from } => {
            let text =
                format!("Your message could not be delivered to <{recipient}>.\r\n\r\nStatus {status}: {diagnostic}");
            let body = mail::notice(hostname, from, "Undelivered message", &text, &original);
            (body, Target::Latssiam { fingerprint: fingerprint.clone(), address: from.clone() })
        }
        _ => {
            let arrived = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(job.arrived_ms) * 1_000_000)
                .ok()
                .and_then(|t| t.format(&time::format_description::well_known::Rfc2822).ok())
                .unwrap_or_default();
            let failure = Failure { recipient: &recipient, status, diagnostic };
            (mail::dsn(hostname, to, &arrived, &failure, &original), Target::Smtp { rcpt: to.clone() })
        }
    })
}

async fn to_smtp(gw: &Gateway, id: JobId, job: &Job, rcpt: &str) -> Outcome {
    let Ok(Some(body)) = gw.queue.body(id) else {
        return Outcome::Fail { status: "5.3.0", diagnostic: "the message body is missing from the queue".into() };
    };
    // DKIM-signed for its From: domain when a key is configured (relayed mail, notices, bounces).
    let body = gw.border.sign(&body);
    match gw.smarthost.send(job.origin.envelope_from(), &[rcpt.to_owned()], &body).await {
        Ok(()) => Outcome::Delivered,
        Err(e) if e.permanent => Outcome::Fail { status: "5.0.0", diagnostic: e.text },
        Err(e) => Outcome::Retry(e.text),
    }
}

/// The enhanced status code for a LATSSIAM refusal, or None if it is temporary.
fn permanent_status(code: Code) -> Option<&'static str> {
    match code {
        Code::NoMailbox | Code::MailboxGone => Some("5.1.1"),
        Code::MessageTooLong => Some("5.3.4"),
        Code::CertificateUnauthorised | Code::MessageRefused => Some("5.7.1"),
        _ => None,
    }
}

async fn to_latssiam(gw: &Gateway, id: JobId, job: &Job, fingerprint: &str) -> Outcome {
    let Ok(fp) = fingerprint.parse::<Fingerprint>() else {
        return Outcome::Fail { status: "5.1.3", diagnostic: format!("bad fingerprint {fingerprint:?}") };
    };
    let contact = match gw.store.contact(&fp) {
        Ok(Some(c)) => c,
        Ok(None) => return Outcome::Fail { status: "5.1.1", diagnostic: "no such contact (removed?)".into() },
        Err(e) => return Outcome::Retry(e.to_string()),
    };
    // Large bodies in memory at once are bounded: each takes its size (in
    // MiB) from the gateway's budget while it is sent.
    let _budget = match gw.queue.body_size(id) {
        Some(size) if size > super::db::SPOOL_OVER => {
            let mib = u32::try_from(size.div_ceil(1 << 20)).unwrap_or(u32::MAX).min(LARGE_BODIES_MIB);
            gw.large_bodies.acquire_many(mib).await.ok()
        }
        _ => None,
    };
    let body = match gw.queue.body(id) {
        Ok(Some(b)) => b,
        Ok(None) => return Outcome::Fail { status: "5.3.0", diagnostic: "the message body is missing".into() },
        Err(e) => return Outcome::Retry(e.to_string()),
    };
    // A set cut short (a restart, a lost connection, a temporary refusal)
    // goes on with the same set id after the last fragment the server took;
    // the receiver keeps a repeated one once. The id is random (PROFILE
    // section 8) and written down before the first fragment goes out.
    let stored = progress(gw, id);
    let fresh = || fragment::new_id(&gw.settings.gateway.hostname).map_err(|e| Outcome::Retry(e.to_string()));
    let set_id = match &stored {
        Some((set, _, _)) => set.clone(),
        None => match fresh() {
            Ok(s) => s,
            Err(outcome) => return outcome,
        },
    };
    let mut pieces = match Pieces::plan(gw, &contact, &body, &set_id, job.arrived_ms) {
        Ok(p) => p,
        Err(outcome) => return outcome,
    };
    // On the embedded home server: in-process, one fsync for the mailbox
    // writes and nothing else; a refusal takes the network path below, which
    // answers the same and knows what to do with each answer.
    match local_prepare_all(gw, &contact, &fp, &pieces) {
        Ok(Some(prepared)) => {
            // A full flush, not the log's alone: it also makes the jobs
            // completed before this one durable, so that a crash delivers
            // again only what was completed since the last flush.
            return match gw.store.durable().await {
                Ok(()) => {
                    prepared.into_iter().for_each(|p| local_commit(gw, p));
                    Outcome::Delivered
                }
                Err(e) => {
                    prepared.into_iter().for_each(|p| local_discard(gw, p));
                    Outcome::Retry(e.to_string())
                }
            };
        }
        Ok(None) => {}
        Err(outcome) => return outcome,
    }
    let host = contact.server_host().to_owned();
    // A server named with HOST[:PORT] is reached there; else the mailbox host is looked up (MX, A/AAAA).
    let named = contact.server.is_some();
    let mut next = 1;
    if pieces.count() > 1 {
        match stored {
            Some((_, total, last)) if total == pieces.count() => next = (last + 1).min(total),
            _ => {
                // First attempt, or a cut that no longer matches (another certificate): a new set.
                if stored.is_some() {
                    let set_id = match fresh() {
                        Ok(s) => s,
                        Err(outcome) => return outcome,
                    };
                    pieces = match Pieces::plan(gw, &contact, &body, &set_id, job.arrived_ms) {
                        Ok(p) => p,
                        Err(outcome) => return outcome,
                    };
                }
                set_progress(gw, id, pieces.set_id(), pieces.count(), 0);
                if let Err(e) = gw.store.durable().await {
                    return Outcome::Retry(e.to_string());
                }
            }
        }
    }
    // A pooled session may have been closed by the server meanwhile: on any
    // failure over a reused session, try once more over a fresh one.
    let mut pooled = gw.pool.take(&host).await;
    loop {
        let reused = pooled.is_some();
        let mut client = match pooled.take() {
            Some(c) => c,
            None => match connect(gw, &host, named).await {
                Ok(c) => c,
                Err(e) => return Outcome::Retry(e),
            },
        };
        let mut first = true;
        loop {
            let (sealed, signature) = match pieces.sealed(gw, &contact, next) {
                Ok(s) => s,
                Err(outcome) => return outcome,
            };
            let status = match client.send(fp, &sealed, Some(&signature)).await {
                Ok(s) if reused && first && s.code() == Code::Timeout => break,
                Ok(s) => s,
                Err(_) if reused && first => break,
                Err(e) => return Outcome::Retry(format!("{host}: {e}")),
            };
            first = false;
            if status.code() == Code::MessageAccepted && next < pieces.count() {
                set_progress(gw, id, pieces.set_id(), pieces.count(), next);
                next += 1;
                continue;
            }
            // A new server (35) has none of the set: it starts again there.
            if status.code() == Code::MailboxMoved {
                clear_progress(gw, id);
            }
            return classify(gw, &fp, &host, status, client).await;
        }
    }
}

/// A message as it goes to one recipient: whole when it fits one block,
/// else as PROFILE section 8 fragments.
pub enum Pieces<'a> {
    /// One LATSSIAM message.
    Whole(&'a [u8]),
    /// `message/partial` fragments.
    Parts(fragment::Fragmenter<'a>),
}

impl<'a> Pieces<'a> {
    /// How `body` (message `message`, arrived at `arrived_ms`) goes to
    /// `contact`. A message well within one block is not measured; a larger
    /// one is cut by the room sealing to the contact's certificate leaves.
    /// The cut and the set id depend only on the message and the contact,
    /// so a retry sends the same fragments.
    ///
    /// # Errors
    /// A permanent failure if the contact cannot be sealed to or the message
    /// needs more fragments than a set may have.
    pub fn plan(
        gw: &Gateway,
        contact: &Contact,
        body: &'a [u8],
        set_id: &str,
        arrived_ms: u64,
    ) -> Result<Self, Outcome> {
        if body.len() <= mail::MAX_PLAINTEXT {
            return Ok(Pieces::Whole(body));
        }
        if body.len() > fragment::MAX_JOINED + fragment::TRACE_ROOM {
            return Err(Outcome::Fail {
                status: "5.3.4",
                diagnostic: format!("{} octets; LATSSIAM receivers join at most {}", body.len(), fragment::MAX_JOINED),
            });
        }
        let overhead = fragment::sealing_overhead(&contact.cert).map_err(|e| Outcome::Fail {
            status: "5.7.5",
            diagnostic: format!("cannot encrypt to the contact: {e}"),
        })?;
        if fragment::fits_one_block(body.len(), overhead) {
            return Ok(Pieces::Whole(body));
        }
        let id = set_id;
        let from = gw.identity.address().map_or_else(
            || format!("<postmaster@{}>", gw.settings.gateway.hostname),
            |a| format!("latssiam-bridge <{a}>"),
        );
        let date = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(arrived_ms) * 1_000_000)
            .ok()
            .and_then(|t| t.format(&time::format_description::well_known::Rfc2822).ok())
            .unwrap_or_else(mail::date_now);
        fragment::Fragmenter::new(body, overhead, id, &from, &format!("<{}>", contact.address), &date)
            .map(Pieces::Parts)
            .map_err(|e| Outcome::Fail { status: "5.3.4", diagnostic: e.to_string() })
    }

    /// The set id (empty for a whole message).
    pub fn set_id(&self) -> &str {
        match self {
            Pieces::Whole(_) => "",
            Pieces::Parts(f) => f.id(),
        }
    }

    /// How many LATSSIAM messages it takes.
    pub fn count(&self) -> u32 {
        match self {
            Pieces::Whole(_) => 1,
            Pieces::Parts(f) => f.total(),
        }
    }

    /// Piece `n` (1-based) sealed to `contact` and signed as the gateway.
    ///
    /// # Errors
    /// As [`Pieces::sealed_unsigned`], and a temporary failure if it cannot
    /// be signed.
    pub fn sealed(&self, gw: &Gateway, contact: &Contact, n: u32) -> Result<(Vec<u8>, Vec<u8>), Outcome> {
        let sealed = self.sealed_unsigned(contact, n)?;
        let signature = sign(gw, &sealed)?;
        Ok((sealed, signature))
    }

    /// Piece `n` (1-based) sealed to `contact`, not signed (the embedded
    /// home server signs what it is handed in-process).
    ///
    /// # Errors
    /// A permanent failure if it cannot be sealed to the contact or does not
    /// fit one block.
    pub fn sealed_unsigned(&self, contact: &Contact, n: u32) -> Result<Vec<u8>, Outcome> {
        let sealed = match self {
            Pieces::Whole(body) => seal(contact, body)?,
            Pieces::Parts(f) => {
                let piece = f.fragment(n).ok_or_else(|| Outcome::Retry(format!("no fragment {n}")))?;
                seal(contact, &piece)?
            }
        };
        if sealed.len() > latssiam::wire::MAX_BLOCK_DER {
            return Err(Outcome::Fail {
                status: "5.3.4",
                diagnostic: format!(
                    "{} octets sealed, over the {} LATSSIAM allows",
                    sealed.len(),
                    latssiam::wire::MAX_BLOCK_DER
                ),
            });
        }
        Ok(sealed)
    }
}

/// Every piece written into a local contact's mailbox (not yet durable), or
/// `None` if the contact is not local or the home server refuses one now
/// (then nothing stays written, and the network path answers the refusal).
///
/// # Errors
/// A piece that cannot be sealed (nothing stays written).
pub fn local_prepare_all(
    gw: &Gateway,
    contact: &Contact,
    fp: &Fingerprint,
    pieces: &Pieces<'_>,
) -> Result<Option<Vec<latssiam::server::Prepared>>, Outcome> {
    if !is_local(gw, contact) {
        return Ok(None);
    }
    let mut prepared = Vec::with_capacity(pieces.count() as usize);
    for n in 1..=pieces.count() {
        let next = pieces.sealed_unsigned(contact, n).map(|sealed| local_prepare(gw, contact, fp, &sealed));
        match next {
            Ok(Some(p)) => prepared.push(p),
            Ok(None) | Err(_) => {
                prepared.into_iter().for_each(|p| local_discard(gw, p));
                return next.map(|_| None);
            }
        }
    }
    Ok(Some(prepared))
}

/// The set a job is being sent as: its id, fragments, and the last one the server took.
fn progress(gw: &Gateway, id: JobId) -> Option<(String, u32, u32)> {
    let v = gw.progress.get(id.key()).ok().flatten()?;
    let total = u32::from_be_bytes(v.get(..4)?.try_into().ok()?);
    let last = u32::from_be_bytes(v.get(4..8)?.try_into().ok()?);
    Some((String::from_utf8(v.get(8..)?.to_vec()).ok()?, total, last))
}

/// Not flushed after each fragment: after a crash the set goes on a little
/// earlier, and the receiver keeps what it gets twice once.
fn set_progress(gw: &Gateway, id: JobId, set: &str, total: u32, last: u32) {
    let mut v = Vec::with_capacity(8 + set.len());
    v.extend_from_slice(&total.to_be_bytes());
    v.extend_from_slice(&last.to_be_bytes());
    v.extend_from_slice(set.as_bytes());
    if let Err(e) = gw.progress.insert(id.key(), v) {
        debug!(job = %id, error = %e, "Cannot note a fragment's delivery.");
    }
}

fn clear_progress(gw: &Gateway, id: JobId) {
    let _ = gw.progress.remove(id.key());
}

/// Whether `contact`'s mailbox is on the embedded home server with
/// `home.local_delivery`.
pub fn is_local(gw: &Gateway, contact: &Contact) -> bool {
    gw.local.as_ref().is_some_and(|(host, _)| contact.server_host().eq_ignore_ascii_case(host))
}

/// `body` sealed to `contact`; a permanent failure if it cannot be.
fn seal(contact: &Contact, body: &[u8]) -> Result<Vec<u8>, Outcome> {
    crypto::seal(body, &contact.cert)
        .map_err(|e| Outcome::Fail { status: "5.7.5", diagnostic: format!("cannot encrypt to the contact: {e}") })
}

/// `sealed` signed as the gateway; a temporary failure if it cannot be.
fn sign(gw: &Gateway, sealed: &[u8]) -> Result<Vec<u8>, Outcome> {
    crypto::sign(sealed, &gw.identity).map_err(|e| Outcome::Retry(format!("cannot sign: {e}")))
}

/// Writes a sealed message into a local contact's mailbox, signed as the
/// gateway by the home server (not yet durable), or `None` if the contact is
/// not local or the home server refuses it now (then the network path
/// answers the same refusal).
pub fn local_prepare(
    gw: &Gateway,
    contact: &Contact,
    fp: &Fingerprint,
    sealed: &[u8],
) -> Option<latssiam::server::Prepared> {
    if !is_local(gw, contact) {
        return None;
    }
    let (_, local) = gw.local.as_ref()?;
    match local.prepare(&gw.identity, fp, sealed) {
        Ok(p) => Some(p),
        Err(status) => {
            debug!(%fp, %status, "The embedded home server refused a local delivery; going over the network.");
            None
        }
    }
}

/// A local delivery's fsync happened: it counts as delivered.
pub fn local_commit(gw: &Gateway, prepared: latssiam::server::Prepared) {
    if let Some((_, local)) = &gw.local {
        local.commit(prepared);
    }
}

/// A local delivery's fsync failed: it is taken back.
pub fn local_discard(gw: &Gateway, prepared: latssiam::server::Prepared) {
    if let Some((_, local)) = &gw.local {
        local.discard(prepared);
    }
}

/// Makes the local deliveries prepared so far durable, when nothing else
/// written with them needs to be: one fdatasync of the embedded home
/// server's log, not a flush of the whole database (which syncs that log and
/// then sled's). A failed fdatasync breaks the store, as a failed flush does.
///
/// # Errors
/// [`StoreError`] if the fdatasync failed.
pub async fn local_durable(gw: &Gateway) -> Result<(), StoreError> {
    match &gw.local {
        Some((_, local)) => local.durable().await.map_err(|e| gw.store.record(e.into())),
        None => gw.store.durable().await,
    }
}

async fn classify(gw: &Gateway, fp: &Fingerprint, host: &str, status: Status, client: Client) -> Outcome {
    let code = status.code();
    if code == Code::MessageAccepted {
        gw.pool.put(host, client).await;
        return Outcome::Delivered;
    }
    if code == Code::MailboxMoved {
        gw.pool.put(host, client).await;
        let Some(to) = status.moved_to() else { return Outcome::Retry(format!("{host}: {status}")) };
        if same_server(to, host) {
            // Following it would ask the same server again and again.
            return Outcome::Fail {
                status: "5.4.6",
                diagnostic: format!("{host}: {status} (names the same host: a routing loop)"),
            };
        }
        // Only a server that proves it serves the mailbox (VERIFY) takes it over.
        if let Err(e) = verify_moved(gw, fp, to).await {
            warn!(%fp, from = host, to, error = %e, "Mailbox moved, but the new server does not verify it.");
            // The sender may read this in a DSN: what the gateway met inside
            // its network (refused ports, TLS errors) stays in the log.
            return Outcome::Retry(format!("{host}: {status}; {to} does not verify the mailbox"));
        }
        info!(%fp, from = host, to, "Mailbox moved; following it.");
        if let Err(e) = gw.store.move_contact(fp, to).await {
            return Outcome::Retry(e.to_string());
        }
        return Outcome::RetryIn(0, status.to_string());
    }
    if code == Code::MailboxGone {
        // Refused at RCPT from now on.
        if let Err(e) = gw.store.mark_gone(fp).await {
            warn!(%fp, error = %e, "Cannot mark a contact as gone.");
        }
    }
    if still_in_step(code) {
        gw.pool.put(host, client).await;
    }
    match permanent_status(code) {
        Some(s) => Outcome::Fail { status: s, diagnostic: status.to_string() },
        None if code == Code::SlowDown => Outcome::RetryIn(SLOW_DOWN_MS, format!("{host}: {status}")),
        None => Outcome::Retry(format!("{host}: {status}")),
    }
}

/// Whether two `host[:port]` names are one server: case, a trailing dot
/// and the default port 1977 do not tell them apart.
fn same_server(a: &str, b: &str) -> bool {
    let norm = |s: &str| {
        let (host, port) = latssiam::client::split_host_port(s.trim());
        (host.trim_end_matches('.').to_ascii_lowercase(), port)
    };
    norm(a) == norm(b)
}

/// Whether `server` names a port (`host:port`, `[v6]:port`).
fn names_port(server: &str) -> bool {
    match server.rsplit_once(':') {
        Some((h, p)) => p.parse::<u16>().is_ok() && (!h.contains(':') || h.ends_with(']')),
        None => false,
    }
}

/// Connects to the server for `host`: looked up as a mailbox host (routes,
/// MX, A/AAAA), or, when `named` (a contact's `HOST[:PORT]`) or a port is
/// given, at that host and port.
async fn connect(gw: &Gateway, host: &str, named: bool) -> Result<Client, String> {
    let candidates = if named || names_port(host) {
        gw.resolver.resolve_server(host).await
    } else {
        gw.resolver.resolve(host).await
    };
    connect_to(gw, host, candidates.map_err(|e| e.to_string())?).await
}

/// Connects to the first of `candidates` (name to verify, address) that answers.
async fn connect_to(
    gw: &Gateway,
    host: &str,
    candidates: Vec<(String, std::net::SocketAddr)>,
) -> Result<Client, String> {
    let timeout = Duration::from_secs(gw.settings.queue.connect_timeout_secs.max(1));
    let mut last = String::from("no address");
    for (name, addr) in candidates {
        match Client::connect_within(addr, &name, Some(Arc::clone(&gw.identity)), &gw.pins, timeout).await {
            Ok(c) => return Ok(c),
            Err(e @ ClientError::Tls(_)) => {
                warn!(%addr, error = %e, "TLS or TOFU refused a server.");
                last = e.to_string();
            }
            Err(e) => {
                debug!(%addr, error = %e, "Cannot connect.");
                last = e.to_string();
            }
        }
    }
    Err(format!("{host}: {last}"))
}

/// Asks the server at `to` to prove (VERIFY) that it serves the mailbox `fp`.
async fn verify_moved(gw: &Gateway, fp: &Fingerprint, to: &str) -> Result<(), String> {
    // A `35` is the word of a server, not of the contact: it may name any
    // host, so one inside the gateway's network (loopback, private,
    // link-local, ...) is not even connected to unless the operator routed it.
    // Reached as later deliveries will reach it (`to` becomes the contact's
    // named server), at the very addresses checked: a second look-up could
    // answer otherwise (DNS rebinding).
    let addrs = gw.resolver.resolve_server(to).await.map_err(|e| e.to_string())?;
    if !gw.resolver.routed(to) {
        if let Some((_, addr)) = addrs.iter().find(|(_, a)| internal(a.ip())) {
            return Err(format!(
                "{to} is at an internal address ({}); not followed without a [routes] entry",
                addr.ip()
            ));
        }
    }
    let mut client = connect_to(gw, to, addrs).await?;
    let answer = tokio::time::timeout(Duration::from_secs(60), client.verify(*fp)).await;
    client.quit().await;
    match answer {
        Ok(Ok(Ok(_))) => Ok(()),
        Ok(Ok(Err(status))) => Err(status.to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("VERIFY timed out".into()),
    }
}

/// Whether `ip` is not a public Internet address: loopback, unspecified,
/// private (RFC 1918, IPv6 unique local), link-local, shared (RFC 6598),
/// multicast, documentation or benchmarking ranges, or such an IPv4 address
/// mapped into IPv6.
fn internal(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_unspecified()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (b == 18 || b == 19))
                || a >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return internal(IpAddr::V4(v4));
            }
            let s = v6.segments();
            // NAT64: the well-known prefix carries an IPv4 address (judged as
            // such); the local-use prefix 64:ff9b:1::/48 is internal.
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return internal(IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d)));
            }
            if s[..3] == [0x64, 0xff9b, 1] {
                return true;
            }
            let first = s[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && v6.segments()[1] == 0x0db8
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(n: u64) -> (JobId, Job) {
        let job = Job {
            message: n,
            target: Target::Smtp { rcpt: "x@e".into() },
            origin: Origin::Gateway,
            arrived_ms: 0,
            attempts: 0,
            due_ms: 0,
            last_error: None,
        };
        (JobId { message: n, index: 0 }, job)
    }

    #[test]
    fn deliveries_during_smtp_sessions_hold_at_most_their_share_per_destination() {
        let t = InSession::default();
        let now = Instant::now();
        let held: Vec<_> = (0..3).filter_map(|_| t.take("latssiam:a".into(), 2, now)).collect();
        assert_eq!(held.len(), 2);
        assert!(t.take("latssiam:b".into(), 2, now).is_some(), "another destination");
        assert_eq!(t.active("latssiam:a"), 2);
        drop(held);
        assert_eq!(t.active("latssiam:a"), 0, "given back");
        assert!(t.lock().is_empty(), "no entry left behind");
        // One that met trouble pauses its destination, and only that one.
        let slot = t.take("latssiam:a".into(), 2, now);
        slot.as_ref().map(InSessionSlot::pause);
        drop(slot);
        assert!(t.take("latssiam:a".into(), 2, now).is_none(), "paused");
        assert!(t.take("latssiam:b".into(), 2, now).is_some());
        assert!(t.take("latssiam:a".into(), 2, now + IN_SESSION_PAUSE + Duration::from_secs(1)).is_some(), "over");
    }

    #[test]
    fn internal_addresses_are_told_from_public_ones() {
        for ip in [
            "127.0.0.1",
            "10.0.0.5",
            "172.16.1.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.5",
            "::ffff:127.0.0.1",
            "224.0.0.1",
            "ff02::1",
            "64:ff9b::a00:5",
            "64:ff9b:1::1",
        ] {
            assert!(internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["93.184.216.34", "2a00:1450:4001::1", "::ffff:93.184.216.34", "1.1.1.1", "64:ff9b::5db8:d822"] {
            assert!(!internal(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn one_destination_holds_at_most_its_share_and_hands_its_slot_on() {
        let d = Destinations::default();
        let mut went = 0;
        for n in 0..(3 + MAX_PARKED as u64 + 2) {
            let (id, j) = job(n);
            match d.admit("latssiam:stalled", 3, MAX_PARKED, id, j) {
                Admit::Go(..) => went += 1,
                Admit::Parked => {}
                Admit::Full(id, _) => assert!(id.message >= 3 + MAX_PARKED as u64),
            }
        }
        assert_eq!(went, 3);
        assert_eq!(d.active("latssiam:stalled"), 3);
        // Another destination is not held up.
        let (id, j) = job(99_999);
        assert!(matches!(d.admit("latssiam:healthy", 3, MAX_PARKED, id, j), Admit::Go(..)));
        // A finished delivery hands its slot to the first waiting job, in order.
        assert_eq!(d.next("latssiam:stalled").map(|(id, _)| id.message), Some(3));
        assert_eq!(d.active("latssiam:stalled"), 3);
        assert!(d.next("latssiam:healthy").is_none());
        assert_eq!(d.active("latssiam:healthy"), 0);
    }

    #[test]
    fn one_server_under_several_spellings() {
        assert!(same_server("BobHost.", "bobhost") && same_server("bobhost:1977", "bobhost"));
        assert!(same_server("[::1]:1977", "::1") && same_server("127.0.0.1:2000", "127.0.0.1:2000"));
        assert!(!same_server("bobhost:2000", "bobhost") && !same_server("a.example", "b.example"));
    }

    #[test]
    fn ports_are_told_from_host_names() {
        assert!(names_port("127.0.0.1:2000") && names_port("h.example:1977") && names_port("[::1]:5"));
        assert!(!names_port("h.example") && !names_port("::1") && !names_port("[::1]"));
    }
}
