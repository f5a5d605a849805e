//! Group commit for sled: many writers, one fsync.
//!
//! Writers call [`GroupCommit::durable`] after their inserts; a dedicated
//! thread flushes the database once for everyone who asked while the previous
//! flush ran, then wakes them all. A caller returns only after an fsync that
//! started after its call, so its writes are on disk.

use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

type Waiter = oneshot::Sender<Result<(), String>>;

/// What runs before each flush of the database: a file that must be durable
/// whenever the database is (the server store's message bodies).
pub type BeforeFlush = Arc<dyn Fn() -> std::io::Result<()> + Send + Sync>;

/// Opens the sled database in `dir`, waiting up to 2 s for its directory
/// lock. sled finishes some background writes after a `Db` is dropped, so a
/// database closed a moment ago in this same process can still hold the lock
/// briefly (seen as an intermittent "could not acquire lock" when a store is
/// reopened). Another process that holds the lock still gets the error, after
/// the wait.
///
/// # Errors
/// The sled error.
pub fn open_db(dir: &Path) -> sled::Result<sled::Db> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match sled::Config::new().path(dir).open() {
            // sled reports the lock only as text in an I/O error.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock") && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

/// Why a flush failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlushError {
    /// The fsync failed.
    #[error("flush failed: {0}")]
    Io(String),
    /// The flusher thread is gone (shutting down).
    #[error("the store is shutting down")]
    Closed,
}

/// How long a caller of [`GroupCommit::durable`] waits for a flush before
/// it takes the store for stalled ([`FlushError::Io`]): a flush that hangs
/// (a full disk has been seen to leave one of sled's waiting for ever)
/// would otherwise hold every SMTP session and `SEND` waiting on it without
/// an answer. An I/O error marks the gateway's store broken, so it answers
/// `451` and stops for its supervisor, as it does after a failed fsync; a
/// server answers `53`. Far beyond any healthy fdatasync.
pub const STALLED_AFTER: Duration = Duration::from_secs(30);

/// The flusher of one sled database. Dropping it stops the thread (which
/// holds a handle on the database, so the directory lock is released after),
/// waiting at most [`STALLED_AFTER`] for a flush under way.
pub struct GroupCommit {
    sender: Mutex<mpsc::Sender<Waiter>>,
    before: Arc<Mutex<Vec<BeforeFlush>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    stalled_after: Duration,
}

impl GroupCommit {
    /// Starts the flusher thread for `db`.
    ///
    /// # Errors
    /// If the thread cannot be spawned.
    pub fn start(db: sled::Db, name: &str) -> std::io::Result<Self> {
        Self::start_with(name, move || db.flush().map(|_| ()).map_err(std::io::Error::other))
    }

    /// Starts a flusher thread whose flush is `flush` (the server store's
    /// log: an fdatasync of its active segment).
    ///
    /// # Errors
    /// If the thread cannot be spawned.
    pub fn start_with(name: &str, flush: impl Fn() -> std::io::Result<()> + Send + 'static) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Waiter>();
        let before = Arc::new(Mutex::new(Vec::<BeforeFlush>::new()));
        let hooks = Arc::clone(&before);
        let thread = std::thread::Builder::new().name(name.into()).spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                batch.extend(rx.try_iter());
                let hooks = hooks.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let result = hooks
                    .iter()
                    .try_for_each(|hook| hook())
                    .map_err(|e| e.to_string())
                    .and_then(|()| flush().map_err(|e| e.to_string()));
                for waiter in batch {
                    let _ = waiter.send(result.clone());
                }
            }
        })?;
        Ok(Self { sender: Mutex::new(tx), before, thread: Mutex::new(Some(thread)), stalled_after: STALLED_AFTER })
    }

    /// The same flusher, taken for stalled after `bound` instead of [`STALLED_AFTER`].
    #[must_use]
    pub fn stalled_after(mut self, bound: Duration) -> Self {
        self.stalled_after = bound;
        self
    }

    /// Runs `hook` before every flush from now on; a flush whose hook fails
    /// fails for everyone waiting on it.
    pub fn before_flush(&self, hook: BeforeFlush) {
        self.before.lock().unwrap_or_else(|e| e.into_inner()).push(hook);
    }

    /// Waits until everything written so far is on disk.
    ///
    /// # Errors
    /// [`FlushError`] if the fsync failed, no flush finished within the
    /// bound ([`STALLED_AFTER`]), or the flusher is gone.
    pub async fn durable(&self) -> Result<(), FlushError> {
        let (tx, rx) = oneshot::channel();
        self.sender.lock().unwrap_or_else(|e| e.into_inner()).send(tx).map_err(|_| FlushError::Closed)?;
        match tokio::time::timeout(self.stalled_after, rx).await {
            Ok(answer) => answer.map_err(|_| FlushError::Closed)?.map_err(FlushError::Io),
            Err(_) => Err(FlushError::Io(format!(
                "no flush finished within {} s: the store is stalled",
                self.stalled_after.as_secs_f64()
            ))),
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        drop(std::mem::replace(self.sender.get_mut().unwrap_or_else(|e| e.into_inner()), mpsc::channel().0));
        if let Some(thread) = self.thread.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            // A flush that hangs is left behind: the process ends without it.
            let until = Instant::now() + self.stalled_after;
            while !thread.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn log_len(dir: &Path) -> u64 {
        std::fs::metadata(dir.join("db")).unwrap().len()
    }

    /// A flush that never ends is an error to its waiters after the bound,
    /// and dropping the flusher does not wait for it past the bound either.
    #[tokio::test]
    async fn a_flush_that_hangs_is_an_error_after_the_bound() {
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let hold = Mutex::new(hold);
        let commit = GroupCommit::start_with("test-stalled", move || {
            let _ = hold.lock().unwrap().recv();
            Ok(())
        })
        .unwrap()
        .stalled_after(Duration::from_millis(200));
        let started = Instant::now();
        let got = commit.durable().await;
        assert!(matches!(&got, Err(FlushError::Io(e)) if e.contains("stalled")), "{got:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
        let dropped = Instant::now();
        drop(commit);
        assert!(dropped.elapsed() < Duration::from_secs(10), "the drop did not wait for the hung flush");
        drop(release);
    }

    /// The vendored sled extends its log file with written zeros ahead of
    /// the log (vendor/sled/PATCHES.md, change 6): a durable write then
    /// overwrites blocks the file has, and its `fdatasync` commits no new
    /// size. Recovery reads the zeros as it read the holes before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_log_is_written_ahead_so_a_flush_overwrites_and_a_reopen_reads_it_all() {
        let dir = tempfile::tempdir().unwrap();
        let value = |i: u32| vec![u8::try_from(i % 251).unwrap(); 6000];
        {
            let db = open_db(dir.path()).unwrap();
            let commit = GroupCommit::start(db.clone(), "test-flusher").unwrap();
            db.insert(0u32.to_be_bytes(), value(0)).unwrap();
            commit.durable().await.unwrap();
            let ahead = log_len(dir.path());
            assert_eq!(ahead % (4 << 20), 0, "the file ends on a write-ahead step: {ahead}");
            // About 600 KB of values, well inside one step: every flush
            // overwrites, so the length stays where it was.
            for i in 1..100u32 {
                db.insert(i.to_be_bytes(), value(i)).unwrap();
                commit.durable().await.unwrap();
                assert_eq!(log_len(dir.path()), ahead, "flush {i} grew the file");
            }
        }
        for round in 0..2u32 {
            let db = open_db(dir.path()).unwrap();
            for i in 0..100 + round * 100 {
                assert_eq!(db.get(i.to_be_bytes()).unwrap().as_deref(), Some(&value(i)[..]), "value {i}");
            }
            let commit = GroupCommit::start(db.clone(), "test-flusher").unwrap();
            for i in 100 + round * 100..200 + round * 100 {
                db.insert(i.to_be_bytes(), value(i)).unwrap();
            }
            commit.durable().await.unwrap();
        }
    }
}
