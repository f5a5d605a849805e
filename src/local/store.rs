//! The person's mail store: a Maildir (so any other tool can read it) and an
//! index in sled that gives each folder its UIDVALIDITY, once, and each
//! message its UID, once.
//!
//! Layout under the data folder:
//! - `Maildir/` is INBOX; every other folder is `Maildir/.NAME` (Maildir++),
//!   with `/` in the name written as `.` and anything but `[A-Za-z0-9 _-]`
//!   written as `%XX`;
//! - each message file is `cur/BASE:2,FLAGS`, its standard flags in the
//!   name as Maildir says, renamed when they change;
//! - `index/` (sled) maps folder names to their metadata and, per folder,
//!   UIDs to entries (file base name, flags, arrival time, size).
//!
//! A message is written and fsynced, then renamed into `cur/`, then indexed
//! and the index flushed, before any write returns: what a write returned is
//! on disk. Every write takes one lock, so UIDs are handed out in order.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The folders every store has, with their special use (RFC 6154).
pub const STANDARD: [(&str, Option<&str>); 5] = [
    ("INBOX", None),
    ("Sent", Some("\\Sent")),
    ("Drafts", Some("\\Drafts")),
    ("Trash", Some("\\Trash")),
    ("Archive", Some("\\Archive")),
];

/// At most this many folders.
pub const MAX_FOLDERS: usize = 1000;
/// A folder name is at most this many octets.
pub const MAX_NAME: usize = 200;
/// At most this many keywords on one message, each at most 64 octets.
pub const MAX_KEYWORDS: usize = 32;

/// The system flags, as bits.
pub mod flag {
    pub const SEEN: u8 = 1;
    pub const ANSWERED: u8 = 2;
    pub const FLAGGED: u8 = 4;
    pub const DELETED: u8 = 8;
    pub const DRAFT: u8 = 16;
}

/// A message's flags: the system flags and keywords.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flags {
    pub system: u8,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keywords: Vec<String>,
}

impl Flags {
    pub fn has(&self, bit: u8) -> bool {
        self.system & bit != 0
    }

    /// Maildir's info letters for these flags, in ASCII order.
    fn maildir_letters(&self) -> String {
        let mut s = String::new();
        for (bit, c) in
            [(flag::DRAFT, 'D'), (flag::FLAGGED, 'F'), (flag::ANSWERED, 'R'), (flag::SEEN, 'S'), (flag::DELETED, 'T')]
        {
            if self.has(bit) {
                s.push(c);
            }
        }
        s
    }

    /// Adds `other`'s flags (keywords bounded).
    pub fn add(&mut self, other: &Flags) {
        self.system |= other.system;
        for k in &other.keywords {
            if !self.keywords.iter().any(|x| x.eq_ignore_ascii_case(k)) && self.keywords.len() < MAX_KEYWORDS {
                self.keywords.push(k.clone());
            }
        }
    }

    pub fn remove(&mut self, other: &Flags) {
        self.system &= !other.system;
        self.keywords.retain(|x| !other.keywords.iter().any(|k| k.eq_ignore_ascii_case(x)));
    }
}

/// A folder's metadata.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Folder {
    /// UIDVALIDITY: set when the folder is created, never changed.
    pub validity: u32,
    /// The UID the next message gets.
    pub next_uid: u32,
    pub subscribed: bool,
    /// The special use, e.g. `\Sent`.
    pub special: Option<String>,
    /// The Maildir subfolder ("" for INBOX).
    pub dir: String,
}

/// One message in a folder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The file's base name (before `:2,`).
    pub file: String,
    pub flags: Flags,
    /// Arrival (INTERNALDATE), seconds since the epoch.
    pub date: i64,
    pub size: u64,
}

impl Entry {
    fn file_name(&self) -> String {
        format!("{}:2,{}", self.file, self.flags.maildir_letters())
    }
}

pub struct Store {
    maildir: PathBuf,
    db: sled::Db,
    folders: sled::Tree,
    /// Digests of messages taken off the network, so a redelivery after a
    /// crash between storing and acknowledging is stored once.
    taken: sled::Tree,
    lock: Mutex<()>,
    changed: tokio::sync::watch::Sender<u64>,
    host: String,
}

fn now_s() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Where a message's file is: its name by the index, or, if another tool
/// (or a crash between a rename and the index) changed its flags part, the
/// file in `cur/` with the same base name.
fn locate(cur: &Path, entry: &Entry) -> PathBuf {
    let path = cur.join(entry.file_name());
    if path.exists() {
        return path;
    }
    let prefix = format!("{}:2,", entry.file);
    std::fs::read_dir(cur)
        .ok()
        .and_then(|rd| {
            rd.filter_map(std::result::Result::ok)
                .find(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(&prefix)))
                .map(|e| e.path())
        })
        .unwrap_or(path)
}

/// A message's header block (with the empty line that ends it) from its
/// file, read only as far as it goes, or the whole file if it has no body.
fn read_header_at(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read as _;
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = file.read(&mut chunk).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            return Ok(out);
        }
        let from = out.len().saturating_sub(3);
        out.extend_from_slice(&chunk[..n]);
        if out.starts_with(b"\r\n") || out.starts_with(b"\n") {
            return Ok(out);
        }
        let tail = &out[from..];
        if let Some(i) = tail.windows(4).position(|w| w == b"\r\n\r\n") {
            out.truncate(from + i + 4);
            return Ok(out);
        }
        if let Some(i) = tail.windows(2).position(|w| w == b"\n\n") {
            out.truncate(from + i + 2);
            return Ok(out);
        }
    }
}

/// A message's octets from a folder's `cur/` by a (perhaps stale) entry.
///
/// # Errors
/// The file is gone or unreadable.
pub fn read_in(cur: &Path, entry: &Entry) -> Result<Vec<u8>> {
    let path = locate(cur, entry);
    std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))
}

/// A message's header block from a folder's `cur/` by a (perhaps stale) entry.
///
/// # Errors
/// The file is gone or unreadable.
pub fn read_header_in(cur: &Path, entry: &Entry) -> Result<Vec<u8>> {
    read_header_at(&locate(cur, entry))
}

fn fsync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("cannot sync {}", dir.display()))
}

/// The Maildir++ subfolder name of a folder.
fn dir_of(name: &str) -> String {
    if name.eq_ignore_ascii_case("INBOX") {
        return String::new();
    }
    let mut s = String::from(".");
    for b in name.bytes() {
        match b {
            b'/' => s.push('.'),
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b' ' | b'_' | b'-' => s.push(b as char),
            _ => s.push_str(&format!("%{b:02X}")),
        }
    }
    s
}

/// Checks a folder name a client gave (already in the wire's modified UTF-7).
pub fn valid_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME {
        bail!("a folder name is 1 to {MAX_NAME} octets");
    }
    if name.starts_with('/') || name.ends_with('/') || name.contains("//") {
        bail!("a folder name has no empty level");
    }
    if name.bytes().any(|b| b < 0x20 || b == 0x7f || b == b'*' || b == b'%') {
        bail!("a folder name has no control characters or wildcards");
    }
    Ok(())
}

/// The canonical name: INBOX in any case is INBOX.
pub fn canonical(name: &str) -> String {
    if name.eq_ignore_ascii_case("INBOX") {
        "INBOX".to_owned()
    } else {
        name.to_owned()
    }
}

impl Store {
    /// Opens (creating) the store under `data`.
    ///
    /// # Errors
    /// The folder cannot be made, or the index is locked by another process.
    pub fn open(data: &Path) -> Result<Self> {
        let maildir = data.join("Maildir");
        std::fs::create_dir_all(&maildir).with_context(|| format!("cannot create {}", maildir.display()))?;
        let index = data.join("index");
        // Flushed by hand after every change (so no timer: an idle bridge
        // uses no CPU), with a small cache (the index is small: 4 MiB).
        let db = sled::Config::new()
            .path(&index)
            .flush_every_ms(None)
            .cache_capacity(4 << 20)
            .open()
            .with_context(|| format!("cannot open {} (is another `local` running?)", index.display()))?;
        let folders = db.open_tree("folders")?;
        let taken = db.open_tree("taken")?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "localhost".into());
        let host = host.trim().replace(['/', ':', '.'], "_");
        let store = Store {
            maildir,
            db,
            folders,
            taken,
            lock: Mutex::new(()),
            changed: tokio::sync::watch::channel(0).0,
            host,
        };
        for (name, special) in STANDARD {
            if store.folder(name)?.is_none() {
                store.create_with(name, special)?;
            }
        }
        Ok(store)
    }

    /// A receiver that sees a new value after every change.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn folder(&self, name: &str) -> Result<Option<Folder>> {
        let name = canonical(name);
        match self.folders.get(name.as_bytes())? {
            Some(v) => Ok(Some(serde_json::from_slice(&v).context("a damaged folder record")?)),
            None => Ok(None),
        }
    }

    fn put_folder(&self, name: &str, f: &Folder) -> Result<()> {
        self.folders.insert(name.as_bytes(), serde_json::to_vec(f)?)?;
        Ok(())
    }

    /// All folders, by name.
    pub fn folders(&self) -> Result<BTreeMap<String, Folder>> {
        let mut all = BTreeMap::new();
        for kv in &self.folders {
            let (k, v) = kv?;
            all.insert(String::from_utf8_lossy(&k).into_owned(), serde_json::from_slice(&v)?);
        }
        Ok(all)
    }

    fn messages_tree(&self, f: &Folder) -> Result<sled::Tree> {
        Ok(self.db.open_tree(format!("m{}", f.validity))?)
    }

    fn folder_path(&self, f: &Folder) -> PathBuf {
        if f.dir.is_empty() {
            self.maildir.clone()
        } else {
            self.maildir.join(&f.dir)
        }
    }

    fn create_with(&self, name: &str, special: Option<&str>) -> Result<Folder> {
        let _g = self.guard();
        if self.folder(name)?.is_some() {
            bail!("the folder exists");
        }
        if self.folders.len() >= MAX_FOLDERS {
            bail!("too many folders (at most {MAX_FOLDERS})");
        }
        // UIDVALIDITY: the creation time in seconds, made larger than any
        // folder's yet (a folder deleted and made again in the same second
        // must not get its old value).
        let mut validity = u32::try_from(now_s()).unwrap_or(u32::MAX).max(1);
        for f in self.folders()?.values() {
            validity = validity.max(f.validity.saturating_add(1));
        }
        // Above every value ever handed out, deleted folders' too.
        let high = self.db.get(b"validity-high")?.and_then(|v| v.as_ref().try_into().ok()).map(u32::from_be_bytes);
        if let Some(high) = high {
            validity = validity.max(high.saturating_add(1));
        }
        self.db.insert(b"validity-high", &validity.to_be_bytes())?;
        // A directory of its own: never one that exists (left by a crash, a
        // renamed folder's, or the same name in another case on a
        // case-insensitive filesystem), so DELETE removes only its own mail.
        let base = dir_of(name);
        let mut dir = base.clone();
        if !base.is_empty() {
            for n in 0.. {
                if n > 0 {
                    dir = format!("{base}~{n}");
                }
                match std::fs::create_dir(self.maildir.join(&dir)) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => continue,
                    Err(e) => {
                        return Err(e).with_context(|| format!("cannot create {}", self.maildir.join(&dir).display()))
                    }
                }
            }
        }
        let f = Folder { validity, next_uid: 1, subscribed: true, special: special.map(str::to_owned), dir };
        let path = self.folder_path(&f);
        for sub in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(path.join(sub)).with_context(|| format!("cannot create {}", path.display()))?;
        }
        if !f.dir.is_empty() {
            std::fs::File::create(path.join("maildirfolder")).context("cannot mark the Maildir folder")?;
        }
        fsync_dir(&path)?;
        fsync_dir(&self.maildir)?;
        self.put_folder(&canonical(name), &f)?;
        self.db.flush()?;
        self.bump();
        Ok(f)
    }

    /// Creates a folder (and its missing parents, RFC 3501 6.3.3).
    ///
    /// # Errors
    /// A bad or existing name, too many folders, or a disk failure.
    pub fn create(&self, name: &str) -> Result<()> {
        valid_name(name)?;
        let mut prefix = String::new();
        let levels: Vec<&str> = name.split('/').collect();
        for (i, level) in levels.iter().enumerate() {
            if i > 0 {
                prefix.push('/');
            }
            prefix.push_str(level);
            if i + 1 < levels.len() {
                if self.folder(&prefix)?.is_none() {
                    self.create_with(&prefix, None)?;
                }
            } else {
                self.create_with(&prefix, None)?;
            }
        }
        Ok(())
    }

    /// Deletes a folder and its messages (not INBOX).
    ///
    /// # Errors
    /// INBOX, a missing folder, or a disk failure.
    pub fn delete(&self, name: &str) -> Result<()> {
        let name = canonical(name);
        if name == "INBOX" {
            bail!("INBOX cannot be deleted");
        }
        let _g = self.guard();
        let Some(f) = self.folder(&name)? else { bail!("no such folder") };
        let path = self.folder_path(&f);
        self.db.drop_tree(format!("m{}", f.validity))?;
        self.folders.remove(name.as_bytes())?;
        self.db.flush()?;
        if path.starts_with(&self.maildir) && path != self.maildir {
            std::fs::remove_dir_all(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
        self.bump();
        Ok(())
    }

    /// Renames a folder (and those under it). Renaming INBOX moves its
    /// messages into the new folder and leaves INBOX empty (RFC 3501 6.3.5).
    /// Only the index changes: a folder keeps the Maildir directory it was
    /// made with (one atomic index write, nothing half-renamed on disk).
    ///
    /// # Errors
    /// A missing source, an existing target, a bad name, or a disk failure.
    pub fn rename(&self, from: &str, to: &str) -> Result<()> {
        valid_name(to)?;
        let (from, to) = (canonical(from), canonical(to));
        if self.folder(&to)?.is_some() {
            bail!("the target folder exists");
        }
        if from == "INBOX" {
            self.create(&to)?;
            let uids: Vec<u32> = self.entries("INBOX")?.into_iter().map(|(u, _)| u).collect();
            self.copy("INBOX", &uids, &to)?;
            self.expunge("INBOX", &uids)?;
            return Ok(());
        }
        let _g = self.guard();
        if self.folder(&from)?.is_none() {
            bail!("no such folder");
        }
        let prefix = format!("{from}/");
        let mut moves = Vec::new();
        for (name, f) in self.folders()? {
            if name != from && !name.starts_with(&prefix) {
                continue;
            }
            let new_name = format!("{to}{}", &name[from.len()..]);
            valid_name(&new_name)?;
            moves.push((name, new_name, f));
        }
        let mut batch = sled::Batch::default();
        for (old, new, f) in &moves {
            batch.remove(old.as_bytes());
            batch.insert(new.as_bytes(), serde_json::to_vec(f)?);
        }
        self.folders.apply_batch(batch)?;
        self.db.flush()?;
        self.bump();
        Ok(())
    }

    pub fn subscribe(&self, name: &str, on: bool) -> Result<()> {
        let _g = self.guard();
        let Some(mut f) = self.folder(name)? else { bail!("no such folder") };
        f.subscribed = on;
        self.put_folder(&canonical(name), &f)?;
        self.db.flush()?;
        Ok(())
    }

    /// The messages of a folder, by UID.
    ///
    /// # Errors
    /// A missing folder or a damaged index.
    pub fn entries(&self, name: &str) -> Result<Vec<(u32, Entry)>> {
        let Some(f) = self.folder(name)? else { bail!("no such folder") };
        let tree = self.messages_tree(&f)?;
        let mut out = Vec::with_capacity(tree.len());
        for kv in &tree {
            let (k, v) = kv?;
            let uid = u32::from_be_bytes(k.as_ref().try_into().context("a damaged index key")?);
            out.push((uid, serde_json::from_slice(&v).context("a damaged index entry")?));
        }
        Ok(out)
    }

    /// A message's octets, exactly as stored.
    ///
    /// # Errors
    /// The message is gone, or the file cannot be read.
    pub fn read(&self, name: &str, uid: u32) -> Result<Vec<u8>> {
        let path = self.path_of(name, uid)?;
        std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))
    }

    /// The `cur/` directory of a folder, for [`read_in`] and [`read_header_in`].
    ///
    /// # Errors
    /// No such folder.
    pub fn cur(&self, name: &str) -> Result<PathBuf> {
        let Some(f) = self.folder(name)? else { bail!("no such folder") };
        Ok(self.folder_path(&f).join("cur"))
    }

    /// The file of a message, by its current index entry.
    fn path_of(&self, name: &str, uid: u32) -> Result<PathBuf> {
        let Some(f) = self.folder(name)? else { bail!("no such folder") };
        let Some(v) = self.messages_tree(&f)?.get(uid.to_be_bytes())? else { bail!("the message is gone") };
        let entry: Entry = serde_json::from_slice(&v).context("a damaged index entry")?;
        Ok(locate(&self.folder_path(&f).join("cur"), &entry))
    }

    /// Stores a message in a folder; returns (UIDVALIDITY, UID).
    ///
    /// # Errors
    /// A missing folder or a disk failure.
    pub fn append(&self, name: &str, message: &[u8], flags: Flags, date: Option<i64>) -> Result<(u32, u32)> {
        let _g = self.guard();
        let r = self.append_locked(name, message, flags, date)?;
        self.db.flush()?;
        self.bump();
        Ok(r)
    }

    fn unique(&self, f: &Folder, uid: u32) -> String {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        format!("{}.M{}V{}U{}.{}", now.as_secs(), now.subsec_micros(), f.validity, uid, self.host)
    }

    fn append_locked(&self, name: &str, message: &[u8], flags: Flags, date: Option<i64>) -> Result<(u32, u32)> {
        let name = canonical(name);
        let Some(mut f) = self.folder(&name)? else { bail!("no such folder") };
        let uid = f.next_uid;
        let entry =
            Entry { file: self.unique(&f, uid), flags, date: date.unwrap_or_else(now_s), size: message.len() as u64 };
        let dir = self.folder_path(&f);
        let tmp = dir.join("tmp").join(&entry.file);
        let mut file = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        file.write_all(message)
            .and_then(|()| file.sync_all())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        let cur = dir.join("cur");
        std::fs::rename(&tmp, cur.join(entry.file_name())).context("cannot move a message into cur/")?;
        fsync_dir(&cur)?;
        f.next_uid = uid.checked_add(1).context("the folder has run out of UIDs")?;
        self.messages_tree(&f)?.insert(uid.to_be_bytes(), serde_json::to_vec(&entry)?)?;
        self.put_folder(&name, &f)?;
        Ok((f.validity, uid))
    }

    /// Stores a message taken off the network into INBOX, once: a message
    /// with the same digest taken in the last week is not stored again.
    ///
    /// # Errors
    /// A disk failure.
    pub fn deliver(&self, message: &[u8]) -> Result<Option<u32>> {
        let digest = latssiam::Fingerprint::of(message).to_string();
        let _g = self.guard();
        if self.taken.contains_key(digest.as_bytes())? {
            return Ok(None);
        }
        let (_, uid) = self.append_locked("INBOX", message, Flags::default(), None)?;
        self.taken.insert(digest.as_bytes(), &now_s().to_be_bytes())?;
        // Forget digests older than a week, now and then (the check is only
        // for a redelivery right after a crash).
        let week = now_s() - 7 * 86_400;
        let sweep = if uid % 256 == 0 { self.taken.len() } else { 0 };
        for kv in self.taken.iter().take(sweep) {
            let (k, v) = kv?;
            if i64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])) < week {
                self.taken.remove(k)?;
            }
        }
        self.db.flush()?;
        drop(_g);
        self.bump();
        Ok(Some(uid))
    }

    /// Changes the flags of the given UIDs with `change`; returns the new
    /// flags of those that exist.
    ///
    /// # Errors
    /// A missing folder or a disk failure.
    pub fn set_flags(&self, name: &str, uids: &[u32], change: impl Fn(&mut Flags)) -> Result<Vec<(u32, Flags)>> {
        let _g = self.guard();
        let Some(f) = self.folder(name)? else { bail!("no such folder") };
        let tree = self.messages_tree(&f)?;
        let cur = self.folder_path(&f).join("cur");
        let mut out = Vec::with_capacity(uids.len());
        let mut renamed = false;
        for &uid in uids {
            let Some(v) = tree.get(uid.to_be_bytes())? else { continue };
            let mut entry: Entry = serde_json::from_slice(&v)?;
            let before = entry.file_name();
            change(&mut entry.flags);
            let after = entry.file_name();
            if before != after {
                std::fs::rename(locate(&cur, &entry), cur.join(&after))
                    .with_context(|| format!("cannot rename {before}"))?;
                renamed = true;
            }
            tree.insert(uid.to_be_bytes(), serde_json::to_vec(&entry)?)?;
            out.push((uid, entry.flags));
        }
        if renamed {
            fsync_dir(&cur)?;
        }
        self.db.flush()?;
        drop(_g);
        self.bump();
        Ok(out)
    }

    /// Copies messages into another folder (a hard link where it can);
    /// returns the pairs (source UID, new UID) and the target's UIDVALIDITY.
    ///
    /// # Errors
    /// A missing folder or a disk failure.
    pub fn copy(&self, from: &str, uids: &[u32], to: &str) -> Result<(u32, Vec<(u32, u32)>)> {
        let _g = self.guard();
        let Some(src) = self.folder(from)? else { bail!("no such folder") };
        let to = canonical(to);
        let Some(mut dst) = self.folder(&to)? else { bail!("no such folder") };
        let (stree, dtree) = (self.messages_tree(&src)?, self.messages_tree(&dst)?);
        let (scur, dcur) = (self.folder_path(&src).join("cur"), self.folder_path(&dst).join("cur"));
        let mut pairs = Vec::new();
        for &uid in uids {
            let Some(v) = stree.get(uid.to_be_bytes())? else { continue };
            let mut entry: Entry = serde_json::from_slice(&v)?;
            let source = locate(&scur, &entry);
            let new_uid = dst.next_uid;
            entry.file = self.unique(&dst, new_uid);
            let target = dcur.join(entry.file_name());
            if std::fs::hard_link(&source, &target).is_err() {
                let bytes = std::fs::read(&source).with_context(|| format!("cannot read {}", source.display()))?;
                let tmp = self.folder_path(&dst).join("tmp").join(&entry.file);
                let mut file = std::fs::File::create(&tmp)?;
                file.write_all(&bytes).and_then(|()| file.sync_all())?;
                std::fs::rename(&tmp, &target)?;
            }
            dst.next_uid = new_uid.checked_add(1).context("the folder has run out of UIDs")?;
            dtree.insert(new_uid.to_be_bytes(), serde_json::to_vec(&entry)?)?;
            pairs.push((uid, new_uid));
        }
        if !pairs.is_empty() {
            fsync_dir(&dcur)?;
            self.put_folder(&to, &dst)?;
            self.db.flush()?;
        }
        drop(_g);
        self.bump();
        Ok((dst.validity, pairs))
    }

    /// Removes messages for good; returns the UIDs removed.
    ///
    /// # Errors
    /// A missing folder or a disk failure.
    pub fn expunge(&self, name: &str, uids: &[u32]) -> Result<Vec<u32>> {
        self.expunge_if(name, uids, |_| true)
    }

    /// Removes those of `uids` whose flags, as the index has them now,
    /// pass `keep_going` (EXPUNGE: `\Deleted` as set by any client, not as
    /// one session last saw it).
    ///
    /// # Errors
    /// A missing folder or a disk failure.
    pub fn expunge_if(&self, name: &str, uids: &[u32], test: impl Fn(&Flags) -> bool) -> Result<Vec<u32>> {
        let _g = self.guard();
        let Some(f) = self.folder(name)? else { bail!("no such folder") };
        let tree = self.messages_tree(&f)?;
        let cur = self.folder_path(&f).join("cur");
        let mut gone = Vec::new();
        for &uid in uids {
            let Some(v) = tree.get(uid.to_be_bytes())? else { continue };
            let entry: Entry = serde_json::from_slice(&v)?;
            if !test(&entry.flags) {
                continue;
            }
            tree.remove(uid.to_be_bytes())?;
            gone.push((uid, entry));
        }
        // The index first: a crash after it leaves stray files, never an
        // entry without its file.
        self.db.flush()?;
        for (_, entry) in &gone {
            let _ = std::fs::remove_file(locate(&cur, entry));
        }
        let gone: Vec<u32> = gone.into_iter().map(|(u, _)| u).collect();
        drop(_g);
        if !gone.is_empty() {
            self.bump();
        }
        Ok(gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_and_validity_survive_a_reopen_and_flags_are_in_the_file_name() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (validity, uids) = {
            let s = Store::open(dir.path())?;
            let a = s.deliver(b"Subject: a\r\n\r\none\r\n")?;
            let b = s.deliver(b"Subject: b\r\n\r\ntwo\r\n")?;
            assert_eq!((a, b), (Some(1), Some(2)));
            assert_eq!(s.deliver(b"Subject: a\r\n\r\none\r\n")?, None, "a redelivery is stored once");
            // Another tool changes a flag in the file name: still found.
            let cur = dir.path().join("Maildir/cur");
            let e = s.entries("INBOX")?[0].1.clone();
            std::fs::rename(cur.join(e.file_name()), cur.join(format!("{}:2,T", e.file)))?;
            assert_eq!(s.read("INBOX", 1)?, b"Subject: a\r\n\r\none\r\n");
            s.set_flags("INBOX", &[2], |f| f.system |= flag::SEEN | flag::FLAGGED)?;
            (s.folder("INBOX")?.map(|f| f.validity), s.entries("INBOX")?)
        };
        let s = Store::open(dir.path())?;
        assert_eq!(s.folder("inbox")?.map(|f| f.validity), validity);
        assert_eq!(s.entries("INBOX")?, uids);
        let names: Vec<String> = std::fs::read_dir(dir.path().join("Maildir/cur"))?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<_>>()?;
        assert!(names.iter().any(|n| n.ends_with(":2,FS")), "{names:?}");
        assert_eq!(s.read("INBOX", uids[0].0)?, b"Subject: a\r\n\r\none\r\n");
        // EXPUNGE takes only what the index says is \Deleted now.
        s.set_flags("INBOX", &[1], |f| f.system |= flag::DELETED)?;
        assert_eq!(s.expunge_if("INBOX", &[1, 2], |f| f.has(flag::DELETED))?, vec![1]);
        // A new message after the reopen gets the next UID.
        assert_eq!(s.append("INBOX", b"x\r\n", Flags::default(), None)?.1, 3);
        Ok(())
    }

    #[test]
    fn copy_expunge_rename_and_delete_keep_uids_and_validity_apart() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let s = Store::open(dir.path())?;
        s.deliver(b"Subject: a\r\n\r\none\r\n")?;
        let (tv, pairs) = s.copy("INBOX", &[1, 99], "Trash")?;
        assert_eq!(pairs, vec![(1, 1)]);
        assert_eq!(s.expunge("INBOX", &[1])?, vec![1]);
        assert!(s.entries("INBOX")?.is_empty());
        assert_eq!(s.folder("Trash")?.map(|f| f.validity), Some(tv));
        s.create("Work/2026")?;
        assert!(s.folder("Work")?.is_some(), "the parent is made too");
        s.rename("Work", "Jobs")?;
        assert!(s.folder("Jobs/2026")?.is_some() && s.folder("Work/2026")?.is_none());
        // A new folder with the old name gets a directory of its own.
        s.create("Work")?;
        assert_ne!(s.folder("Work")?.map(|f| f.dir), s.folder("Jobs")?.map(|f| f.dir));
        let old = s.folder("Jobs/2026")?.map(|f| f.validity);
        s.delete("Jobs")?;
        s.delete("Jobs/2026")?;
        s.create("Jobs/2026")?;
        assert!(
            s.folder("Jobs/2026")?.map(|f| f.validity) > old,
            "the newest folder made again gets a new UIDVALIDITY"
        );
        let old = s.folder("Jobs")?.map(|f| f.validity);
        s.delete("Jobs")?;
        s.create("Jobs")?;
        assert_ne!(s.folder("Jobs")?.map(|f| f.validity), old, "a folder made again gets a new UIDVALIDITY");
        assert!(s.create("../x").is_ok_and(|()| dir.path().join("Maildir/.%2E%2E.x").is_dir()));
        assert!(s.create("a*b").is_err());
        Ok(())
    }
}
