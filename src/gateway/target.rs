//! Where a queued message goes, and the clock the queue keeps: the leaf
//! that the queue, the contacts and the IRC state all name, so that none of
//! them names another for it.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Where a job delivers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Target {
    /// To a LATSSIAM contact, by fingerprint; `address` is how the sender named them.
    Latssiam { fingerprint: String, address: String },
    /// To an email address, through the smarthost.
    Smtp { rcpt: String },
}

impl Target {
    /// The channel's name.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Latssiam { .. } => "latssiam",
            Target::Smtp { .. } => "smtp",
        }
    }

    /// For listings.
    pub fn describe(&self) -> String {
        match self {
            Target::Latssiam { fingerprint, address } => format!("latssiam:<{address}> {fingerprint}"),
            Target::Smtp { rcpt } => format!("smtp:<{rcpt}>"),
        }
    }
}
