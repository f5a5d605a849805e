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
    /// For a long post: how many lines were left out, and the whole text
    /// (the outbox posts a link to it).
    #[serde(default)]
    pub more: Option<(usize, String)>,
    /// The Message-IDs the message answers (`In-Reply-To`, then `References`, latest first).
    #[serde(default)]
    pub parents: Vec<String>,
    /// The lines it quotes (without `> `), to find the digest line it answers.
    #[serde(default)]
    pub quoted: Vec<String>,
    /// Its own Message-ID, to map the msgid its first line gets on IRC.
    #[serde(default)]
    pub message_id: Option<String>,
    /// The sender's name as shown on IRC.
    #[serde(default)]
    pub name: String,
}

/// How a contact follows a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscription {
    /// Not at all.
    Off,
    /// Every line (those that name them marked).
    All,
    /// Only the lines that name them.
    Mentions,
}

impl Subscription {
    /// Its value in the subscriptions tree and the shared bucket.
    pub fn as_bytes(self) -> &'static [u8] {
        match self {
            Subscription::Off => b"0",
            Subscription::All => b"1",
            Subscription::Mentions => b"m",
        }
    }

    /// From [`Subscription::as_bytes`] (anything else is off).
    pub fn from_bytes(v: &[u8]) -> Self {
        match v {
            b"1" => Subscription::All,
            b"m" => Subscription::Mentions,
            _ => Subscription::Off,
        }
    }
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
    pub async fn set_subscription(&self, channel: &str, address: &str, mode: Subscription) -> Result<(), StoreError> {
        let key = format!("{}\0{}", channel.to_lowercase(), address.to_lowercase());
        if let Some(q) = self.shared.get() {
            q.share_subscription(key.as_bytes(), mode.as_bytes()).await?;
        }
        self.apply_subscription(key.as_bytes(), Some(mode))?;
        self.durable().await
    }

    /// Sets (or, with `None`, forgets) a subscription record by its key,
    /// without a flush: for the mirror of the shared subscriptions.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn apply_subscription(&self, key: &[u8], mode: Option<Subscription>) -> Result<(), StoreError> {
        match mode {
            Some(mode) => self.subs.insert(key, mode.as_bytes())?,
            None => self.subs.remove(key)?,
        };
        Ok(())
    }

    /// The subscribers of `channel` (`#name@network`): `configured`, changed by messages.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn subscribers(&self, channel: &str, configured: &[String]) -> Result<Vec<String>, StoreError> {
        Ok(self.subscriptions(channel, configured)?.into_iter().map(|(a, _)| a).collect())
    }

    /// The subscribers of `channel` with how they follow it: `configured`
    /// (every line), changed by messages.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn subscriptions(
        &self,
        channel: &str,
        configured: &[String],
    ) -> Result<Vec<(String, Subscription)>, StoreError> {
        let prefix = format!("{}\0", channel.to_lowercase());
        let mut out: Vec<(String, Subscription)> =
            configured.iter().map(|a| (a.to_lowercase(), Subscription::All)).collect();
        for kv in self.subs.scan_prefix(prefix.as_bytes()) {
            let (k, v) = kv?;
            let address = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            out.retain(|(a, _)| *a != address);
            let mode = Subscription::from_bytes(&v);
            if mode != Subscription::Off {
                out.push((address, mode));
            }
        }
        Ok(out)
    }
}
