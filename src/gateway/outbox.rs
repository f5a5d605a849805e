//! The IRC outbox (posts for IRC, sent in order by one task) and the
//! subscriptions to channels made by message, in the node's sled database.

use serde::{Deserialize, Serialize};

use super::db::{decode, Store, StoreError};

/// Lines for an IRC channel or nick.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IrcPost {
    /// A channel or a nick.
    pub target: String,
    /// The lines, formatted.
    pub lines: Vec<String>,
}

impl Store {
    /// The oldest post for IRC.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn irc_first(&self) -> Result<Option<(sled::IVec, IrcPost)>, StoreError> {
        match self.irc.first()? {
            Some((k, v)) => Ok(Some((k, decode(&v, "irc post")?))),
            None => Ok(None),
        }
    }

    /// A post went out.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn irc_done(&self, key: &[u8]) -> Result<(), StoreError> {
        self.irc.remove(key)?;
        Ok(())
    }

    /// Records a (un)subscription by message, durably.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn set_subscription(&self, channel: &str, address: &str, on: bool) -> Result<(), StoreError> {
        let key = format!("{}\0{}", channel.to_lowercase(), address.to_lowercase());
        if let Some(q) = self.shared.get() {
            q.share_subscription(key.as_bytes(), on).await?;
        }
        self.apply_subscription(key.as_bytes(), Some(on))?;
        self.durable().await
    }

    /// Sets (or, with `None`, forgets) a subscription record by its key,
    /// without a flush: for the mirror of the shared subscriptions.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn apply_subscription(&self, key: &[u8], on: Option<bool>) -> Result<(), StoreError> {
        match on {
            Some(on) => self.subs.insert(key, if on { &b"1"[..] } else { &b"0"[..] })?,
            None => self.subs.remove(key)?,
        };
        Ok(())
    }

    /// The subscribers of `channel` (`#name@network`): `configured`, changed by messages.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn subscribers(&self, channel: &str, configured: &[String]) -> Result<Vec<String>, StoreError> {
        let prefix = format!("{}\0", channel.to_lowercase());
        let mut out: Vec<String> = configured.iter().map(|a| a.to_lowercase()).collect();
        for kv in self.subs.scan_prefix(prefix.as_bytes()) {
            let (k, v) = kv?;
            let address = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            out.retain(|a| *a != address);
            if v.as_ref() == b"1" {
                out.push(address);
            }
        }
        Ok(out)
    }
}
