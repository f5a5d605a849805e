//! The server store's log: every stored message's body, written once, and
//! every deletion, appended to segment files beside sled.
//!
//! A record is a put (a message's key, its sender and its body), a move (a
//! compaction's copy of a put, applied again only to a message that is
//! still there) or a delete (a key). sled keeps, per message, a pointer to its put record
//! (segment, offset, body length, the record's CRC-32). A message is
//! acknowledged once its record is synced: the log is the write-ahead log
//! of the `messages` tree, which sled writes to disk in its own time. So
//! storing or deleting a message costs one fdatasync (of the log), not two.
//!
//! Invariants:
//! - Records are appended only to the active segment, whose number is higher
//!   than every other segment's. A new one is started at every open and
//!   when the active one would pass its size limit; the old one is
//!   fdatasynced first and the directory fsynced after the new one is
//!   created. At open, the highest segment found is cut after its last
//!   whole record and fdatasynced before the new one is created. So every
//!   segment but the active one is durable and whole.
//! - The checkpoint, kept in sled, is a position in the log before which
//!   every record is synced and its change to the `messages` tree was made
//!   before the sled flush that wrote the checkpoint. Every record's change
//!   is made after the record is appended (a failed append changes
//!   nothing), so a record is "in flight" from its append until its change
//!   is made. At open, the highest segment is first cut after its last
//!   whole record and synced (a crash cut it; nothing after that point was
//!   synced, so nothing after it was acknowledged), then the records after
//!   the checkpoint are applied again in log order (a put inserts its
//!   pointer, a move does so only if the key is there, a delete removes
//!   its key: idempotent).
//! - The active segment is written ahead with zeros (a zero octet is no
//!   record's kind), so that a sync overwrites blocks the file has and
//!   commits no new size; a segment is cut back to its last record before
//!   the fdatasync that seals it, so every sealed segment is whole to its
//!   end.
//! - A failed write of a record or fdatasync poisons the log (the record's
//!   octets are made zeros again first): every later append and sync fails
//!   until the process starts again (after an I/O error Linux may mark the
//!   pages clean, and a second fdatasync would report a success it did not
//!   have), as sled refuses writes after its first I/O error.
//! - A pointer that sled wrote before its record was synced names a record
//!   of the highest segment that is not whole, or is past its end: such a
//!   message was never acknowledged and [`Opening::holds`] refuses it. A
//!   pointer into a lower segment that is missing or too short is damage,
//!   not a crash: opening fails with the segment named, rather than drop
//!   acknowledged messages (a database restored without its `bodies/`).
//! - Each segment's live puts are counted in memory, rebuilt at open. A
//!   sealed segment with none left is unlinked once a sync that started
//!   after its last put was released has ended ([`Bodies::take_doomed`],
//!   [`Bodies::reap`]), and only if it lies wholly before the checkpoint
//!   (its delete records are not needed again). A sealed segment less than
//!   a quarter live, sealed at least `grace` ago, is compacted by the
//!   store: its live bodies are appended again as moves, synced, and only
//!   then their pointers moved by compare-and-swap (a message deleted
//!   meanwhile keeps its deletion: its move is not applied at open, whatever
//!   the order of the two records). So the segments on disk
//!   hold at most about four times the live octets, plus the active
//!   segment and those still in their grace or after the checkpoint.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The active segment is written ahead with zeros this far at a time, so
/// that a sync overwrites blocks the file has and commits no new size (a
/// commit of the file system's journal) but once per step.
const AHEAD: u64 = 1 << 20;

/// Sealed segments kept open for reading at most.
const MAX_READERS: usize = 64;

/// A record's header: kind, key, sender, body length, CRC-32 of the rest
/// of the header and the body.
pub(crate) const HEADER: usize = 1 + 40 + 32 + 4 + 4;
const PUT: u8 = 1;
const DELETE: u8 = 2;
/// A compaction's copy of a put: applied at replay only to a key present.
const MOVE: u8 = 3;

/// A message's key in sled: owner fingerprint and sequence number.
pub(crate) type Key = [u8; 40];

/// A position in the log: segment, offset.
pub(crate) type Position = (u64, u64);

/// Where a put record is: 24 octets in sled.
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

    /// Octets of its record.
    fn octets(&self) -> u64 {
        HEADER as u64 + u64::from(self.len)
    }

    fn end(&self) -> u64 {
        self.offset.saturating_add(self.octets())
    }
}

/// Where the CRC-32 is in a header: it covers the octets before it and the body.
const CRC_AT: usize = HEADER - 4;

/// A record's header, encoded, with the CRC over it and `body` (of `len` octets).
fn header(kind: u8, key: &Key, sender: &[u8; 32], len: u32, body: &[u8]) -> ([u8; HEADER], u32) {
    let mut h = [0u8; HEADER];
    h[0] = kind;
    h[1..41].copy_from_slice(key);
    h[41..73].copy_from_slice(sender);
    h[73..CRC_AT].copy_from_slice(&len.to_be_bytes());
    let crc = record_crc(&h, body);
    h[CRC_AT..].copy_from_slice(&crc.to_be_bytes());
    (h, crc)
}

/// The CRC-32 of a record: of its header up to the CRC, and of its body.
fn record_crc(h: &[u8], body: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[..CRC_AT]);
    crc.update(body);
    crc.finalize()
}

/// The body length a header gives.
fn body_len(h: &[u8; HEADER]) -> u32 {
    u32::from_be_bytes([h[73], h[74], h[75], h[76]])
}

/// The CRC-32 a header gives.
fn stored_crc(h: &[u8]) -> u32 {
    u32::from_be_bytes([h[CRC_AT], h[CRC_AT + 1], h[CRC_AT + 2], h[CRC_AT + 3]])
}

/// A record read back during replay.
pub(crate) enum Record {
    /// A message stored: its key, sender, and where its record is.
    Put { key: Key, sender: [u8; 32], pointer: Pointer },
    /// A message's body copied by a compaction: applied only if the key is there.
    Move { key: Key, sender: [u8; 32], pointer: Pointer },
    /// A message deleted.
    Delete { key: Key },
}

#[derive(Debug, Default)]
struct Segment {
    /// Octets appended.
    size: u64,
    /// Puts that pointers in sled name.
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
    /// Everything before this is synced.
    synced: Position,
    /// Records appended whose change to sled is not made yet.
    in_flight: BTreeSet<Position>,
    /// The checkpoint last written durably to sled.
    checkpoint: Position,
    segments: BTreeMap<u64, Segment>,
    readers: HashMap<u64, Arc<File>>,
    /// Sealed segments with no live put left, to unlink after a sync.
    doomed: Vec<u64>,
    /// A sync failed: every later append and sync fails.
    failed: bool,
    /// Octets of the active segment's file, zeros after its records.
    ahead: u64,
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
    dir.join(format!("{id:016x}.log"))
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn poisoned() -> io::Error {
    io::Error::other("an fdatasync of the message log failed; no more writes until the server starts again")
}

/// Encodes a checkpoint for sled.
pub(crate) fn encode_position(p: Position) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&p.0.to_be_bytes());
    out[8..].copy_from_slice(&p.1.to_be_bytes());
    out
}

/// Decodes a checkpoint from sled.
pub(crate) fn decode_position(bytes: &[u8]) -> Option<Position> {
    let bytes: &[u8; 16] = bytes.try_into().ok()?;
    let (segment, offset) = bytes.split_at(8);
    Some((u64::from_be_bytes(segment.try_into().ok()?), u64::from_be_bytes(offset.try_into().ok()?)))
}

/// The segments found on disk at open, before the store has replayed them
/// and counted which puts are live.
pub(crate) struct Opening {
    dir: PathBuf,
    /// Segment number -> its length on disk (the highest's cut to its last
    /// whole record by [`Opening::replay`]).
    found: BTreeMap<u64, u64>,
    /// Offset -> CRC of every whole record of the highest segment.
    top_records: HashMap<u64, u32>,
    /// [`Opening::cut_top`] cut the highest segment and made it durable.
    top_durable: bool,
    live: BTreeMap<u64, Segment>,
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
            if name.to_str().is_some_and(|n| n.ends_with(".body")) {
                return Err(invalid(format!(
                    "{} holds message bodies written by a development version (0c1d1da to e94ebea) that this \
                     one does not read",
                    dir.display()
                )));
            }
            let Some(id) =
                name.to_str().and_then(|n| n.strip_suffix(".log")).and_then(|n| u64::from_str_radix(n, 16).ok())
            else {
                continue;
            };
            found.insert(id, entry.metadata()?.len());
        }
        Ok(Self { dir: dir.to_owned(), found, top_records: HashMap::new(), top_durable: false, live: BTreeMap::new() })
    }

    fn top(&self) -> Option<u64> {
        self.found.keys().next_back().copied()
    }

    /// Reads every record from `from` on, in log order, and hands each to
    /// `apply`. The highest segment is read whole (to find where its whole
    /// records end; it is cut there) and its records before `from` are not
    /// handed on.
    ///
    /// # Errors
    /// I/O errors, `InvalidData` for a record that is not whole in a
    /// segment other than the highest (damage), and `apply`'s errors.
    pub(crate) fn replay(&mut self, from: Position, mut apply: impl FnMut(Record) -> io::Result<()>) -> io::Result<()> {
        self.cut_top()?;
        let top = self.top();
        let ids: Vec<u64> = self.found.keys().copied().filter(|id| *id >= from.0).collect();
        // Segments from the checkpoint's on are never unlinked: a gap is damage.
        if from.0 > 0 || !ids.is_empty() {
            let first = if from.0 > 0 { from.0 } else { ids.first().copied().unwrap_or(0) };
            let last = top.unwrap_or(first).max(first);
            if let Some(missing) = (first..=last).find(|id| !self.found.contains_key(id)) {
                return Err(invalid(format!(
                    "{} is missing, and records in it are needed again",
                    segment_path(&self.dir, missing).display()
                )));
            }
        }
        for id in ids {
            let path = segment_path(&self.dir, id);
            let size = self.found.get(&id).copied().unwrap_or(0);
            let mut reader = io::BufReader::with_capacity(1 << 20, File::open(&path)?);
            let mut offset = 0u64;
            let start = if id == from.0 { from.1 } else { 0 };
            loop {
                if offset == size {
                    break;
                }
                let whole = read_record(&mut reader, size - offset)?;
                // The highest segment is cut after its last whole record:
                // a record that is not whole here is damage.
                let Some((h, body_len, crc)) = whole else {
                    return Err(invalid(format!("{} has a damaged record at octet {offset}", path.display())));
                };
                let pointer = Pointer { segment: id, offset, len: body_len, crc };
                if offset >= start {
                    let mut key = [0u8; 40];
                    key.copy_from_slice(&h[1..41]);
                    let mut sender = [0u8; 32];
                    sender.copy_from_slice(&h[41..73]);
                    match h[0] {
                        PUT => apply(Record::Put { key, sender, pointer })?,
                        MOVE => apply(Record::Move { key, sender, pointer })?,
                        _ => apply(Record::Delete { key })?,
                    }
                }
                offset = pointer.end();
            }
        }
        Ok(())
    }

    /// Finds where the highest segment's whole records end, cuts it there
    /// and makes it durable, before any record is applied: a change to sled
    /// made from a record that was only in the page cache (a killed
    /// process's) could be written by sled and outlive the record at a
    /// power cut. Nothing after the first record that is not whole was
    /// synced (an fdatasync that covered a later record covered it too), so
    /// nothing after it was acknowledged.
    fn cut_top(&mut self) -> io::Result<()> {
        let Some((&top, &size)) = self.found.iter().next_back() else {
            return Ok(());
        };
        let path = segment_path(&self.dir, top);
        let mut reader = io::BufReader::with_capacity(1 << 20, File::open(&path)?);
        let mut offset = 0u64;
        while offset < size {
            let Some((_, len, crc)) = read_record(&mut reader, size - offset)? else {
                break;
            };
            self.top_records.insert(offset, crc);
            offset += HEADER as u64 + u64::from(len);
        }
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path)?;
        if offset < size {
            if tail_is_zeros(&file, offset, size)? {
                tracing::debug!("The message log {} ends with zeros written ahead: cut.", path.display());
            } else {
                tracing::info!(
                    "The message log {} ends at octet {offset} of {size} with a record cut off by a crash \
                     (never acknowledged): cut there.",
                    path.display()
                );
            }
            file.set_len(offset)?;
            self.found.insert(top, offset);
        }
        file.sync_data()?;
        self.top_durable = true;
        Ok(())
    }

    /// Whether the put `pointer` names is there; if so it is counted live.
    /// In the highest segment it must be one of the whole records
    /// [`Opening::replay`] read (`false` if not: a message never
    /// acknowledged); in the others only its extent is checked.
    ///
    /// # Errors
    /// `InvalidData` if a pointer names a segment that is not there or a
    /// record past the end of one that is not the highest: damage that
    /// opening must not paper over.
    pub(crate) fn holds(&mut self, pointer: &Pointer) -> io::Result<bool> {
        let top = self.top();
        let Some(&size) = self.found.get(&pointer.segment) else {
            return Err(invalid(format!(
                "a stored message is in {}, which is not there (was {} moved, or the database restored \
                 without it?)",
                segment_path(&self.dir, pointer.segment).display(),
                self.dir.display()
            )));
        };
        if top == Some(pointer.segment) {
            if self.top_records.get(&pointer.offset) != Some(&pointer.crc) {
                return Ok(false);
            }
        } else if pointer.end() > size {
            return Err(invalid(format!(
                "{} is cut short: it ends at octet {size}, a stored message at {}",
                segment_path(&self.dir, pointer.segment).display(),
                pointer.end()
            )));
        }
        let segment = self.live.entry(pointer.segment).or_default();
        segment.size = size;
        segment.live += 1;
        segment.live_octets += pointer.octets();
        Ok(true)
    }

    /// Makes the highest segment durable and starts a new active segment
    /// above every segment found; the segments no live put is in are
    /// doomed, to go once the checkpoint passes them. Call it only once the
    /// pointers [`Opening::holds`] refused are removed from sled and the
    /// replayed changes are flushed; then write the returned log's
    /// [`Bodies::start_position`] as the checkpoint, flush, and tell the log
    /// ([`Bodies::checkpointed`]).
    ///
    /// # Errors
    /// If a segment cannot be synced or the new one created.
    pub(crate) fn start(self, from: Position, limit: u64, grace: Duration) -> io::Result<Bodies> {
        let top = self.top();
        if let (Some(top), false) = (top, self.top_durable) {
            // A crashed process's last records may be in the page cache
            // only; from now on a higher segment exists, so this one must be
            // durable (replay's cut made it so already).
            std::fs::OpenOptions::new().write(true).open(segment_path(&self.dir, top))?.sync_data()?;
        }
        let active = top.map_or(1, |top| top + 1);
        let now = Instant::now();
        let mut segments = self.live;
        let mut doomed = Vec::new();
        for (id, size) in &self.found {
            let segment = segments.entry(*id).or_insert_with(|| {
                doomed.push(*id);
                Segment { size: *size, ..Segment::default() }
            });
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
                synced: (active, 0),
                in_flight: BTreeSet::new(),
                checkpoint: from,
                segments,
                readers: HashMap::new(),
                doomed,
                failed: false,
                ahead: 0,
            }),
            syncing: Mutex::new(()),
            #[cfg(test)]
            sync_fails: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

/// Reads one record from `reader`, at most `left` octets: its header, body
/// length and CRC if it is whole (`None` if not: cut, or not what was written).
fn read_record(reader: &mut impl Read, left: u64) -> io::Result<Option<([u8; HEADER], u32, u32)>> {
    if left < HEADER as u64 {
        return Ok(None);
    }
    let mut h = [0u8; HEADER];
    reader.read_exact(&mut h)?;
    let len = body_len(&h);
    if !matches!(h[0], PUT | MOVE | DELETE) || u64::from(len) > left - HEADER as u64 || (h[0] == DELETE && len != 0) {
        return Ok(None);
    }
    let mut body = vec![0u8; len as usize];
    reader.read_exact(&mut body)?;
    let crc = record_crc(&h, &body);
    if crc != stored_crc(&h) {
        return Ok(None);
    }
    Ok(Some((h, len, crc)))
}

/// Whether `from..to` of `file` holds only zeros.
fn tail_is_zeros(file: &File, from: u64, to: u64) -> io::Result<bool> {
    let mut buf = vec![0u8; 64 << 10];
    let mut at = from;
    while at < to {
        let n = usize::try_from((to - at).min(buf.len() as u64)).unwrap_or(buf.len());
        file.read_exact_at(&mut buf[..n], at)?;
        if buf[..n].iter().any(|b| *b != 0) {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

/// Writes zeros over `from..to` of `file`.
fn write_zeros(file: &File, from: u64, to: u64) -> io::Result<()> {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    let mut at = from;
    while at < to {
        let n = usize::try_from((to - at).min(ZEROS.len() as u64)).unwrap_or(ZEROS.len());
        file.write_all_at(&ZEROS[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

impl Drop for Bodies {
    /// A log closed cleanly ends with its last record (the next open would
    /// cut the zeros written ahead too).
    fn drop(&mut self) {
        let state = self.lock();
        if let (false, Some(active)) = (state.failed, state.segments.get(&state.active)) {
            let _ = state.writer.set_len(active.size);
        }
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

    /// Where the active segment starts: the checkpoint right after open.
    pub(crate) fn start_position(&self) -> Position {
        (self.lock().active, 0)
    }

    /// Appends a record (not yet durable: see [`Bodies::sync`]).
    fn append(&self, kind: u8, key: &Key, sender: &[u8; 32], body: &[u8]) -> io::Result<Pointer> {
        let len = u32::try_from(body.len()).map_err(|_| invalid("a body over 4 GiB"))?;
        let (h, crc) = header(kind, key, sender, len, body);
        let octets = HEADER as u64 + u64::from(len);
        let mut state = self.lock();
        if state.failed {
            return Err(poisoned());
        }
        let size = state.segments.get(&state.active).map_or(0, |s| s.size);
        let size = if size > 0 && size.saturating_add(octets) > self.limit {
            self.rotate(&mut state).inspect_err(|_| state.failed = true)?;
            0
        } else {
            size
        };
        let end = size + octets;
        if end > state.ahead {
            let to = end.max(state.ahead.saturating_add(AHEAD).min(self.limit));
            // A failed write here (a full disk) fails this append only:
            // zeros past `ahead` do no harm, and no record was touched.
            write_zeros(&state.writer, state.ahead, to)?;
            state.ahead = to;
        }
        let mut record = Vec::with_capacity(HEADER + body.len());
        record.extend_from_slice(&h);
        record.extend_from_slice(body);
        if let Err(e) = state.writer.write_all_at(&record, size) {
            // What part of it was written is made zeros again, so that no
            // later record is read after garbage; and the log takes no more.
            let _ = write_zeros(&state.writer, size, end);
            state.failed = true;
            return Err(e);
        }
        state.dirty = true;
        let pointer = Pointer { segment: state.active, offset: size, len, crc };
        let active = state.active;
        let segment = state.segments.entry(active).or_default();
        segment.size = pointer.end();
        if kind != DELETE {
            segment.live += 1;
            segment.live_octets += octets;
        }
        state.in_flight.insert((active, size));
        Ok(pointer)
    }

    /// Appends a put: `body` of the message `key` from `sender`, counted
    /// live, in flight until [`Bodies::applied`].
    ///
    /// # Errors
    /// If the write, or starting a new segment, fails.
    pub(crate) fn put(&self, key: &Key, sender: &[u8; 32], body: &[u8]) -> io::Result<Pointer> {
        self.append(PUT, key, sender, body)
    }

    /// Appends a compaction's copy of the put of `key` (a move), counted
    /// live, in flight until [`Bodies::applied`].
    ///
    /// # Errors
    /// As [`Bodies::put`].
    pub(crate) fn moved(&self, key: &Key, sender: &[u8; 32], body: &[u8]) -> io::Result<Pointer> {
        self.append(MOVE, key, sender, body)
    }

    /// Appends a delete of `key`, in flight until [`Bodies::applied`]: the
    /// caller removes the key from sled after this, so that a failed append
    /// changes nothing.
    ///
    /// # Errors
    /// If the write, or starting a new segment, fails.
    pub(crate) fn delete(&self, key: &Key) -> io::Result<Pointer> {
        self.append(DELETE, key, &[0; 32], &[])
    }

    /// The record `pointer` names has its change made in sled (or never will).
    pub(crate) fn applied(&self, pointer: &Pointer) {
        self.lock().in_flight.remove(&(pointer.segment, pointer.offset));
    }

    /// Seals the active segment (durable in full first) and starts the next.
    fn rotate(&self, state: &mut State) -> io::Result<()> {
        // Cut the zeros written ahead: a sealed segment ends with its last record.
        let size = state.segments.get(&state.active).map(|s| s.size).ok_or_else(|| invalid("no active segment"))?;
        state.writer.set_len(size)?;
        // Always, even if `sync` just cleared `dirty`: its fdatasync may still
        // be running, and the segment must be durable before a higher one exists.
        state.writer.sync_data()?;
        let next = state.active + 1;
        let writer = create_segment(&self.dir, next)?;
        let old = std::mem::replace(&mut state.active, next);
        state.writer = Arc::new(writer);
        state.ahead = 0;
        state.dirty = false;
        // Every segment below `next` is durable now.
        state.synced = state.synced.max((next, 0));
        if let Some(segment) = state.segments.get_mut(&old) {
            segment.sealed = Some(Instant::now());
            if segment.live == 0 {
                state.doomed.push(old);
            }
        }
        state.segments.insert(next, Segment::default());
        Ok(())
    }

    /// Makes every record appended so far durable.
    ///
    /// # Errors
    /// If the fdatasync fails.
    pub(crate) fn sync(&self) -> io::Result<()> {
        let _one_at_a_time = self.syncing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (writer, end) = {
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
            let end = (state.active, state.segments.get(&state.active).map_or(0, |s| s.size));
            (Arc::clone(&state.writer), end)
        };
        match writer.sync_data() {
            Ok(()) => {
                let mut state = self.lock();
                state.synced = state.synced.max(end);
                Ok(())
            }
            Err(e) => {
                self.lock().failed = true;
                Err(e)
            }
        }
    }

    /// Makes the next sync fail as a failed fdatasync does (a fault that
    /// cannot be made on a healthy disk): appends still succeed until then.
    #[cfg(test)]
    pub(crate) fn fail_the_next_sync(&self) {
        self.sync_fails.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// A position every record before which is synced and applied to sled:
    /// written to sled before a flush, it is the checkpoint once the flush ends.
    pub(crate) fn checkpoint_candidate(&self) -> Position {
        let state = self.lock();
        let first_in_flight = state.in_flight.first().copied().unwrap_or(state.synced);
        first_in_flight.min(state.synced)
    }

    /// A flush wrote `checkpoint` durably.
    pub(crate) fn checkpointed(&self, checkpoint: Position) {
        let mut state = self.lock();
        state.checkpoint = state.checkpoint.max(checkpoint);
    }

    /// Reads the body the put `pointer` names and checks its record.
    ///
    /// # Errors
    /// `NotFound` if its segment is gone (unlinked after a compaction moved
    /// the body: read its pointer again), `InvalidData` if the record is not
    /// what was written or is not the put of `key`, or the I/O error.
    pub(crate) fn read(&self, key: &[u8], pointer: &Pointer) -> io::Result<Vec<u8>> {
        let open = {
            let state = self.lock();
            let Some(segment) = state.segments.get(&pointer.segment) else {
                return Err(io::Error::new(io::ErrorKind::NotFound, "log segment is gone"));
            };
            if pointer.end() > segment.size {
                return Err(invalid("a pointer past its log segment's end"));
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
        let mut record = vec![0; HEADER + pointer.len as usize];
        file.read_exact_at(&mut record, pointer.offset)?;
        let crc = stored_crc(&record);
        if !matches!(record[0], PUT | MOVE)
            || &record[1..41] != key
            || crc != pointer.crc
            || record_crc(&record, &record[HEADER..]) != crc
        {
            return Err(invalid("a stored message's record is not what was written"));
        }
        Ok(record.split_off(HEADER))
    }

    /// The put `pointer` names is no longer live (its message was deleted,
    /// or a compaction moved it, or it was never named in sled).
    pub(crate) fn release(&self, pointer: &Pointer) {
        let mut state = self.lock();
        let active = state.active;
        let Some(segment) = state.segments.get_mut(&pointer.segment) else {
            return;
        };
        segment.live = segment.live.saturating_sub(1);
        segment.live_octets = segment.live_octets.saturating_sub(pointer.octets());
        if segment.live == 0 && pointer.segment != active {
            state.doomed.push(pointer.segment);
        }
    }

    /// The sealed segments with no live put left: unlink them with
    /// [`Bodies::reap`] after a sync that starts after this call.
    pub(crate) fn take_doomed(&self) -> Vec<u64> {
        std::mem::take(&mut self.lock().doomed)
    }

    /// After the sync: unlinks those of `doomed` wholly before the
    /// checkpoint if it succeeded, keeps the rest for a later one.
    pub(crate) fn reap(&self, doomed: Vec<u64>, synced: bool) {
        if doomed.is_empty() {
            return;
        }
        let gone: Vec<u64> = {
            let mut state = self.lock();
            if !synced {
                state.doomed.extend(doomed);
                return;
            }
            let checkpoint = state.checkpoint.0;
            let mut gone = Vec::new();
            for id in doomed {
                // Named twice, or already gone: only what is still empty goes.
                let empty = state.segments.get(&id).is_some_and(|s| s.live == 0 && s.sealed.is_some());
                if !empty {
                    continue;
                }
                if id >= checkpoint {
                    // Its deletes may be replayed yet.
                    state.doomed.push(id);
                    continue;
                }
                state.segments.remove(&id);
                state.readers.remove(&id);
                gone.push(id);
            }
            gone
        };
        for id in gone {
            if let Err(e) = std::fs::remove_file(segment_path(&self.dir, id)) {
                tracing::warn!("Cannot remove the empty log segment {id:016x}: {e}");
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

    /// Octets of segments on disk (zeros written ahead too), and of live
    /// puts in them.
    #[cfg(test)]
    pub(crate) fn usage(&self) -> (u64, u64) {
        let state = self.lock();
        let (size, live) =
            state.segments.values().fold((0, 0), |(size, live), s| (size + s.size, live + s.live_octets));
        let active = state.segments.get(&state.active).map_or(0, |s| s.size);
        (size + state.ahead.saturating_sub(active), live)
    }
}
