//! The queue in the node's sled database (`queue.backend = "sled"`, the
//! default).
//!
//! Invariants:
//! - A message is acknowledged to whoever handed it over only after
//!   [`Store::enqueue_with_posts`] returned, which is after an fsync covering its body and
//!   every job (group commit: concurrent writers share one fsync).
//! - Every job has a body under its message id; a body with neither jobs
//!   nor dead letters is garbage and is removed.
//! - `due` is an index of `jobs` and is rebuilt from it at every open, so a
//!   crash between the writes of the two trees loses nothing. While the
//!   gateway runs, a job that a worker has claimed has no `due` entry.

use std::sync::Arc;
use std::time::Duration;

use sled::Transactional as _;

use super::{fresh_jobs, now_ms, Claimed, Depth, DigestJob, Job, JobId, JobQueue, Origin, PostTicket, Quiet, Target};
use crate::gateway::db::{corrupt, decode, encode, SharedFuture, Store, StoreError};
use crate::gateway::outbox::IrcPost;

/// The job queue in the node's own database.
pub struct SledQueue(Arc<Store>);

impl SledQueue {
    /// The queue in `store`.
    pub fn new(store: Arc<Store>) -> Self {
        Self(store)
    }
}

/// A post from the sled outbox: its key.
struct SledPost {
    store: Arc<Store>,
    key: sled::IVec,
}

impl PostTicket for SledPost {
    fn alive(&self) -> Quiet<'_> {
        Box::pin(async {})
    }

    fn done(self: Box<Self>, posted: bool) -> SharedFuture<'static, ()> {
        // Not posted: it stays first in the outbox and comes again.
        Box::pin(async move {
            if posted {
                self.store.irc_done(&self.key)
            } else {
                Ok(())
            }
        })
    }
}

impl JobQueue for SledQueue {
    fn shared(&self) -> bool {
        false
    }

    fn new_message_id(&self) -> Result<u64, StoreError> {
        self.0.next_message_id()
    }

    fn enqueue_with_posts<'a>(
        &'a self,
        id: u64,
        body: &'a [u8],
        targets: Vec<Target>,
        origin: &'a Origin,
        posts: &'a [IrcPost],
    ) -> SharedFuture<'a, ()> {
        Box::pin(self.0.enqueue_with_posts(id, body, targets, origin, posts))
    }

    fn enqueue_digests<'a>(
        &'a self,
        _store: &'a Store,
        keys: &'a [sled::IVec],
        digests: &'a [DigestJob],
    ) -> SharedFuture<'a, ()> {
        // The window is in this same database: one transaction.
        Box::pin(self.0.enqueue_digests(keys, digests))
    }

    fn claim(&self, max: usize) -> SharedFuture<'_, Claimed> {
        Box::pin(async move { self.0.claim_due(now_ms(), max) })
    }

    fn wait(&self, next: Option<u64>) -> Quiet<'_> {
        let wait = next.map_or(Duration::from_secs(60), |at| Duration::from_millis(at.saturating_sub(now_ms())));
        Box::pin(async move {
            tokio::select! {
                () = self.0.wake.notified() => {}
                () = tokio::time::sleep(wait.min(Duration::from_secs(60))) => {}
            }
        })
    }

    fn pending(&self, id: JobId) -> bool {
        matches!(self.0.job(id), Ok(Some((_, false))) | Err(_))
    }

    fn body(&self, id: JobId) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.body(id.message)
    }

    fn body_size(&self, id: JobId) -> Option<usize> {
        self.0.body_size(id.message)
    }

    fn complete(&self, id: JobId) -> SharedFuture<'_, ()> {
        Box::pin(async move { self.0.complete(id) })
    }

    fn defer<'a>(&'a self, id: JobId, job: &'a Job) -> SharedFuture<'a, ()> {
        Box::pin(async move { self.0.defer(id, job) })
    }

    fn kill<'a>(&'a self, id: JobId, job: &'a Job, report: Option<(Vec<u8>, Target)>) -> SharedFuture<'a, Option<u64>> {
        Box::pin(self.0.kill(id, job, report))
    }

    fn next_post(&self) -> SharedFuture<'_, Option<(Box<dyn PostTicket>, IrcPost)>> {
        Box::pin(async move {
            if let Some((key, post)) = self.0.irc_first()? {
                let ticket: Box<dyn PostTicket> = Box::new(SledPost { store: Arc::clone(&self.0), key });
                return Ok(Some((ticket, post)));
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), self.0.irc_wake.notified()).await;
            Ok(None)
        })
    }
}

fn due_key(due_ms: u64, id: JobId) -> [u8; 18] {
    let mut k = [0u8; 18];
    k[..8].copy_from_slice(&due_ms.to_be_bytes());
    k[8..].copy_from_slice(&id.key());
    k
}

/// Every job in a tree of job id -> [`Job`], in id order.
fn list_jobs(tree: &sled::Tree) -> Result<Vec<(JobId, Job)>, StoreError> {
    tree.iter()
        .map(|kv| kv.map_err(StoreError::from).and_then(|(k, v)| Ok((JobId::from_key(&k)?, decode(&v, "job")?))))
        .collect()
}

impl Store {
    pub(crate) fn recover(&self) -> Result<(), StoreError> {
        self.due.clear()?;
        for kv in self.jobs.iter() {
            let (k, v) = kv?;
            let job: Job = decode(&v, "job")?;
            self.due.insert(due_key(job.due_ms, JobId::from_key(&k)?), &[])?;
        }
        for kv in self.bodies.iter() {
            let (k, _) = kv?;
            if self.jobs.scan_prefix(&k).next().is_none() && self.dead.scan_prefix(&k).next().is_none() {
                self.remove_body(&k)?;
            }
        }
        // Spool files whose message was never acknowledged (or is gone).
        if let Ok(entries) = std::fs::read_dir(&self.spool) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let id = name.to_str().and_then(|n| u64::from_str_radix(n, 16).ok());
                let held = id.is_some_and(|id| self.bodies.contains_key(id.to_be_bytes()).unwrap_or(true));
                if !held {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(())
    }

    /// The size of a message's body, without reading a spooled one.
    pub fn body_size(&self, message: u64) -> Option<usize> {
        match self.bodies.get(message.to_be_bytes()).ok()?? {
            v if v.as_ref() == crate::gateway::db::SPOOLED => {
                std::fs::metadata(self.spool_file(message)).ok().and_then(|m| usize::try_from(m.len()).ok())
            }
            v => Some(v.len()),
        }
    }

    fn spool_file(&self, id: u64) -> std::path::PathBuf {
        self.spool.join(format!("{id:016x}"))
    }

    /// Removes a message's body (and its spool file).
    fn remove_body(&self, key: &[u8]) -> Result<(), StoreError> {
        if let Some(old) = self.bodies.remove(key)? {
            if old.as_ref() == crate::gateway::db::SPOOLED {
                let id = key.try_into().map(u64::from_be_bytes).unwrap_or(0);
                let _ = std::fs::remove_file(self.spool_file(id));
            }
        }
        Ok(())
    }

    /// Writes a large body to its spool file, fsynced; on the multi-threaded
    /// runtime the other tasks move off this thread meanwhile (no copy of
    /// the body is made for another thread).
    fn spool_body(&self, id: u64, body: &[u8]) -> Result<(), StoreError> {
        let path = self.spool_file(id);
        crate::blocking(|| latssiam::files::write_atomic(&path, body, 0o600).map_err(|e| StoreError::Sled(e.into())))
    }

    /// Queues `body` for each target under `id` (from `next_message_id`), and queues `posts` for IRC (after everything
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
        // Plain inserts, not a sled batch: sled writes its log out twice for
        // every batch (`pin_log` rolls the buffer before and after), which
        // made 4.4 log writes (each a pwrite and a waited sync_file_range)
        // per relayed message where one flush was asked for. A batch would
        // make the jobs appear together after a crash; nothing needs that:
        // until the flush below returned nothing is acknowledged, and a
        // message not acknowledged may be delivered either way (its jobs
        // were written), as before.
        let has_jobs = !targets.is_empty();
        let jobs: Vec<_> = fresh_jobs(id, targets, origin, now)
            .ok_or_else(|| corrupt("more than 65535 recipients"))?
            .into_iter()
            .map(|(jid, job)| (jid, encode(&job)))
            .collect();
        let mut post_keys = Vec::new();
        let written = async {
            for post in posts {
                let key = self.db.generate_id()?.to_be_bytes();
                self.irc.insert(key, encode(post))?;
                post_keys.push(key);
            }
            if has_jobs {
                if body.len() > crate::gateway::db::SPOOL_OVER {
                    self.spool_body(id, body)?;
                    self.bodies.insert(id.to_be_bytes(), crate::gateway::db::SPOOLED)?;
                } else {
                    self.bodies.insert(id.to_be_bytes(), body)?;
                }
                for (jid, job) in &jobs {
                    self.jobs.insert(jid.key(), job.as_slice())?;
                }
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
        self.index_due(jobs.into_iter().map(|(jid, _)| jid), now);
        Ok(())
    }

    /// Makes jobs queued at `now` (and durable) due.
    pub(crate) fn index_due(&self, jobs: impl IntoIterator<Item = JobId>, now: u64) {
        // The due index is rebuilt from the jobs at every open: no flush and
        // no batch needed (see above), and the message is kept now, so a
        // failure here must not refuse it.
        for jid in jobs {
            if let Err(e) = self.due.insert(due_key(now, jid), &[]) {
                tracing::warn!(error = %e, "Cannot index queued jobs; they are due again after a restart.");
                break;
            }
        }
        self.wake.notify_one();
    }

    /// Removes a message that was not acknowledged, with its jobs (best effort).
    fn discard_message(&self, id: u64) {
        let prefix = id.to_be_bytes();
        for key in self.jobs.scan_prefix(prefix).keys().flatten() {
            let _ = self.jobs.remove(key);
        }
        let _ = self.remove_body(&prefix);
    }

    /// The body of a message.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn body(&self, message: u64) -> Result<Option<Vec<u8>>, StoreError> {
        match self.bodies.get(message.to_be_bytes())? {
            Some(v) if v.as_ref() == crate::gateway::db::SPOOLED => std::fs::read(self.spool_file(message))
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("spooled body {message:016x}: {e}"))),
            other => Ok(other.map(|v| v.to_vec())),
        }
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
            self.remove_body(&prefix)?;
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
                let rjob = Job::fresh(rid.message, target, Origin::Gateway, now);
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

    /// The store's job queue, as the gateway uses it.
    fn queue(s: &Arc<Store>) -> Arc<dyn JobQueue> {
        Arc::new(SledQueue::new(Arc::clone(s)))
    }

    #[tokio::test]
    async fn jobs_survive_reopening_and_bodies_go_with_the_last_job() {
        let dir = tempfile::tempdir().unwrap();
        let origin = Origin::Smtp { from: "a@example.org".into() };
        let id = {
            let s = Store::open(dir.path()).unwrap();
            let id = queue(&s).enqueue(b"body", vec![smtp("x@e"), smtp("y@e")], &origin).await.unwrap();
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
    async fn large_bodies_are_spooled_to_files_and_go_with_their_message() {
        let dir = tempfile::tempdir().unwrap();
        let origin = Origin::Smtp { from: "a@example.org".into() };
        let big: Vec<u8> = (0..(crate::gateway::db::SPOOL_OVER + 1)).map(|i| (i % 251) as u8).collect();
        let s = Store::open(dir.path()).unwrap();
        let id = queue(&s).enqueue(&big, vec![smtp("x@e")], &origin).await.unwrap();
        let file = s.spool_file(id);
        assert_eq!(std::fs::read(&file).unwrap(), big, "the octets are in the spool file");
        assert_eq!(s.bodies.get(id.to_be_bytes()).unwrap().as_deref(), Some(crate::gateway::db::SPOOLED));
        assert_eq!(s.body(id).unwrap().as_deref(), Some(&big[..]));
        // An orphan (written, never acknowledged) goes at the next start; a held one stays.
        let orphan = s.spool_file(id + 1000);
        std::fs::write(&orphan, b"x").unwrap();
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        assert!(!orphan.exists() && file.exists());
        let (claimed, _) = s.claim_due(now_ms(), 10).unwrap();
        s.complete(claimed[0].0).unwrap();
        assert!(!file.exists(), "the file goes with the last job");
        assert_eq!(s.body(id).unwrap(), None);
    }

    #[tokio::test]
    async fn deferred_jobs_wait_for_their_time_and_retry_brings_them_forward() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        queue(&s).enqueue(b"b", vec![smtp("x@e")], &Origin::Gateway).await.unwrap();
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
