//! What the IRC bridge keeps in the node's sled database, so that a restart
//! changes nothing a channel or a subscriber sees:
//! - `irc_window`: channel lines waiting for their digest (key: channel, NUL,
//!   a sequence number), written durably as they are heard and removed in
//!   the same sled transaction that queues their digest;
//! - `irc_ids`: the reply map, IRCv3 msgids and LATSSIAM Message-IDs both
//!   ways, each entry also in a time index so that [`Store::irc_sweep`]
//!   forgets entries older than their age, and the oldest beyond
//!   [`MAX_IDS`];
//! - `irc_pastes`: the whole text of long posts, served under an
//!   unguessable token until they expire;
//! - `irc_state`: when the bridge was last known connected, the chain of
//!   each channel's digests, and (with JetStream) the ids of a digest being
//!   queued.

use serde::{Deserialize, Serialize};
use sled::Transactional as _;

use super::db::{corrupt, decode, encode, Store, StoreError};
use super::queue::{fresh_jobs, now_ms, DigestJob, Origin};

/// Most entries the reply map keeps (each msgid with its time-index entry);
/// beyond it the oldest are forgotten first.
pub const MAX_IDS: usize = 200_000;
/// Most pastes kept at once; beyond it the oldest are forgotten first.
pub const MAX_PASTES: usize = 10_000;

/// A channel line waiting for its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitingLine {
    /// When the gateway heard it (its window is counted from the first line).
    pub heard_ms: u64,
    /// The digest line, `[HH:MM:SS] <nick> text` (the server's time where it sent one).
    pub line: String,
    /// The words said (for mentions); empty for joins and parts.
    #[serde(default)]
    pub text: String,
    /// Who said it.
    #[serde(default)]
    pub nick: String,
    /// Its msgid on the network, if the server gave one.
    #[serde(default)]
    pub msgid: Option<String>,
    /// The LATSSIAM Message-ID of what it answers (`+draft/reply` resolved).
    #[serde(default)]
    pub parent: Option<String>,
}

/// Waiting lines with their keys, in the order heard.
pub type Waiting = Vec<(sled::IVec, WaitingLine)>;

/// What a msgid stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Carried {
    /// The LATSSIAM Message-ID of the message that carried the line.
    pub message_id: String,
    /// Who said the line (empty if unknown).
    pub nick: String,
}

#[derive(Serialize, Deserialize)]
struct Paste {
    expires_ms: u64,
    text: String,
}

fn window_prefix(channel: &str) -> Vec<u8> {
    let mut k = channel.to_ascii_lowercase().into_bytes();
    k.push(0);
    k
}

/// A short digest of `line` for the line index (a line can be 17 KB).
fn line_hash(line: &str) -> [u8; 16] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, line.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&d.as_ref()[..16]);
    out
}

fn id_key(kind: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = vec![kind, 0];
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p);
    }
    k
}

fn tx_error(e: sled::transaction::TransactionError<()>) -> StoreError {
    match e {
        sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
        sled::transaction::TransactionError::Abort(()) => corrupt("digest transaction aborted"),
    }
}

impl Store {
    /// Keeps `line` for `channel`'s next digest, durably.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn window_push(&self, channel: &str, line: &WaitingLine) -> Result<(), StoreError> {
        let mut key = window_prefix(channel);
        key.extend_from_slice(&self.db.generate_id()?.to_be_bytes());
        self.irc_window.insert(key, encode(line))?;
        self.durable().await
    }

    /// The lines waiting for `channel`'s digest, in the order heard.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn window(&self, channel: &str) -> Result<Waiting, StoreError> {
        Ok(self.window_head(channel, usize::MAX)?.0)
    }

    /// The first lines waiting for `channel`'s digest that fit `budget`
    /// octets (each counted with its CRLF; at least one), and the line after
    /// them, if any.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn window_head(&self, channel: &str, budget: usize) -> Result<(Waiting, Option<WaitingLine>), StoreError> {
        let mut head = Vec::new();
        let mut len = 0usize;
        for kv in self.irc_window.scan_prefix(window_prefix(channel)) {
            let (k, v) = kv?;
            let line: WaitingLine = decode(&v, "waiting IRC line")?;
            len = len.saturating_add(line.line.len() + 2);
            if !head.is_empty() && len > budget {
                return Ok((head, Some(line)));
            }
            head.push((k, line));
        }
        Ok((head, None))
    }

    /// Removes lines from the window (their digest is queued), durably.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn window_remove(&self, keys: &[sled::IVec]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for k in keys {
            batch.remove(k);
        }
        self.irc_window.apply_batch(batch)?;
        self.durable().await
    }

    /// Queues the digests and removes their lines from the window in one
    /// sled transaction, durably: a crash leaves either the lines waiting
    /// or the digests queued, never both, never neither.
    ///
    /// # Errors
    /// [`StoreError`]; then nothing changed.
    pub async fn enqueue_digests(&self, keys: &[sled::IVec], digests: &[DigestJob]) -> Result<(), StoreError> {
        let now = now_ms();
        let mut jobs = Vec::new();
        for d in digests {
            let fresh = fresh_jobs(d.id, d.targets.iter().cloned(), &Origin::Gateway, now)
                .ok_or_else(|| corrupt("more than 65535 subscribers"))?;
            jobs.extend(fresh.into_iter().map(|(jid, job)| (jid, encode(&job))));
        }
        (&self.irc_window, &self.bodies, &self.jobs)
            .transaction(|(window, bodies, queued)| {
                for k in keys {
                    window.remove(k)?;
                }
                for d in digests.iter().filter(|d| !d.targets.is_empty()) {
                    bodies.insert(&d.id.to_be_bytes(), d.body.as_slice())?;
                }
                for (jid, job) in &jobs {
                    queued.insert(&jid.key(), job.as_slice())?;
                }
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(tx_error)?;
        self.durable().await?;
        self.index_due(jobs.iter().map(|(jid, _)| *jid), now);
        Ok(())
    }

    /// A value of `irc_state`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn irc_state(&self, key: &str) -> Result<Option<sled::IVec>, StoreError> {
        Ok(self.irc_status.get(key)?)
    }

    /// Sets (or with `None` removes) a value of `irc_state`; durable with the next flush.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn set_irc_state(&self, key: &str, value: Option<&[u8]>) -> Result<(), StoreError> {
        match value {
            Some(v) => self.irc_status.insert(key, v)?,
            None => self.irc_status.remove(key)?,
        };
        Ok(())
    }

    fn note_id(&self, key: Vec<u8>, value: &[u8], now: u64) -> Result<(), StoreError> {
        let mut t = id_key(b't', &[&now.to_be_bytes()]);
        t.push(0);
        t.extend_from_slice(&key);
        self.irc_ids.insert(&key, value)?;
        self.irc_ids.insert(t, &[])?;
        Ok(())
    }

    /// Notes that the line with `msgid` was carried by the LATSSIAM message `carried`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn note_msgid(&self, msgid: &str, carried: &Carried) -> Result<(), StoreError> {
        self.note_id(id_key(b'm', &[msgid.as_bytes()]), &encode(carried), now_ms())
    }

    /// What the line with `msgid` was carried by, if known.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn carried(&self, msgid: &str) -> Result<Option<Carried>, StoreError> {
        match self.irc_ids.get(id_key(b'm', &[msgid.as_bytes()]))? {
            Some(v) => Ok(Some(decode(&v, "IRC msgid")?)),
            None => Ok(None),
        }
    }

    /// Notes that `line` of the digest `message_id` had `msgid` on IRC.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn note_digest_line(&self, message_id: &str, line: &str, msgid: &str) -> Result<(), StoreError> {
        let key = id_key(b'l', &[message_id.as_bytes(), &line_hash(line)]);
        self.note_id(key, msgid.as_bytes(), now_ms())
    }

    /// Notes that the LATSSIAM message `message_id`, posted to IRC, had `msgid`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn note_posted(&self, message_id: &str, msgid: &str) -> Result<(), StoreError> {
        self.note_id(id_key(b'p', &[message_id.as_bytes()]), msgid.as_bytes(), now_ms())
    }

    /// The msgid a LATSSIAM answer to `parent` (a Message-ID) replies to:
    /// the digest line it quotes (`quoted`, without the `> `), else the
    /// first line of the post that was `parent`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn reply_msgid(&self, parent: &str, quoted: &[String]) -> Result<Option<String>, StoreError> {
        for q in quoted {
            if let Some(v) = self.irc_ids.get(id_key(b'l', &[parent.as_bytes(), &line_hash(q)]))? {
                return Ok(Some(String::from_utf8_lossy(&v).into_owned()));
            }
        }
        Ok(self.irc_ids.get(id_key(b'p', &[parent.as_bytes()]))?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Forgets reply-map entries noted before `older_than` (ms), and the
    /// oldest beyond [`MAX_IDS`]; forgets expired pastes, and the oldest
    /// beyond [`MAX_PASTES`]. Returns how many entries went.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn irc_sweep(&self, older_than: u64) -> Result<usize, StoreError> {
        self.irc_sweep_within(older_than, MAX_IDS, MAX_PASTES)
    }

    fn irc_sweep_within(&self, older_than: u64, max_ids: usize, max_pastes: usize) -> Result<usize, StoreError> {
        let mut gone = 0;
        let mut excess = (self.irc_ids.len() / 2).saturating_sub(max_ids);
        for kv in self.irc_ids.scan_prefix([b't', 0]) {
            let (k, _) = kv?;
            let at = k.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()).map_or(0, u64::from_be_bytes);
            if at >= older_than && excess == 0 {
                break;
            }
            if let Some(entry) = k.get(11..) {
                self.irc_ids.remove(entry)?;
            }
            self.irc_ids.remove(&k)?;
            excess = excess.saturating_sub(1);
            gone += 1;
        }
        let now = now_ms();
        let mut pastes = self.irc_pastes.len().saturating_sub(max_pastes);
        let mut expired = Vec::new();
        for kv in self.irc_pastes.iter() {
            let (k, v) = kv?;
            let old = decode::<Paste>(&v, "paste").map_or(true, |p| p.expires_ms <= now);
            if old || pastes > 0 {
                expired.push(k);
                pastes = pastes.saturating_sub(1);
            }
        }
        gone += expired.len();
        for k in expired {
            self.irc_pastes.remove(k)?;
        }
        Ok(gone)
    }

    /// Keeps `text` for `days` under a fresh unguessable token (128 random
    /// bits, hex), durably; returns the token.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn paste(&self, text: &str, days: u64) -> Result<String, StoreError> {
        self.paste_within(text, days, MAX_PASTES).await
    }

    async fn paste_within(&self, text: &str, days: u64, max: usize) -> Result<String, StoreError> {
        let mut bits = [0u8; 16];
        aws_lc_rs::rand::fill(&mut bits).map_err(|_| corrupt("no randomness for a paste token"))?;
        // Time-ordered keys, so that the oldest go first when there are too many.
        let token: String = now_ms().to_be_bytes().iter().chain(&bits).map(|b| format!("{b:02x}")).collect();
        let expires_ms = now_ms().saturating_add(days.saturating_mul(86_400_000));
        // Bounded at once, not only by the hourly sweep: the oldest go first.
        while self.irc_pastes.len() >= max {
            let Some((oldest, _)) = self.irc_pastes.pop_min()? else { break };
            debug_assert!(!oldest.is_empty());
        }
        self.irc_pastes.insert(token.as_bytes(), encode(&Paste { expires_ms, text: text.to_owned() }))?;
        self.durable().await?;
        Ok(token)
    }

    /// The text of the paste `token`, if it exists and has not expired.
    pub fn pasted(&self, token: &str) -> Option<String> {
        if token.len() != 48 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let v = self.irc_pastes.get(token.as_bytes()).ok()??;
        let paste: Paste = decode(&v, "paste").ok()?;
        (paste.expires_ms > now_ms()).then_some(paste.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::queue::Target;

    fn line(text: &str) -> WaitingLine {
        WaitingLine {
            heard_ms: now_ms(),
            line: format!("[12:00:00] <carl> {text}"),
            text: text.into(),
            nick: "carl".into(),
            msgid: None,
            parent: None,
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_digest_takes_its_lines_out_of_the_window_in_one_step_and_both_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.window_push("#Chat", &line("one")).await.unwrap();
            store.window_push("#chat", &line("two")).await.unwrap();
            store.window_push("#other", &line("elsewhere")).await.unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let waiting = store.window("#CHAT").unwrap();
        assert_eq!(waiting.iter().map(|(_, l)| l.text.as_str()).collect::<Vec<_>>(), ["one", "two"]);
        // A head that holds one line (each is 26 octets with its CRLF), and the next.
        let (head, next) = store.window_head("#chat", 30).unwrap();
        assert_eq!((head.len(), next.map(|l| l.text)), (1, Some("two".to_owned())));
        let (head, next) = store.window_head("#chat", 1).unwrap();
        assert_eq!((head.len(), next.is_some()), (1, true), "at least one line");
        assert_eq!(store.window_head("#chat", 1000).unwrap().0.len(), 2);
        let keys: Vec<sled::IVec> = waiting.iter().map(|(k, _)| k.clone()).take(1).collect();
        let target = Target::Smtp { rcpt: "a@example.org".into() };
        let digest =
            DigestJob { id: store.next_message_id().unwrap(), body: b"digest".to_vec(), targets: vec![target] };
        store.enqueue_digests(&keys, &[digest]).await.unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.window("#chat").unwrap().len(), 1, "the second line still waits");
        assert_eq!(store.jobs().unwrap().len(), 1, "the digest is queued");
        assert_eq!(store.window("#other").unwrap().len(), 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_reply_map_answers_and_forgets_what_is_old() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let carried = Carried { message_id: "<d1@gw>".into(), nick: "carl".into() };
        store.note_msgid("m1", &carried).unwrap();
        store.note_digest_line("<d1@gw>", "[12:00:00] <carl> hi", "m1").unwrap();
        store.note_posted("<alice1@example.org>", "m2").unwrap();
        assert_eq!(store.carried("m1").unwrap(), Some(carried));
        let quoted = vec!["not it".to_owned(), "[12:00:00] <carl> hi".to_owned()];
        assert_eq!(store.reply_msgid("<d1@gw>", &quoted).unwrap().as_deref(), Some("m1"));
        assert_eq!(store.reply_msgid("<alice1@example.org>", &[]).unwrap().as_deref(), Some("m2"));
        assert_eq!(store.reply_msgid("<unknown@x>", &quoted).unwrap(), None);
        assert_eq!(store.irc_sweep(0).unwrap(), 0, "nothing older than the epoch");
        assert_eq!(store.irc_sweep(now_ms() + 1).unwrap(), 3);
        assert_eq!(store.carried("m1").unwrap(), None);
        assert!(store.irc_ids.is_empty());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_flood_of_msgids_and_pastes_keeps_only_the_newest() {
        // Bounded by count, oldest first, whatever their age: the reply map
        // at the sweep, pastes at once when one more is kept.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for i in 0..50 {
            let carried = Carried { message_id: format!("<d{i}@gw>"), nick: "flooder".into() };
            store.note_msgid(&format!("m{i:02}"), &carried).unwrap();
        }
        assert_eq!(store.irc_sweep_within(0, 10, 10).unwrap(), 40);
        assert_eq!(store.irc_ids.len(), 20, "10 entries, each with its time index");
        assert_eq!(store.carried("m00").unwrap(), None);
        assert!(store.carried("m49").unwrap().is_some());
        let mut tokens = Vec::new();
        for i in 0..12 {
            tokens.push(store.paste_within(&format!("paste {i}"), 7, 5).await.unwrap());
            // Tokens are ordered by their millisecond; within one, at random.
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        assert_eq!(store.irc_pastes.len(), 5);
        assert_eq!(store.pasted(&tokens[11]).as_deref(), Some("paste 11"));
        assert_eq!(store.pasted(&tokens[0]), None, "the oldest went first");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_paste_is_served_by_its_token_only_until_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let token = store.paste("line 1\nline 2\n", 7).await.unwrap();
        assert_eq!(token.len(), 48);
        assert_eq!(store.pasted(&token).as_deref(), Some("line 1\nline 2\n"));
        assert_eq!(store.pasted(&token.replace('0', "1")), None);
        assert_eq!(store.pasted("../../etc/passwd"), None);
        let gone = store.paste("old", 0).await.unwrap();
        assert_eq!(store.pasted(&gone), None, "expired at once");
        assert_eq!(store.irc_sweep(0).unwrap(), 1);
        assert_eq!(store.pasted(&token).as_deref(), Some("line 1\nline 2\n"));
    }
}
