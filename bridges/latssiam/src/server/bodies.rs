//! Message bodies of the server's store, each written once, appended to
//! segment files beside sled.
//!
//! sled keeps a pointer per message (segment, offset, length, CRC-32 of the
//! body); the body itself is appended to the active segment. sled wrote each
//! 5 KB body five to six times over (leaf splits, consolidations, the zeros
//! written ahead of its log: docs/PERFORMANCE.md); a pointer is 24 octets.
//!
//! Invariants:
//! - Bodies are appended only to the active segment, whose number is higher
//!   than every other segment's. A new one is started at every open and
//!   when the active one would pass its size limit; the old one is
//!   fdatasynced first and the directory fsynced after the new one is
//!   created; at open, the highest segment found is fdatasynced before the
//!   new one is created (a crashed process may have left its last bodies in
//!   the page cache only). So every segment but the highest on disk is
//!   durable in full.
//! - A failed fdatasync poisons the log: every later append and sync fails
//!   until the process starts again (after an I/O error Linux may mark the
//!   pages clean, and a second fdatasync would report a success it did not
//!   have), as sled refuses writes after its first I/O error.
//! - The group commit calls [`Bodies::sync`] before it flushes sled, so a
//!   caller of `durable` finds the bodies it appended on disk as well as
//!   their pointers. sled may write a pointer to disk on its own before its
//!   body is synced: such a message was never acknowledged, and
//!   [`Opening::holds`] finds it at the next open (its body fails the CRC or
//!   is cut short), so the store removes it. A pointer into a lower segment
//!   that is missing or too short is damage, not a crash: opening fails
//!   with the segment named, rather than drop acknowledged messages (a
//!   database restored without its `bodies/`, say).
//! - Each segment's live bodies are counted in memory, rebuilt at open. A
//!   sealed segment with none left is unlinked only after a flush that
//!   started after its last body was released ([`Bodies::take_doomed`],
//!   [`Bodies::reap`]): a crash before then finds its pointers still in
//!   sled. A sealed segment less than a quarter live, sealed at least
//!   `grace` ago, is compacted by the store: its live bodies are appended
//!   again and their pointers moved by compare-and-swap, after which it has
//!   none left. So the segments on disk hold at most about four times the
//!   live octets, plus the active segment and the ones still in their grace.
//!   The compaction syncs its copies before it moves any pointer to them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Sealed segments kept open for reading at most.
const MAX_READERS: usize = 64;

/// Where a body is: 24 octets in sled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pointer {
    segment: u64,
    offset: u64,
    len: u32,
    crc: u32,
}

impl Pointer {
    pub(crate) const LEN: usize = 24;

    pub(crate) fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..8].copy_from_slice(&self.segment.to_be_bytes());
        out[8..16].copy_from_slice(&self.offset.to_be_bytes());
        out[16..20].copy_from_slice(&self.len.to_be_bytes());
        out[20..].copy_from_slice(&self.crc.to_be_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; Self::LEN] = bytes.try_into().ok()?;
        let (segment, rest) = bytes.split_at(8);
        let (offset, rest) = rest.split_at(8);
        let (len, crc) = rest.split_at(4);
        Some(Self {
            segment: u64::from_be_bytes(segment.try_into().ok()?),
            offset: u64::from_be_bytes(offset.try_into().ok()?),
            len: u32::from_be_bytes(len.try_into().ok()?),
            crc: u32::from_be_bytes(crc.try_into().ok()?),
        })
    }

    /// The segment it is in.
    pub(crate) fn segment(&self) -> u64 {
        self.segment
    }

    fn end(&self) -> u64 {
        self.offset.saturating_add(u64::from(self.len))
    }
}

#[derive(Debug, Default)]
struct Segment {
    /// Octets appended.
    size: u64,
    /// Bodies that pointers in sled name.
    live: u64,
    /// Their octets.
    live_octets: u64,
    /// When it stopped being the active segment (`None` while active).
    sealed: Option<Instant>,
    /// A compaction could not read one of its bodies: not tried again.
    stuck: bool,
}

struct State {
    active: u64,
    writer: Arc<File>,
    /// Appended to the active segment since its last sync.
    dirty: bool,
    segments: BTreeMap<u64, Segment>,
    readers: HashMap<u64, Arc<File>>,
    /// Sealed segments with no live body left, to unlink after a flush.
    doomed: Vec<u64>,
    /// A sync failed: every later append and sync fails.
    failed: bool,
}

/// The segment files of one store.
pub(crate) struct Bodies {
    dir: PathBuf,
    limit: u64,
    grace: Duration,
    state: Mutex<State>,
    /// Held across each fdatasync of [`Bodies::sync`], so that a caller
    /// that finds nothing dirty knows an fdatasync covering it has ended.
    syncing: Mutex<()>,
    #[cfg(test)]
    sync_fails: std::sync::atomic::AtomicBool,
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.body"))
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn poisoned() -> io::Error {
    io::Error::other("an fdatasync of the message bodies failed; no more writes until the server starts again")
}

/// The segments found on disk at open, before the store has counted which
/// bodies are live.
pub(crate) struct Opening {
    dir: PathBuf,
    /// Segment number -> its length on disk.
    found: BTreeMap<u64, u64>,
    live: BTreeMap<u64, Segment>,
    readers: HashMap<u64, File>,
}

impl Opening {
    /// Lists the segments in `dir`, creating it if need be.
    ///
    /// # Errors
    /// If the directory cannot be created or read.
    pub(crate) fn scan(dir: &Path) -> io::Result<Self> {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            if let Some(parent) = dir.parent() {
                File::open(parent)?.sync_all()?;
            }
        }
        let mut found = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(id) =
                name.to_str().and_then(|n| n.strip_suffix(".body")).and_then(|n| u64::from_str_radix(n, 16).ok())
            else {
                continue;
            };
            found.insert(id, entry.metadata()?.len());
        }
        Ok(Self { dir: dir.to_owned(), found, live: BTreeMap::new(), readers: HashMap::new() })
    }

    /// Whether the body `pointer` names is there; if so it is counted live.
    /// Bodies in the highest segment (the only one that can hold bodies
    /// appended after the last sync) are read and checked against their
    /// CRC: `false` if one fails or is cut short, a message never
    /// acknowledged. In the others only their extent is checked.
    ///
    /// # Errors
    /// If a segment cannot be read, and `InvalidData` if a pointer names a
    /// segment that is not there or a body past the end of one that is not
    /// the highest: damage that opening must not paper over.
    pub(crate) fn holds(&mut self, pointer: &Pointer) -> io::Result<bool> {
        let top = self.found.keys().next_back().copied();
        let Some(&size) = self.found.get(&pointer.segment) else {
            return Err(invalid(format!(
                "a stored message's body is in segment {}, which is not there (was {} moved, or the database \
                 restored without it?)",
                segment_path(&self.dir, pointer.segment).display(),
                self.dir.display()
            )));
        };
        if pointer.end() > size {
            if top == Some(pointer.segment) {
                return Ok(false);
            }
            return Err(invalid(format!(
                "{} is cut short: it ends at octet {size}, a stored message's body at {}",
                segment_path(&self.dir, pointer.segment).display(),
                pointer.end()
            )));
        }
        if top == Some(pointer.segment) {
            let file = match self.readers.entry(pointer.segment) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(File::open(segment_path(&self.dir, pointer.segment))?)
                }
            };
            let mut body = vec![0; pointer.len as usize];
            file.read_exact_at(&mut body, pointer.offset)?;
            if crc32fast::hash(&body) != pointer.crc {
                return Ok(false);
            }
        }
        let segment = self.live.entry(pointer.segment).or_default();
        segment.size = size;
        segment.live += 1;
        segment.live_octets += u64::from(pointer.len);
        Ok(true)
    }

    /// Unlinks the segments no live body is in and starts a new active
    /// segment above every segment found. Call it only once the pointers
    /// [`Opening::holds`] refused are removed from sled durably.
    ///
    /// # Errors
    /// If the new segment cannot be created.
    pub(crate) fn start(self, limit: u64, grace: Duration) -> io::Result<Bodies> {
        for id in self.found.keys().filter(|id| !self.live.contains_key(id)) {
            if let Err(e) = std::fs::remove_file(segment_path(&self.dir, *id)) {
                tracing::warn!("Cannot remove the empty body segment {id:016x}: {e}");
            }
        }
        let top = self.found.keys().next_back().copied();
        if let Some(top) = top.filter(|top| self.live.contains_key(top)) {
            // A crashed process's last bodies may be in the page cache only;
            // from now on a higher segment exists, so this one must be durable.
            std::fs::OpenOptions::new().write(true).open(segment_path(&self.dir, top))?.sync_data()?;
        }
        let active = top.map_or(1, |top| top + 1);
        let now = Instant::now();
        let mut segments = self.live;
        for segment in segments.values_mut() {
            segment.sealed = Some(now);
        }
        let writer = create_segment(&self.dir, active)?;
        segments.insert(active, Segment::default());
        Ok(Bodies {
            dir: self.dir,
            limit,
            grace,
            state: Mutex::new(State {
                active,
                writer: Arc::new(writer),
                dirty: false,
                segments,
                readers: HashMap::new(),
                doomed: Vec::new(),
                failed: false,
            }),
            syncing: Mutex::new(()),
            #[cfg(test)]
            sync_fails: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

/// Creates segment `id` and makes its name durable.
fn create_segment(dir: &Path, id: u64) -> io::Result<File> {
    let path = segment_path(dir, id);
    let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok(file)
}

impl Bodies {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends `body` to the active segment (not yet durable: see
    /// [`Bodies::sync`]) and counts it live.
    ///
    /// # Errors
    /// If the write, or starting a new segment, fails.
    pub(crate) fn append(&self, body: &[u8]) -> io::Result<Pointer> {
        let crc = crc32fast::hash(body);
        let len = u32::try_from(body.len()).map_err(|_| invalid("a body over 4 GiB"))?;
        let mut state = self.lock();
        if state.failed {
            return Err(poisoned());
        }
        let size = state.segments.get(&state.active).map_or(0, |s| s.size);
        let size = if size > 0 && size.saturating_add(u64::from(len)) > self.limit {
            self.rotate(&mut state).inspect_err(|_| state.failed = true)?
        } else {
            size
        };
        state.writer.write_all_at(body, size)?;
        state.dirty = true;
        let pointer = Pointer { segment: state.active, offset: size, len, crc };
        let active = state.active;
        let segment = state.segments.entry(active).or_default();
        segment.size = pointer.end();
        segment.live += 1;
        segment.live_octets += u64::from(len);
        Ok(pointer)
    }

    /// Seals the active segment (durable in full first) and starts the next.
    /// Returns the new segment's size, 0.
    fn rotate(&self, state: &mut State) -> io::Result<u64> {
        // Always, even if `sync` just cleared `dirty`: its fdatasync may still
        // be running, and the segment must be durable before a higher one exists.
        state.writer.sync_data()?;
        let next = state.active + 1;
        let writer = create_segment(&self.dir, next)?;
        let old = std::mem::replace(&mut state.active, next);
        state.writer = Arc::new(writer);
        state.dirty = false;
        if let Some(segment) = state.segments.get_mut(&old) {
            segment.sealed = Some(Instant::now());
            if segment.live == 0 {
                state.doomed.push(old);
            }
        }
        state.segments.insert(next, Segment::default());
        Ok(0)
    }

    /// Makes every body appended so far durable: the group commit calls it
    /// before each flush of sled.
    ///
    /// # Errors
    /// If the fdatasync fails.
    pub(crate) fn sync(&self) -> io::Result<()> {
        let _one_at_a_time = self.syncing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let writer = {
            let mut state = self.lock();
            if state.failed {
                return Err(poisoned());
            }
            #[cfg(test)]
            if self.sync_fails.swap(false, std::sync::atomic::Ordering::SeqCst) {
                state.failed = true;
                return Err(io::Error::other("injected: fdatasync failed"));
            }
            if !state.dirty {
                return Ok(());
            }
            state.dirty = false;
            Arc::clone(&state.writer)
        };
        writer.sync_data().inspect_err(|_| self.lock().failed = true)
    }

    /// Makes the next sync fail as a failed fdatasync does (a fault that
    /// cannot be made on a healthy disk): appends still succeed until then.
    #[cfg(test)]
    pub(crate) fn fail_the_next_sync(&self) {
        self.sync_fails.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Reads the body `pointer` names and checks it against its CRC.
    ///
    /// # Errors
    /// `NotFound` if its segment is gone (unlinked after a compaction moved
    /// the body: read its pointer again), `InvalidData` if the body is not
    /// what was written, or the I/O error.
    pub(crate) fn read(&self, pointer: &Pointer) -> io::Result<Vec<u8>> {
        let open = {
            let state = self.lock();
            let Some(segment) = state.segments.get(&pointer.segment) else {
                return Err(io::Error::new(io::ErrorKind::NotFound, "body segment is gone"));
            };
            if pointer.end() > segment.size {
                return Err(invalid("a body pointer past its segment's end"));
            }
            if pointer.segment == state.active {
                Some(Arc::clone(&state.writer))
            } else {
                state.readers.get(&pointer.segment).cloned()
            }
        };
        let file = match open {
            Some(file) => file,
            None => {
                // Opened outside the lock; a segment unlinked meanwhile is NotFound.
                let file = Arc::new(File::open(segment_path(&self.dir, pointer.segment))?);
                let mut state = self.lock();
                // Open files are bounded, whatever the number of segments.
                if state.readers.len() >= MAX_READERS {
                    state.readers.clear();
                }
                if state.segments.contains_key(&pointer.segment) {
                    state.readers.insert(pointer.segment, Arc::clone(&file));
                }
                file
            }
        };
        let mut body = vec![0; pointer.len as usize];
        file.read_exact_at(&mut body, pointer.offset)?;
        if crc32fast::hash(&body) != pointer.crc {
            return Err(invalid("a stored body fails its CRC"));
        }
        Ok(body)
    }

    /// The body `pointer` names is no longer live (its message was deleted,
    /// or a compaction moved it, or it was never named in sled).
    pub(crate) fn release(&self, pointer: &Pointer) {
        let mut state = self.lock();
        let active = state.active;
        let Some(segment) = state.segments.get_mut(&pointer.segment) else {
            return;
        };
        segment.live = segment.live.saturating_sub(1);
        segment.live_octets = segment.live_octets.saturating_sub(u64::from(pointer.len));
        if segment.live == 0 && pointer.segment != active {
            state.doomed.push(pointer.segment);
        }
    }

    /// The sealed segments with no live body left: unlink them with
    /// [`Bodies::reap`] after a flush that starts after this call.
    pub(crate) fn take_doomed(&self) -> Vec<u64> {
        std::mem::take(&mut self.lock().doomed)
    }

    /// After the flush: unlinks `doomed` if it succeeded, keeps them for the
    /// next one if not.
    pub(crate) fn reap(&self, doomed: Vec<u64>, flushed: bool) {
        if doomed.is_empty() {
            return;
        }
        let gone: Vec<u64> = {
            let mut state = self.lock();
            if !flushed {
                state.doomed.extend(doomed);
                return;
            }
            // Named twice, or already gone: only what is still empty goes.
            doomed
                .into_iter()
                .filter(|id| {
                    let empty = state.segments.get(id).is_some_and(|s| s.live == 0 && s.sealed.is_some());
                    if empty {
                        state.segments.remove(id);
                        state.readers.remove(id);
                    }
                    empty
                })
                .collect()
        };
        for id in gone {
            if let Err(e) = std::fs::remove_file(segment_path(&self.dir, id)) {
                tracing::warn!("Cannot remove the empty body segment {id:016x}: {e}");
            }
        }
    }

    /// The sealed segments under a quarter live, sealed at least `grace`
    /// ago, that no compaction found unreadable: the ones to compact.
    pub(crate) fn sparse(&self) -> HashSet<u64> {
        let state = self.lock();
        state
            .segments
            .iter()
            .filter(|(_, s)| {
                s.live > 0
                    && !s.stuck
                    && s.live_octets.saturating_mul(4) < s.size
                    && s.sealed.is_some_and(|at| at.elapsed() >= self.grace)
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// A compaction could not read a body of `segment`: it is left as it is.
    pub(crate) fn stuck(&self, segment: u64) {
        if let Some(s) = self.lock().segments.get_mut(&segment) {
            s.stuck = true;
        }
    }

    /// Octets of segments on disk, and of live bodies in them.
    #[cfg(test)]
    pub(crate) fn usage(&self) -> (u64, u64) {
        let state = self.lock();
        state.segments.values().fold((0, 0), |(size, live), s| (size + s.size, live + s.live_octets))
    }
}
