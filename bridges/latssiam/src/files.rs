//! Files that hold secrets or state: private directories and atomic writes.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Makes every file and directory this process creates from now on private
/// to its owner (umask 077): queued mail, keys, pins and sockets never exist,
/// even for a moment, with a wider mode than their creator asked minus this.
pub fn private_umask() {
    #[cfg(unix)]
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// Creates `dir` and any missing parents accessible to their owner only
/// (mode 0700 on Unix); a directory that exists is left as it is.
///
/// # Errors
/// The I/O error.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Creates `dir` as [`create_private_dir`] does, and makes `dir` itself
/// private also when it existed with a wider mode: for a program's own data
/// directory (queued mail, keys, pins).
///
/// # Errors
/// The I/O error.
pub fn private_data_dir(dir: &Path) -> io::Result<()> {
    create_private_dir(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
        if mode != 0o700 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically: a temporary file beside it (created
/// with `mode` on Unix), fsynced, renamed over `path`, then the directory
/// fsynced. A crash leaves either the old file or the new one, never a part.
///
/// # Errors
/// The I/O error.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    // A stale temporary file (or a link planted there) is removed, never written through.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn private_dirs_and_atomic_files() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("a/b");
        create_private_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_private_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o755, "left as it was");
        private_data_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);

        let file = dir.join("key.pem");
        write_atomic(&file, b"one", 0o600).unwrap();
        write_atomic(&file, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!dir.join("key.pem.tmp").exists());
    }
}

/// Whether the filesystem of a store keeps a minimum of free space: a store
/// (sled) refuses every write after it once met a full disk, so writes are
/// refused before that, while it still recovers by itself. The free space is
/// looked up (`statvfs`) at most once a second, so a check costs nothing per
/// message.
#[derive(Debug)]
pub struct FreeSpace {
    dir: PathBuf,
    min_free: u64,
    /// Octets free at the last look-up, and when that was (ms since the epoch).
    free: AtomicU64,
    checked_ms: AtomicU64,
}

impl FreeSpace {
    /// A check that `dir`'s filesystem keeps `min_free` octets (0: no check).
    pub fn new(dir: &Path, min_free: u64) -> Self {
        Self { dir: dir.to_path_buf(), min_free, free: AtomicU64::new(u64::MAX), checked_ms: AtomicU64::new(0) }
    }

    /// `Err` with the octets free when below the minimum.
    ///
    /// # Errors
    /// The octets free, when fewer than the minimum.
    pub fn check(&self) -> Result<(), u64> {
        if self.min_free == 0 {
            return Ok(());
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let free = if now.saturating_sub(self.checked_ms.load(Ordering::Relaxed)) < 1000 {
            self.free.load(Ordering::Relaxed)
        } else {
            let free = free_octets(&self.dir).unwrap_or(u64::MAX);
            self.free.store(free, Ordering::Relaxed);
            self.checked_ms.store(now, Ordering::Relaxed);
            free
        };
        if free >= self.min_free {
            Ok(())
        } else {
            Err(free)
        }
    }
}

/// Octets available to this process on the filesystem of `dir`, if known.
fn free_octets(dir: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        let s = rustix::fs::statvfs(dir).ok()?;
        Some(s.f_bavail.saturating_mul(s.f_frsize))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        None
    }
}
