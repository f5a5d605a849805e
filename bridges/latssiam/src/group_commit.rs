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

/// The flusher of one sled database. Dropping it stops the thread (which
/// holds a handle on the database, so the directory lock is released after).
pub struct GroupCommit {
    sender: Mutex<mpsc::Sender<Waiter>>,
    before: Arc<Mutex<Vec<BeforeFlush>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
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
        Ok(Self { sender: Mutex::new(tx), before, thread: Mutex::new(Some(thread)) })
    }

    /// Runs `hook` before every flush from now on; a flush whose hook fails
    /// fails for everyone waiting on it.
    pub fn before_flush(&self, hook: BeforeFlush) {
        self.before.lock().unwrap_or_else(|e| e.into_inner()).push(hook);
    }

    /// Waits until everything written so far is on disk.
    ///
    /// # Errors
    /// [`FlushError`] if the fsync failed or the flusher is gone.
    pub async fn durable(&self) -> Result<(), FlushError> {
        let (tx, rx) = oneshot::channel();
        self.sender.lock().unwrap_or_else(|e| e.into_inner()).send(tx).map_err(|_| FlushError::Closed)?;
        rx.await.map_err(|_| FlushError::Closed)?.map_err(FlushError::Io)
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        drop(std::mem::replace(self.sender.get_mut().unwrap_or_else(|e| e.into_inner()), mpsc::channel().0));
        if let Some(thread) = self.thread.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = thread.join();
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
