//! Events per key and hour (failure reports per address, relayed messages
//! per contact) or day (messages per origin and person), counted where they
//! outlive the process: in the node's sled
//! database, and with a shared queue in a key-value bucket every node counts
//! in, so that neither a restart nor a second node multiplies a limit.
//!
//! A window opens with a key's first event and lasts an hour (or the limit's
//! own length). Values are 12
//! octets: the window's start (Unix seconds, big-endian u64) and its count
//! (big-endian u32).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::warn;

const HOUR: u64 = 3600;

/// The longest an event waits for the shared count (an SMTP transaction or
/// a report is waiting on it) before this node's own count decides.
const SHARED_WAIT: Duration = Duration::from_secs(3);
const TREE: &str = "hourly";

/// One key's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// When the window opened (Unix seconds).
    pub start: u64,
    /// Events counted in it.
    pub count: u32,
}

impl Window {
    /// Decodes a stored value (anything else: no window).
    pub fn decode(v: &[u8]) -> Option<Self> {
        let start = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
        let count = u32::from_be_bytes(v.get(8..12)?.try_into().ok()?);
        Some(Self { start, count })
    }

    /// The stored form.
    pub fn encode(self) -> [u8; 12] {
        let mut out = [0u8; 12];
        out[..8].copy_from_slice(&self.start.to_be_bytes());
        out[8..].copy_from_slice(&self.count.to_be_bytes());
        out
    }

    /// The window after one more event at `now`, or `None` if it is over
    /// `max`. A window `length` seconds old (or from a clock ahead of ours by
    /// more than that) starts again.
    pub fn next(current: Option<Self>, now: u64, max: u32, length: u64) -> Option<Self> {
        let w = match current {
            Some(w) if now.saturating_sub(w.start) < length && w.start <= now + length => w,
            _ => Self { start: now, count: 0 },
        };
        (w.count < max).then_some(Self { count: w.count + 1, ..w })
    }
}

/// A counter shared by every node (the JetStream queue's bucket).
pub trait SharedCounter: Send + Sync {
    /// Counts an event for `key` at `now` if its window of `length` seconds
    /// allows it: `Ok(false)` when it is over `max`; an error when the shared
    /// store cannot say.
    fn count<'a>(
        &'a self,
        key: &'a str,
        now: u64,
        max: u32,
        length: u64,
    ) -> Pin<Box<dyn Future<Output = Result<bool, String>> + Send + 'a>>;
}

/// Events per key and hour.
pub struct HourlyLimit {
    name: &'static str,
    length: u64,
    tree: sled::Tree,
    shared: Option<Arc<dyn SharedCounter>>,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl HourlyLimit {
    /// The limit `name` (a prefix of its keys), counted in `db`, and in
    /// `shared` when there is one.
    ///
    /// # Errors
    /// The sled error, if the tree cannot be opened.
    pub fn open(
        db: &sled::Db,
        name: &'static str,
        shared: Option<Arc<dyn SharedCounter>>,
    ) -> Result<Self, sled::Error> {
        Ok(Self { name, length: HOUR, tree: db.open_tree(TREE)?, shared })
    }

    /// The same, over windows of `length` instead of an hour.
    #[must_use]
    pub fn per(self, length: Duration) -> Self {
        Self { length: length.as_secs().max(1), ..self }
    }

    /// Counts an event for `key` (case does not matter); false if that is
    /// over `per_hour` (0: no limit). If the shared store cannot be asked,
    /// this node's own count decides.
    pub async fn allow(&self, key: &str, per_hour: u32) -> bool {
        if per_hour == 0 {
            return true;
        }
        let key = format!("{}:{}", self.name, key.to_ascii_lowercase());
        let now = now_secs();
        if let Some(shared) = &self.shared {
            match tokio::time::timeout(SHARED_WAIT, shared.count(&key, now, per_hour, self.length)).await {
                Ok(Ok(allowed)) => return allowed,
                Ok(Err(e)) => warn!(error = %e, "Cannot count in the shared limits; counting on this node."),
                Err(_) => warn!("No answer from the shared limits in time; counting on this node."),
            }
        }
        self.count_here(&key, now, per_hour)
    }

    fn count_here(&self, key: &str, now: u64, per_hour: u32) -> bool {
        loop {
            let current = match self.tree.get(key) {
                Ok(v) => v,
                Err(e) => {
                    warn!(error = %e, "Cannot read an hourly limit.");
                    return true;
                }
            };
            let Some(next) = Window::next(current.as_deref().and_then(Window::decode), now, per_hour, self.length)
            else {
                return false;
            };
            match self.tree.compare_and_swap(key, current, Some(&next.encode()[..])) {
                Ok(Ok(())) => return true,
                Ok(Err(_)) => {}
                Err(e) => {
                    warn!(error = %e, "Cannot write an hourly limit.");
                    return true;
                }
            }
        }
    }

    /// Forgets windows that are over, every ten minutes until `shutdown`
    /// (the keys are addresses an attacker may choose: they do not pile up).
    pub async fn sweep(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(600)) => {}
                () = shutdown.cancelled() => return,
            }
            // A walk over the tree: off the async workers.
            let this = Arc::clone(&self);
            let _ = tokio::task::spawn_blocking(move || {
                let now = now_secs();
                let prefix = format!("{}:", this.name);
                for (key, value) in this.tree.scan_prefix(prefix.as_bytes()).flatten() {
                    if Window::decode(&value).is_none_or(|w| now.saturating_sub(w.start) >= this.length) {
                        let _ = this.tree.compare_and_swap(&key, Some(value), None::<&[u8]>);
                    }
                }
            })
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_counts_to_its_limit_then_starts_again_after_an_hour() {
        let mut w = None;
        for n in 1..=3 {
            w = Window::next(w, 1000, 3, HOUR);
            assert_eq!(w.map(|w| w.count), Some(n));
        }
        assert_eq!(Window::next(w, 1000 + HOUR - 1, 3, HOUR), None);
        assert_eq!(Window::next(w, 1000 + HOUR, 3, HOUR), Some(Window { start: 1000 + HOUR, count: 1 }));
        assert_eq!(Window::next(w, 1000 + HOUR, 3, 2 * HOUR), None, "a longer window");
        // A window from a clock far ahead does not freeze the key.
        let ahead = Some(Window { start: 1000 + 5 * HOUR, count: 3 });
        assert_eq!(Window::next(ahead, 1000, 3, HOUR), Some(Window { start: 1000, count: 1 }));
        let w = Window { start: 7, count: 9 };
        assert_eq!(Window::decode(&w.encode()), Some(w));
        assert_eq!(Window::decode(b"short"), None);
    }

    #[tokio::test]
    async fn counts_survive_reopening_and_case_does_not_matter() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let b = HourlyLimit::open(&db, "bounces", None).unwrap();
            for _ in 0..3 {
                assert!(b.allow("a@example.org", 3).await);
            }
            assert!(!b.allow("A@example.org", 3).await);
            assert!(b.allow("b@example.org", 3).await);
            for _ in 0..100 {
                assert!(b.allow("c@example.org", 0).await);
            }
            // Another limit's keys are its own.
            let r = HourlyLimit::open(&db, "relayed", None).unwrap();
            assert!(r.allow("a@example.org", 3).await);
            db.flush().unwrap();
        }
        let db = sled::open(dir.path()).unwrap();
        let b = HourlyLimit::open(&db, "bounces", None).unwrap();
        assert!(!b.allow("a@example.org", 3).await, "the count survived the restart");
    }
}
