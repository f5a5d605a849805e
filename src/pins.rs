//! TOFU pins for the gateway, in sled (it already keeps all its state there).
//!
//! Tree `tofu_pins`: key = `host:port` (UTF-8), value = the 32 raw SHA-256
//! octets of the pinned certificate. Every `set` is flushed before it returns,
//! so a pin made just before a crash is still there after it.
//!
//! With `queue.backend = "jetstream"` every pin made is also written to the
//! shared bucket `STREAM-pins`, whose entries every node mirrors into its tree:
//! all nodes trust the same certificate for a server (the first pin reaches
//! the others; a node that meets another certificate there is refused as a
//! changed one).

use std::io;
use std::sync::{Arc, OnceLock};

use latssiam::tls::{PinStore, TlsError};
use latssiam::Fingerprint;

const TREE: &str = "tofu_pins";

/// A [`PinStore`] in a sled tree.
#[derive(Clone)]
pub struct SledPins {
    tree: sled::Tree,
    shared: Arc<OnceLock<Arc<crate::gateway::queue::jetstream::JetQueue>>>,
}

fn store_error(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> TlsError {
    TlsError::PinStore { path: format!("sled tree {TREE}"), source: io::Error::other(source) }
}

impl SledPins {
    /// Opens the pin tree of `db`.
    ///
    /// # Errors
    /// The sled error, if the tree cannot be opened.
    pub fn open(db: &sled::Db) -> Result<Self, sled::Error> {
        Ok(Self { tree: db.open_tree(TREE)?, shared: Arc::default() })
    }

    /// Pins made from now on go to the shared bucket too.
    pub fn share(&self, queue: Arc<crate::gateway::queue::jetstream::JetQueue>) {
        let _ = self.shared.set(queue);
    }

    /// Sets (or removes) a pin from the shared bucket, without a flush (the
    /// mirror replays the bucket at every start).
    ///
    /// # Errors
    /// The sled error.
    pub fn apply(&self, peer: &str, fingerprint: Option<&[u8]>) -> Result<(), sled::Error> {
        match fingerprint {
            Some(fp) if fp.len() == 32 => {
                self.tree.insert(peer.as_bytes(), fp)?;
            }
            Some(_) => {}
            None => {
                self.tree.remove(peer.as_bytes())?;
            }
        }
        Ok(())
    }
}

impl PinStore for SledPins {
    fn get(&self, peer: &str) -> Result<Option<Fingerprint>, TlsError> {
        let Some(value) = self.tree.get(peer.as_bytes()).map_err(store_error)? else {
            return Ok(None);
        };
        let bytes: [u8; 32] = value.as_ref().try_into().map_err(|_| store_error(format!("corrupt pin for {peer}")))?;
        Ok(Some(Fingerprint::from_bytes(bytes)))
    }

    fn set(&self, peer: &str, fingerprint: Fingerprint) -> Result<(), TlsError> {
        self.tree.insert(peer.as_bytes(), &fingerprint.as_bytes()[..]).map_err(store_error)?;
        self.tree.flush().map_err(store_error)?;
        // Called inside a TLS handshake, so not awaited: the pin is this
        // node's at once and the others' a moment later.
        if let (Some(q), Ok(rt)) = (self.shared.get(), tokio::runtime::Handle::try_current()) {
            let (q, peer) = (Arc::clone(q), peer.to_owned());
            rt.spawn(async move { q.share_pin(&peer, fingerprint).await });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_survive_reopening_and_corruption_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let fp = Fingerprint::of(b"server certificate");
        {
            let db = latssiam::group_commit::open_db(dir.path()).unwrap();
            let pins = SledPins::open(&db).unwrap();
            assert_eq!(pins.get("h.example:1977").unwrap(), None);
            pins.set("h.example:1977", fp).unwrap();
        }
        let db = latssiam::group_commit::open_db(dir.path()).unwrap();
        let pins = SledPins::open(&db).unwrap();
        assert_eq!(pins.get("h.example:1977").unwrap(), Some(fp));
        let other = Fingerprint::of(b"new certificate");
        pins.set("h.example:1977", other).unwrap();
        assert_eq!(pins.get("h.example:1977").unwrap(), Some(other));
        db.open_tree(TREE).unwrap().insert("bad:1977", &b"short"[..]).unwrap();
        assert!(matches!(pins.get("bad:1977"), Err(TlsError::PinStore { .. })));
    }
}
