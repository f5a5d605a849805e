//! TOFU pins for the gateway, in sled (it already keeps all its state there).
//!
//! Tree `tofu_pins`: key = `host:port` (UTF-8), value = the 32 raw SHA-256
//! octets of the pinned certificate. Every `set` is flushed before it returns,
//! so a pin made just before a crash is still there after it.
//!
//! With `queue.backend = "jetstream"` every pin made is also written to the
//! shared bucket `STREAM-pins` with `create` (only if no node pinned that
//! server before), whose entries every node mirrors into its tree: all nodes
//! trust the first certificate pinned for a server. A node that meets another
//! one there, even in the same instant as the first pin, is refused as a
//! changed one; a shared pin that differs from one a node holds already does
//! not replace it (a TOFU conflict, logged as an error).

use std::io;
use std::sync::{Arc, OnceLock};

use latssiam::tls::{PinStore, TlsError};
use latssiam::Fingerprint;
use tracing::error;

const TREE: &str = "tofu_pins";

/// Where a cluster's nodes claim their first pins (the JetStream queue's
/// bucket): whoever claims a server first decides for all.
pub trait SharedPins: Send + Sync {
    /// Claims `fingerprint` as `peer`'s pin if no node did before; the
    /// fingerprint the cluster trusts for `peer`, or why it cannot be asked
    /// (then the connection fails and is tried again later).
    fn claim<'a>(
        &'a self,
        peer: &'a str,
        fingerprint: Fingerprint,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Fingerprint, String>> + Send + 'a>>;
}

/// A [`PinStore`] in a sled tree.
#[derive(Clone)]
pub struct SledPins {
    tree: sled::Tree,
    shared: Arc<OnceLock<Arc<dyn SharedPins>>>,
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

    /// Pins made from now on are claimed in `shared` first.
    pub fn share(&self, shared: Arc<dyn SharedPins>) {
        let _ = self.shared.set(shared);
    }

    /// Sets (or removes) a pin from the shared bucket, without a flush (the
    /// mirror replays the bucket at every start). A shared pin that differs
    /// from one this node already holds is a TOFU conflict: this node keeps
    /// its own (the one its handshakes proved) and says so; only a removal
    /// (an operator forgetting a pin) is taken as it comes.
    ///
    /// # Errors
    /// The sled error.
    pub fn apply(&self, peer: &str, fingerprint: Option<&[u8]>) -> Result<(), sled::Error> {
        match fingerprint {
            Some(fp) if fp.len() == 32 => match self.tree.compare_and_swap(peer.as_bytes(), None::<&[u8]>, Some(fp))? {
                Ok(()) => {}
                Err(cas) if cas.current.as_deref() == Some(fp) => {}
                Err(cas) => {
                    let show = |b: &[u8]| {
                        <[u8; 32]>::try_from(b).map(|a| Fingerprint::from_bytes(a).to_string()).unwrap_or_default()
                    };
                    error!(
                        peer,
                        ours = %cas.current.as_deref().map(show).unwrap_or_default(),
                        shared = %show(fp),
                        "TOFU conflict: the shared bucket pins another certificate for this server than this node \
                         did; keeping this node's (remove the pin on every node to trust a new one)."
                    );
                }
            },
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
        // With a shared queue the first pin in the bucket is the cluster's:
        // claimed before this connection goes on, so that a node that met
        // another certificate than the one already pinned fails here. Called
        // inside a TLS handshake (a synchronous trait), hence block_in_place
        // on the gateway's multi-threaded runtime.
        let trusted = match (self.shared.get(), tokio::runtime::Handle::try_current()) {
            (Some(q), Ok(rt)) if rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| rt.block_on(q.claim(peer, fingerprint))).map_err(store_error)?
            }
            _ => fingerprint,
        };
        self.tree.insert(peer.as_bytes(), &trusted.as_bytes()[..]).map_err(store_error)?;
        self.tree.flush().map_err(store_error)?;
        if trusted != fingerprint {
            error!(
                peer,
                ours = %fingerprint,
                shared = %trusted,
                "TOFU conflict: another node pinned another certificate for this server first; refusing this one."
            );
            return Err(TlsError::PinMismatch { peer: peer.to_owned(), pinned: trusted, presented: fingerprint });
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
