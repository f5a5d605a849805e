//! The delivery worker: takes due jobs from the queue, delivers them to
//! LATSSIAM (sealed to the recipient, signed by the gateway, over a pooled
//! TLS connection per server) or to the smarthost, and acts on the result:
//! delete after `31`, back off after a temporary failure, dead-letter and
//! bounce after a permanent one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use latssiam::client::{Client, ClientError};
use latssiam::wire::{Code, Status};
use latssiam::{crypto, Fingerprint};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::mail::{self, Failure};
use super::store::{now_ms, Job, JobId, Origin, Target};
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

/// How long to wait after a `37 Slow down`, however many attempts before.
const SLOW_DOWN_MS: u64 = 2000;

/// What one attempt came to.
enum Outcome {
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
    while !shutdown.is_cancelled() {
        let free = slots.available_permits();
        if free == 0 {
            tokio::select! {
                p = Arc::clone(&slots).acquire_owned() => drop(p),
                () = shutdown.cancelled() => break,
            }
            continue;
        }
        let (jobs, next) = match gw.store.claim_due(now_ms(), free) {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "Cannot read the queue; retrying in a second.");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let got = jobs.len();
        for (id, job) in jobs {
            let Ok(permit) = Arc::clone(&slots).acquire_owned().await else { break };
            let gw = Arc::clone(&gw);
            tracker.spawn(async move {
                deliver(&gw, id, job).await;
                drop(permit);
            });
        }
        if got == free {
            continue;
        }
        let wait = next.map_or(Duration::from_secs(60), |at| Duration::from_millis(at.saturating_sub(now_ms())));
        tokio::select! {
            () = gw.store.wake.notified() => {}
            () = tokio::time::sleep(wait.min(Duration::from_secs(60))) => {}
            () = shutdown.cancelled() => break,
        }
    }
    tracker.close();
    tracker.wait().await;
}

fn backoff(gw: &Gateway, attempts: u32) -> u64 {
    let q = &gw.settings.queue;
    let factor = 1u64.checked_shl(attempts.saturating_sub(1).min(30)).unwrap_or(u64::MAX);
    q.first_retry_secs.saturating_mul(factor).min(q.max_retry_secs).saturating_mul(1000)
}

async fn deliver(gw: &Arc<Gateway>, id: JobId, mut job: Job) {
    let outcome = match &job.target {
        Target::Latssiam { fingerprint, .. } => to_latssiam(gw, &job, fingerprint).await,
        Target::Smtp { rcpt } => to_smtp(gw, &job, rcpt).await,
    };
    let results = match job.target {
        Target::Latssiam { .. } => &gw.metrics.to_latssiam,
        Target::Smtp { .. } => &gw.metrics.to_smtp,
    };
    let now = now_ms();
    let outcome = match outcome {
        Outcome::Retry(e) if now.saturating_sub(job.arrived_ms) >= gw.settings.queue.lifetime_secs * 1000 => {
            Outcome::Fail { status: "5.4.7", diagnostic: format!("delivery time expired; last error: {e}") }
        }
        o => o,
    };
    let stored = match outcome {
        Outcome::Delivered => {
            results.ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            gw.metrics.end_to_end.observe(Duration::from_millis(now.saturating_sub(job.arrived_ms)));
            info!(job = %id, target = job.target.kind(), "Delivered.");
            gw.store.complete(id)
        }
        Outcome::Retry(e) => {
            results.deferred.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            job.attempts += 1;
            job.due_ms = now + backoff(gw, job.attempts);
            info!(job = %id, attempts = job.attempts, error = %e, "Deferred.");
            job.last_error = Some(e);
            gw.store.defer(id, &job)
        }
        Outcome::RetryIn(delay, e) => {
            results.deferred.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            job.attempts += 1;
            job.due_ms = now + delay;
            job.last_error = Some(e);
            gw.store.defer(id, &job)
        }
        Outcome::Fail { status, diagnostic } => {
            results.failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            warn!(job = %id, status, error = %diagnostic, "Delivery failed for good; dead-lettered.");
            job.last_error = Some(diagnostic.clone());
            match gw.store.kill(id, &job).await {
                Ok(()) => {
                    report(gw, &job, status, &diagnostic).await;
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
    };
    if let Err(e) = stored {
        warn!(job = %id, error = %e, "Cannot record the delivery result; the job will be retried after a restart.");
    }
}

/// Reports a permanent failure to whoever sent the message: an RFC 3464 DSN
/// to an email sender, a notice to a LATSSIAM sender; nothing for `<>` or the
/// gateway's own messages.
async fn report(gw: &Gateway, job: &Job, status: &str, diagnostic: &str) {
    let Ok(Some(original)) = gw.store.body(job.message) else { return };
    let recipient = match &job.target {
        Target::Latssiam { address, .. } => address.clone(),
        Target::Smtp { rcpt } => rcpt.clone(),
    };
    let hostname = &gw.settings.gateway.hostname;
    let (body, target) = match &job.origin {
        Origin::Gateway => return,
        Origin::Smtp { from } if from.is_empty() => return,
        Origin::Smtp { from } => {
            let arrived = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(job.arrived_ms) * 1_000_000)
                .ok()
                .and_then(|t| t.format(&time::format_description::well_known::Rfc2822).ok())
                .unwrap_or_default();
            let failure = Failure { recipient: &recipient, status, diagnostic };
            (mail::dsn(hostname, from, &arrived, &failure, &original), Target::Smtp { rcpt: from.clone() })
        }
        Origin::Latssiam { fingerprint, from } => {
            let text =
                format!("Your message could not be delivered to <{recipient}>.\r\n\r\nStatus {status}: {diagnostic}");
            let body = mail::notice(hostname, from, "Undelivered message", &text, &original);
            (body, Target::Latssiam { fingerprint: fingerprint.clone(), address: from.clone() })
        }
    };
    match gw.store.enqueue(&body, vec![target], &Origin::Gateway).await {
        Ok(id) => info!(bounce = %super::store::message_id_string(id), "Queued a failure report to the sender."),
        Err(e) => warn!(error = %e, "Cannot queue a failure report."),
    }
}

async fn to_smtp(gw: &Gateway, job: &Job, rcpt: &str) -> Outcome {
    let Ok(Some(body)) = gw.store.body(job.message) else {
        return Outcome::Fail { status: "5.3.0", diagnostic: "the message body is missing from the queue".into() };
    };
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

async fn to_latssiam(gw: &Gateway, job: &Job, fingerprint: &str) -> Outcome {
    let Ok(fp) = fingerprint.parse::<Fingerprint>() else {
        return Outcome::Fail { status: "5.1.3", diagnostic: format!("bad fingerprint {fingerprint:?}") };
    };
    let contact = match gw.store.contact(&fp) {
        Ok(Some(c)) => c,
        Ok(None) => return Outcome::Fail { status: "5.1.1", diagnostic: "no such contact (removed?)".into() },
        Err(e) => return Outcome::Retry(e.to_string()),
    };
    let body = match gw.store.body(job.message) {
        Ok(Some(b)) => b,
        Ok(None) => return Outcome::Fail { status: "5.3.0", diagnostic: "the message body is missing".into() },
        Err(e) => return Outcome::Retry(e.to_string()),
    };
    let sealed = match crypto::seal(&body, &contact.cert) {
        Ok(s) => s,
        Err(e) => return Outcome::Fail { status: "5.7.5", diagnostic: format!("cannot encrypt to the contact: {e}") },
    };
    if sealed.len() > latssiam::wire::MAX_BLOCK_DER {
        return Outcome::Fail {
            status: "5.3.4",
            diagnostic: format!(
                "{} octets sealed, over the {} LATSSIAM allows",
                sealed.len(),
                latssiam::wire::MAX_BLOCK_DER
            ),
        };
    }
    let signature = match crypto::sign(&sealed, &gw.identity) {
        Ok(s) => s,
        Err(e) => return Outcome::Retry(format!("cannot sign: {e}")),
    };
    let host = contact.server_host().to_owned();
    // A pooled session may have been closed by the server meanwhile: on any
    // failure over a reused session, try once more over a fresh one.
    let mut pooled = gw.pool.take(&host).await;
    loop {
        let reused = pooled.is_some();
        let mut client = match pooled.take() {
            Some(c) => c,
            None => match connect(gw, &host).await {
                Ok(c) => c,
                Err(e) => return Outcome::Retry(e),
            },
        };
        let status = match client.send(fp, &sealed, Some(&signature)).await {
            Ok(s) if reused && s.code() == Code::Timeout => continue,
            Ok(s) => s,
            Err(_) if reused => continue,
            Err(e) => return Outcome::Retry(format!("{host}: {e}")),
        };
        return classify(gw, &fp, &host, status, client).await;
    }
}

async fn classify(gw: &Gateway, fp: &Fingerprint, host: &str, status: Status, client: Client) -> Outcome {
    let code = status.code();
    if code == Code::MessageAccepted {
        gw.pool.put(host, client).await;
        return Outcome::Delivered;
    }
    if code == Code::MailboxMoved {
        if let Some(to) = status.moved_to() {
            info!(%fp, from = host, to, "Mailbox moved; following it.");
            if let Err(e) = gw.store.move_contact(fp, to).await {
                return Outcome::Retry(e.to_string());
            }
            gw.pool.put(host, client).await;
            return Outcome::RetryIn(0, status.to_string());
        }
    }
    if !matches!(code, Code::Timeout | Code::SyntaxError | Code::SequencingError) {
        gw.pool.put(host, client).await;
    }
    match permanent_status(code) {
        Some(s) => Outcome::Fail { status: s, diagnostic: status.to_string() },
        None if code == Code::SlowDown => Outcome::RetryIn(SLOW_DOWN_MS, format!("{host}: {status}")),
        None => Outcome::Retry(format!("{host}: {status}")),
    }
}

async fn connect(gw: &Gateway, host: &str) -> Result<Client, String> {
    let candidates = gw.resolver.resolve(host).await.map_err(|e| e.to_string())?;
    let mut last = String::from("no address");
    for (name, addr) in candidates {
        match Client::connect(addr, &name, Some(Arc::clone(&gw.identity)), &gw.pins).await {
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
