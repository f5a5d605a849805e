//! The gateway's side of the IRC bot.
//!
//! IRC -> LATSSIAM: channel lines become `[HH:MM:SS] <nick> text`, gathered
//! per channel over its digest window into one Internet Message from
//! `"#channel" <#channel@network>` (several, chained, when a window holds
//! more than one LATSSIAM message can carry), queued with one job per
//! subscriber and delivered by the worker. IRC has no acknowledgement, so
//! lines waiting in a digest window live in memory only until the digest is
//! queued. `/msg <bot> ADDRESS text` is relayed at most
//! `private_messages_per_minute` times per client host (the nick when the
//! server sends none) and rolling minute, and `gateway.max_per_origin_per_day`
//! times a day to one person.
//!
//! LATSSIAM -> IRC: the poller turns a message to `#channel@network` (from a
//! subscriber) or `nick@network` into an [`IrcPost`] in the `irc_outbox`
//! tree; [`outbox`] posts them strictly in order whenever the bot is in its
//! channels, and removes each only once all its lines were written.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use bridge_irc::{Event, Handle, IrcSink, Kind};
use latssiam::identity::CertInfo;
use mail_parser::Message;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::config::{IrcChannel, IrcSettings};
use super::contacts::{Contact, Reach};
use super::db::StoreError;
use super::irc_state::{Carried, WaitingLine};
use super::mail;
use super::mail::MAX_PLAINTEXT;
use super::outbox::{IrcPost, Subscription};
use super::queue::{message_id_string, now_ms, DigestJob, Origin, Target};
use super::Gateway;

/// Most octets of digest lines in one message: what a LATSSIAM message
/// carries, less room for the header section.
const DIGEST_BUDGET: usize = MAX_PLAINTEXT - 2000;
/// How long the reply map remembers a msgid or a Message-ID.
const REPLY_MEMORY: Duration = Duration::from_secs(30 * 86_400);
/// Most parents one digest names in `In-Reply-To`.
const MAX_PARENTS: usize = 8;
/// How a line that names the subscriber it goes to is marked.
const MENTION_MARK: &str = "(@) ";

/// What waits for a channel's next digest: a summary of its lines in the
/// store's window (see [`super::irc_state`]).
#[derive(Default)]
struct Digest {
    /// Octets the lines take in the body (each with its CRLF).
    body_len: usize,
    /// When the first waiting line was heard (ms).
    since_ms: Option<u64>,
    /// After a failure to queue, not before then (ms).
    retry_at_ms: u64,
    /// Lines dropped because the window was full.
    dropped: u64,
}

/// Most octets of lines one channel's window holds (64 digests' worth, about
/// 1 MB); beyond them, while digests cannot be queued, new lines are dropped.
const MAX_WINDOW: usize = 64 * DIGEST_BUDGET;

/// How long after a failure to queue a digest the next try waits.
const RETRY_MS: u64 = 5_000;

impl Digest {
    /// Whether `line` still fits in this digest (a first line always does:
    /// [`digest_line`] keeps each within the budget).
    fn fits(&self, line: &str) -> bool {
        self.since_ms.is_none() || self.body_len + line.len() + 2 <= DIGEST_BUDGET
    }

    fn push(&mut self, line: &WaitingLine) {
        self.body_len += line.line.len() + 2;
        self.since_ms.get_or_insert(line.heard_ms);
    }

    fn of(lines: &[(sled::IVec, WaitingLine)]) -> Self {
        let mut d = Self::default();
        for (_, l) in lines {
            d.push(l);
        }
        d
    }
}

/// A digest being queued on JetStream: its first line's key, how many
/// lines it takes, a hash of its lines and recipients, and its ids.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Plan {
    first: Vec<u8>,
    taken: usize,
    hash: Vec<u8>,
    ids: Vec<u64>,
}

/// Most distinct digests one flush makes (copies with other lines marked,
/// mentions-only copies); beyond it subscribers get the unmarked digest.
const MAX_GROUPS: usize = 16;

/// Subscribers who get the same digest: of every line or (`only`) of the
/// lines that name them, `marked` the lines (indices) that name them.
struct Group {
    only: bool,
    marked: Vec<usize>,
    targets: Vec<Target>,
}

/// The gateway as the bot's sink.
pub struct IrcCore {
    gw: Arc<Gateway>,
    digests: Mutex<HashMap<String, Digest>>,
    limiter: std::sync::Mutex<PrivateLimiter>,
    /// Since when (ms) the bridge has not heard the channels, to be said in
    /// the next digests once it is back: set when the connection drops, and
    /// at start from the last time it was known connected.
    away_since: std::sync::Mutex<Option<u64>>,
    connected: std::sync::atomic::AtomicBool,
    /// The names of the senders of posts whose echo is awaited, by post key.
    posters: std::sync::Mutex<VecDeque<(String, String)>>,
}

/// `irc_state` key: when the bridge was last known in its channels (ms, big-endian).
const UP: &str = "up";
/// `irc_state` kinds kept per channel: the Message-ID of its last digest,
/// and (JetStream) the plan of a digest being queued.
const LAST: &str = "last";
const FLUSHING: &str = "flushing";

/// The `irc_state` key of `kind` for `channel`.
fn state_key(kind: &str, channel: &str) -> String {
    format!("{kind}\0{}", channel.to_ascii_lowercase())
}

impl IrcCore {
    /// A sink for the bot, with the digests that waited in the store.
    pub fn new(gw: Arc<Gateway>) -> Arc<Self> {
        let limiter = std::sync::Mutex::new(PrivateLimiter::new(gw.settings.irc.private_messages_per_minute));
        let mut digests = HashMap::new();
        for channel in &gw.settings.irc.channels {
            match gw.store.window(&channel.name) {
                Ok(lines) => {
                    if !lines.is_empty() {
                        info!(channel = %channel.name, lines = lines.len(), "IRC lines waiting for their digest since before the restart.");
                    }
                    digests.insert(channel.name.to_ascii_lowercase(), Digest::of(&lines));
                }
                Err(e) => warn!(error = %e, channel = %channel.name, "Cannot read the IRC lines waiting for a digest."),
            }
        }
        let up = gw.store.irc_state(UP).ok().flatten().and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok());
        Arc::new(Self {
            away_since: std::sync::Mutex::new(up.map(u64::from_be_bytes)),
            gw,
            digests: Mutex::new(digests),
            limiter,
            connected: std::sync::atomic::AtomicBool::new(false),
            posters: std::sync::Mutex::default(),
        })
    }

    fn channel(&self, name: &str) -> Option<&IrcChannel> {
        self.gw.settings.irc.channels.iter().find(|c| c.name.eq_ignore_ascii_case(name))
    }

    /// Notes that the bridge is in its channels now.
    fn note_up(&self) {
        if let Err(e) = self.gw.store.set_irc_state(UP, Some(&now_ms().to_be_bytes())) {
            debug!(error = %e, "Cannot note the IRC bridge up.");
        }
    }

    /// Keeps `line` for `channel`'s next digest (durably), flushing first
    /// what no longer leaves it room, and at once without a window.
    async fn hold(&self, channel: &IrcChannel, line: WaitingLine) {
        let mut digests = self.digests.lock().await;
        let d = digests.entry(channel.name.to_ascii_lowercase()).or_default();
        if d.body_len + line.line.len() > MAX_WINDOW {
            // Digests cannot be queued (a queue outage): the window stays bounded.
            d.dropped += 1;
            if d.dropped.is_power_of_two() {
                warn!(channel = %channel.name, dropped = d.dropped, "Too many IRC lines wait for a digest that cannot be queued; new ones are dropped.");
            }
            return;
        }
        if !d.fits(&line.line) {
            // A busy window: send what fits one message now, go on in the next (chained).
            self.flush(channel, d, false).await;
        }
        if let Err(e) = self.gw.store.window_push(&channel.name, &line).await {
            warn!(error = %e, channel = %channel.name, "Cannot keep an IRC line for its digest; it is lost.");
            return;
        }
        d.push(&line);
        if channel.digest_window == 0 && now_ms() >= d.retry_at_ms {
            self.flush(channel, d, true).await;
        }
    }

    /// Queues the lines waiting for `channel` as digests to its subscribers
    /// (one digest's worth, or with `all` every line waiting), and takes
    /// them out of the window in the same step.
    async fn flush(&self, channel: &IrcChannel, digest: &mut Digest, all: bool) {
        loop {
            // One digest's worth is read, not the whole window.
            let (head, next) = match self.gw.store.window_head(&channel.name, DIGEST_BUDGET) {
                Ok(w) => w,
                Err(e) => {
                    warn!(error = %e, channel = %channel.name, "Cannot read the IRC lines waiting for a digest.");
                    digest.retry_at_ms = now_ms() + RETRY_MS;
                    return;
                }
            };
            let mut taken = head.len();
            // A digest that was being queued when the node stopped takes the same lines again.
            if let (Some((first, _)), Ok(Some(kept))) = (head.first(), self.kept_plan(&channel.name)) {
                if kept.first == first.as_ref() {
                    taken = kept.taken.clamp(1, head.len());
                }
            }
            if taken == 0 {
                *digest = Digest::default();
                return;
            }
            let (now, rest) = head.split_at(taken);
            if let Err(e) = self.queue_digests(channel, now).await {
                warn!(error = %e, channel = %channel.name, "Cannot queue an IRC digest; its lines wait for the next try.");
                digest.retry_at_ms = now_ms() + RETRY_MS;
                return;
            }
            let sent: usize = now.iter().map(|(_, l)| l.line.len() + 2).sum();
            digest.body_len = digest.body_len.saturating_sub(sent);
            digest.since_ms = rest.first().map(|(_, l)| l).or(next.as_ref()).map(|l| l.heard_ms);
            if digest.since_ms.is_none() {
                digest.body_len = 0;
            }
            if !all || digest.since_ms.is_none() {
                return;
            }
        }
    }

    /// Queues `lines` as digests: one for the subscribers of everything
    /// (lines naming one of them marked, in a copy of their own), one for
    /// each subscriber of their mentions only who is named.
    async fn queue_digests(&self, channel: &IrcChannel, lines: &[(sled::IVec, WaitingLine)]) -> Result<(), StoreError> {
        let keys: Vec<sled::IVec> = lines.iter().map(|(k, _)| k.clone()).collect();
        // Lower-cased once for every subscriber's mention check.
        let said: Vec<String> = lines.iter().map(|(_, l)| l.text.to_lowercase()).collect();
        let mut groups: Vec<Group> = Vec::new();
        let subscriptions =
            self.gw.store.subscriptions(&channel_address(channel), &channel.subscribers).unwrap_or_else(|e| {
                warn!(error = %e, "Cannot read the subscribers; using the configured ones.");
                channel.subscribers.iter().map(|a| (a.clone(), Subscription::All)).collect()
            });
        for (address, mode) in subscriptions {
            let (target, contact) = match self.gw.store.reach(&address) {
                Ok(Reach::Contact { target, contact }) => (target, contact),
                Err(e) => {
                    warn!(error = %e, %address, "Cannot read a subscriber's contact; skipped.");
                    continue;
                }
                Ok(Reach::Unknown) => {
                    warn!(%address, channel = %channel.name, "A subscriber is not a contact; skipped.");
                    continue;
                }
                Ok(Reach::Gone) => {
                    debug!(%address, channel = %channel.name, "A subscriber's mailbox is gone; skipped.");
                    continue;
                }
            };
            let names = [irc_name(&contact), contact.address.split('@').next().unwrap_or_default().to_owned()]
                .map(|n| n.trim().to_lowercase());
            let marked: Vec<usize> = (0..said.len()).filter(|&i| names.iter().any(|n| mentions(&said[i], n))).collect();
            let only = mode == Subscription::Mentions;
            if only && marked.is_empty() {
                continue;
            }
            // Bounded: beyond MAX_GROUPS copies, the unmarked digest for everyone else.
            let (only, marked) =
                if groups.len() >= MAX_GROUPS && !groups.iter().any(|g| g.only == only && g.marked == marked) {
                    (false, Vec::new())
                } else {
                    (only, marked)
                };
            match groups.iter_mut().find(|g| g.only == only && g.marked == marked) {
                Some(g) => g.targets.push(target),
                None => groups.push(Group { only, marked, targets: vec![target] }),
            }
        }
        if groups.is_empty() {
            return self.gw.store.window_remove(&keys).await;
        }
        // The digest of everything, to the most people, first: it chains the
        // channel's digests and stands for the lines in the reply map.
        groups.sort_by_key(|g| (g.only, !g.marked.is_empty(), usize::MAX - g.targets.len()));
        let plan = {
            let mut h = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
            for k in &keys {
                h.update(k);
            }
            for g in &groups {
                h.update(format!("{}{:?}{:?}", g.only, g.marked, g.targets).as_bytes());
            }
            Plan { first: keys[0].to_vec(), taken: keys.len(), hash: h.finish().as_ref().to_vec(), ids: Vec::new() }
        };
        let ids = self.digest_ids(&channel.name, &plan, groups.len()).await?;
        let hostname = &self.gw.settings.gateway.hostname;
        let previous = self.gw.store.irc_state(&state_key(LAST, &channel.name))?;
        let previous = previous.map(|p| String::from_utf8_lossy(&p).into_owned());
        let mut parents: Vec<&str> = Vec::new();
        for (_, l) in lines {
            if let Some(p) = &l.parent {
                if !parents.contains(&p.as_str()) && parents.len() < MAX_PARENTS {
                    parents.push(p);
                }
            }
        }
        let date = mail::date_now();
        let mut jobs = Vec::new();
        let mut rendered: Vec<(String, Vec<(usize, String)>)> = Vec::new();
        for (Group { only, marked, targets }, id) in groups.into_iter().zip(&ids) {
            let message_id = format!(
                "<irc.{}.{}@{hostname}>",
                message_id_string(*id),
                channel.name.trim_start_matches(['#', '&', '+', '!'])
            );
            let shown: Vec<(usize, String)> = lines
                .iter()
                .enumerate()
                .filter(|(i, _)| !only || marked.contains(i))
                .map(|(i, (_, l))| (i, mark(&l.line, marked.contains(&i))))
                .collect();
            let texts: Vec<&str> = shown.iter().map(|(_, l)| l.as_str()).collect();
            let m = digest_message(
                channel,
                &texts,
                &DigestHeader {
                    message_id: &message_id,
                    previous: previous.as_deref(),
                    parents: &parents,
                    date: &date,
                },
                marked.len(),
            );
            jobs.push(DigestJob { id: *id, body: m.into_bytes(), targets });
            rendered.push((message_id, shown));
        }
        self.gw.queue.enqueue_digests(&self.gw.store, &keys, &jobs).await?;
        let _ = self.gw.store.set_irc_state(&state_key(FLUSHING, &channel.name), None);
        self.gw.metrics.irc_lines_queued.inc_by(lines.len() as u64);
        self.gw.metrics.irc_digests_queued.inc_by(jobs.len() as u64);
        if let Some((main, _)) = rendered.first() {
            let _ = self.gw.store.set_irc_state(&state_key(LAST, &channel.name), Some(main.as_bytes()));
        }
        // The reply map: which message carried each line, and each line as shown in each digest.
        for (message_id, shown) in &rendered {
            for (i, text) in shown {
                let l = &lines[*i].1;
                let Some(msgid) = &l.msgid else { continue };
                if self.gw.store.carried(msgid)?.is_none() {
                    self.gw
                        .store
                        .note_msgid(msgid, &Carried { message_id: message_id.clone(), nick: l.nick.clone() })?;
                }
                self.gw.store.note_digest_line(message_id, text, msgid)?;
            }
        }
        Ok(())
    }

    /// `n` message ids for the digests of the lines from `first` on. With
    /// JetStream the ids are kept until the digests are queued, so that after
    /// a crash the same digests go out under the same ids, which JetStream's
    /// duplicate window drops.
    ///
    /// The ids are reused only for exactly the same plan (the same lines,
    /// the same groups of recipients): otherwise a different digest would go
    /// out under an id JetStream already has, and be dropped. A changed plan
    /// gets fresh ids (at worst a repeat, never a loss).
    async fn digest_ids(&self, channel: &str, plan: &Plan, n: usize) -> Result<Vec<u64>, StoreError> {
        let fresh = |n: usize| (0..n).map(|_| self.gw.queue.new_message_id()).collect::<Result<Vec<u64>, _>>();
        if !self.gw.queue.shared() {
            return fresh(n);
        }
        let key = state_key(FLUSHING, channel);
        let kept = self.kept_plan(channel)?;
        let mut ids = match kept {
            Some(k) if k.first == plan.first && k.taken == plan.taken && k.hash == plan.hash => k.ids,
            _ => Vec::new(),
        };
        ids.truncate(n);
        let more = fresh(n - ids.len())?;
        ids.extend(more);
        let record = Plan { ids: ids.clone(), ..plan.clone() };
        self.gw.store.set_irc_state(&key, Some(&serde_json::to_vec(&record).unwrap_or_default()))?;
        self.gw.store.durable().await?;
        Ok(ids)
    }

    /// The plan of a digest being queued when the node stopped (JetStream).
    fn kept_plan(&self, channel: &str) -> Result<Option<Plan>, StoreError> {
        let key = state_key(FLUSHING, channel);
        Ok(self.gw.store.irc_state(&key)?.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Flushes every digest whose window has passed, forgets old replies
    /// and pastes hourly, notes every 10 s that the bridge is up; runs until
    /// `shutdown` (the lines left wait in the store for the next start).
    pub async fn digest_timer(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            ticks += 1;
            if ticks.is_multiple_of(40) && self.connected.load(std::sync::atomic::Ordering::Relaxed) {
                self.note_up();
            }
            if ticks % 14_400 == 1 {
                let older = now_ms().saturating_sub(u64::try_from(REPLY_MEMORY.as_millis()).unwrap_or(u64::MAX));
                let store = Arc::clone(&self.gw.store);
                match tokio::task::spawn_blocking(move || store.irc_sweep(older)).await {
                    Ok(Ok(n)) if n > 0 => debug!(forgotten = n, "Old IRC reply-map entries and pastes forgotten."),
                    Ok(Err(e)) => warn!(error = %e, "Cannot sweep the IRC reply map."),
                    _ => {}
                }
            }
            let mut digests = self.digests.lock().await;
            for channel in &self.gw.settings.irc.channels {
                let Some(d) = digests.get_mut(&channel.name.to_ascii_lowercase()) else { continue };
                let now = now_ms();
                let due = d.since_ms.is_some_and(|s| now.saturating_sub(s) >= channel.digest_window * 1000)
                    && now >= d.retry_at_ms;
                if due {
                    self.flush(channel, d, true).await;
                }
            }
        }
    }

    /// The bridge is back in its channels: a line in each channel's next
    /// digest says since when it was away.
    async fn back(&self) {
        self.connected.store(true, std::sync::atomic::Ordering::Relaxed);
        let since = self.away_since.lock().unwrap_or_else(PoisonError::into_inner).take();
        self.note_up();
        let Some(since) = since else { return };
        let now = time::OffsetDateTime::now_utc();
        let from = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(since) * 1_000_000).unwrap_or(now);
        let line = format!(
            "{} *** The bridge was away from {} to {} UTC: what was said then is not here.",
            clock(now),
            if from.date() == now.date() { clock_bare(from) } else { format!("{} {}", from.date(), clock_bare(from)) },
            clock_bare(now)
        );
        for channel in &self.gw.settings.irc.channels {
            let waiting = WaitingLine {
                heard_ms: now_ms(),
                line: line.clone(),
                text: String::new(),
                nick: String::new(),
                msgid: None,
                parent: None,
            };
            self.hold(channel, waiting).await;
        }
    }
}

/// `[HH:MM:SS]`.
fn clock(t: time::OffsetDateTime) -> String {
    format!("[{}]", clock_bare(t))
}

fn clock_bare(t: time::OffsetDateTime) -> String {
    format!("{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second())
}

/// `line` marked as naming its reader, or as it is.
fn mark(line: &str, marked: bool) -> String {
    match (marked, line.split_once("] ")) {
        (true, Some((time, rest))) => format!("{time}] {MENTION_MARK}{rest}"),
        _ => line.to_owned(),
    }
}

/// Whether `text` names `name` as a word of its own (both lower-cased by the caller).
fn mentions(text: &str, name: &str) -> bool {
    if name.is_empty() {
        return false;
    }
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    text.match_indices(&name)
        .any(|(i, m)| !word(text[..i].chars().next_back()) && !word(text[i + m.len()..].chars().next()))
}

impl IrcSink for IrcCore {
    async fn event(&self, event: Event) -> Option<String> {
        match event {
            Event::Channel { channel, nick, kind, text, meta } => {
                let config = self.channel(&channel)?;
                let shown = meta
                    .time
                    .as_deref()
                    .and_then(|t| time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok())
                    .map(|t| t.to_offset(time::UtcOffset::UTC))
                    .unwrap_or_else(time::OffsetDateTime::now_utc);
                let parent = match meta.reply_to.as_deref().map(|r| self.gw.store.carried(r)) {
                    Some(Ok(p)) => p,
                    Some(Err(e)) => {
                        debug!(error = %e, "Cannot read the IRC reply map.");
                        None
                    }
                    None => None,
                };
                let answered = parent.as_ref().map(|p| p.nick.as_str());
                let line = digest_line(kind, &nick, &text, config.relay_joins, shown, answered)?;
                self.gw.metrics.irc_lines_heard.inc();
                let said = matches!(kind, Kind::Message | Kind::Action | Kind::Notice);
                let waiting = WaitingLine {
                    heard_ms: now_ms(),
                    line,
                    text: if said { bridge_irc::format::clean_text(&text) } else { String::new() },
                    nick: bridge_irc::format::clean_text(&nick),
                    msgid: meta.msgid,
                    parent: parent.map(|p| p.message_id),
                };
                self.hold(config, waiting).await;
                None
            }
            Event::Private { nick, userhost, text } => Some(self.private(&nick, &userhost, &text).await),
            Event::Joined => {
                self.gw.metrics.irc_joins.inc();
                self.back().await;
                None
            }
            Event::Disconnected => {
                self.connected.store(false, std::sync::atomic::Ordering::Relaxed);
                self.away_since.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert_with(now_ms);
                None
            }
            Event::Posted { key, msgid } => {
                let nick = {
                    let mut posters = self.posters.lock().unwrap_or_else(PoisonError::into_inner);
                    posters.iter().position(|(k, _)| *k == key).and_then(|i| posters.remove(i)).map(|(_, n)| n)
                };
                let carried = Carried { message_id: key.clone(), nick: nick.unwrap_or_default() };
                if let Err(e) =
                    self.gw.store.note_msgid(&msgid, &carried).and_then(|()| self.gw.store.note_posted(&key, &msgid))
                {
                    debug!(error = %e, "Cannot note a posted line's msgid.");
                }
                None
            }
        }
    }
}

impl IrcCore {
    /// `ADDRESS text` to the bot: relayed to that contact if they accept it
    /// (`allow_send`: they take part in the gateway both ways).
    async fn private(&self, nick: &str, userhost: &str, text: &str) -> String {
        let usage = "usage: /msg <bot> ADDRESS text (ADDRESS: a LATSSIAM address the gateway knows)".to_owned();
        let Some((address, body)) = text.trim().split_once(' ') else { return usage };
        // Who is asking, across nick changes and reconnections: the host of
        // the prefix (the user part is the client's to choose; the nick if
        // the server sent no host).
        let who = userhost.rsplit_once('@').map_or(nick, |(_, host)| host);
        // Every request counts, refused ones too: that also slows down guessing addresses.
        let verdict = self.limiter.lock().unwrap_or_else(PoisonError::into_inner).check(who, Instant::now());
        match verdict {
            Verdict::Relay => {}
            Verdict::SlowDown(n) => {
                info!(%nick, limit = n, "An IRC nick sends too many private messages; refused.");
                return format!("slow down: at most {n} messages a minute");
            }
            Verdict::Busy => {
                warn!(%nick, "Too many IRC nicks send private messages; one refused.");
                return "the gateway is busy; try later".into();
            }
        }
        let target = match self.gw.store.reach(address) {
            Ok(Reach::Contact { target, contact }) if contact.allow_send => target,
            Ok(_) => return format!("{address} is not someone this gateway relays to. {usage}"),
            Err(_) => return "the gateway cannot read its contacts now; try later".into(),
        };
        let person = match &target {
            Target::Latssiam { fingerprint, .. } => fingerprint.as_str(),
            Target::Smtp { rcpt } => rcpt.as_str(),
        };
        let share = self.gw.settings.gateway.max_per_origin_per_day;
        if !self.gw.origins.allow(&format!("{person}/irc:{who}"), share).await {
            info!(%nick, %who, "An IRC user has sent its daily share to one person; refused.");
            return format!("slow down: at most {share} messages a day to {address}");
        }
        let network = self.gw.settings.irc.channels.first().map_or("irc", |c| c.network.as_str());
        let m = private_message(nick, network, address, body, &mail::date_now());
        match self.gw.queue.enqueue(m.as_bytes(), vec![target], &Origin::Gateway).await {
            Ok(_) => format!("relayed to {address}"),
            Err(_) => "the gateway cannot queue messages now; try later".into(),
        }
    }
}

/// The digest line for a channel event, `[HH:MM:SS] <nick> text`, or `None`
/// for joins, parts, quits and topics unless `relay_joins`. The one place IRC
/// text enters a digest: cleaned of controls (again: the bot already does)
/// and kept within [`DIGEST_BUDGET`].
fn digest_line(
    kind: Kind,
    nick: &str,
    text: &str,
    relay_joins: bool,
    now: time::OffsetDateTime,
    answered: Option<&str>,
) -> Option<String> {
    let nick = bridge_irc::format::clean_text(nick);
    let text = bridge_irc::format::clean_text(text);
    let re = match answered.map(bridge_irc::format::clean_text) {
        Some(n) if !n.is_empty() => format!("(re {n}) "),
        Some(_) => "(reply) ".to_owned(),
        None => String::new(),
    };
    let line = match kind {
        Kind::Message => format!("<{nick}> {re}{text}"),
        Kind::Action => format!("* {nick} {text}"),
        Kind::Notice => format!("-{nick}- {text}"),
        _ if !relay_joins => return None,
        Kind::Join => format!("--> {nick} joined"),
        Kind::Part => format!("<-- {nick} left ({text})"),
        Kind::Quit => format!("<-- {nick} quit ({text})"),
        Kind::Topic => format!("*** {nick} set the topic: {text}"),
    };
    let mut line = format!("{} {line}", clock(now));
    let mut cut = line.len().min(DIGEST_BUDGET - 2);
    while !line.is_char_boundary(cut) {
        cut -= 1;
    }
    line.truncate(cut);
    Some(line)
}

/// The header fields of a digest that are not its channel's.
struct DigestHeader<'a> {
    message_id: &'a str,
    /// The channel's digest before this one.
    previous: Option<&'a str>,
    /// The messages its lines answer (IRCv3 replies).
    parents: &'a [&'a str],
    date: &'a str,
}

/// The Internet Message of one digest: in reply to the messages its lines
/// answer, else chained to the channel's previous digest.
fn digest_message(channel: &IrcChannel, lines: &[&str], h: &DigestHeader<'_>, mentions: usize) -> String {
    let mentioned = match mentions {
        0 => String::new(),
        1 => ", 1 names you".to_owned(),
        n => format!(", {n} name you"),
    };
    let mut m = format!(
        "From: \"{0}\" <{0}@{1}>\r\nTo: undisclosed-recipients:;\r\nSubject: {0} on {1}: {2} line{3}{mentioned}\r\nDate: {4}\r\nMessage-ID: {5}\r\n",
        channel.name,
        channel.network,
        lines.len(),
        if lines.len() == 1 { "" } else { "s" },
        h.date,
        h.message_id,
    );
    let references: Vec<&str> = h.previous.iter().copied().chain(h.parents.iter().copied()).collect();
    let in_reply_to = if h.parents.is_empty() { h.previous.into_iter().collect() } else { h.parents.to_vec() };
    if !in_reply_to.is_empty() {
        // One id per line (folded): eight ids of 252 octets stay within 998 a line.
        m.push_str(&format!(
            "In-Reply-To: {}\r\nReferences: {}\r\n",
            in_reply_to.join("\r\n "),
            references.join("\r\n ")
        ));
    }
    m.push_str(
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n",
    );
    for l in lines {
        m.push_str(l);
        m.push_str("\r\n");
    }
    m
}

/// The Internet Message relaying `/msg <bot> ADDRESS body` from `nick`:
/// nick and body cleaned of controls, the nick quoted where mail syntax needs it.
fn private_message(nick: &str, network: &str, address: &str, body: &str, date: &str) -> String {
    let nick = bridge_irc::format::clean_text(nick);
    let body = bridge_irc::format::clean_text(body);
    let display = nick.replace('\\', "\\\\").replace('"', "\\\"");
    let local = if is_dot_atom(&nick) { nick.clone() } else { format!("\"{display}\"") };
    format!(
        "From: \"{display}\" <{local}@{network}>\r\nTo: <{address}>\r\nSubject: IRC message from {nick}\r\nDate: {date}\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{body}\r\n"
    )
}

/// RFC 5322 dot-atom (ASCII).
fn is_dot_atom(s: &str) -> bool {
    let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c);
    !s.is_empty() && s.split('.').all(|atom| !atom.is_empty() && atom.chars().all(atext))
}

/// Most nicks [`PrivateLimiter`] follows at once.
const MAX_LIMITED_NICKS: usize = 10_000;
const MINUTE: Duration = Duration::from_secs(60);

/// What [`PrivateLimiter::check`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Relay it (it was counted).
    Relay,
    /// The nick already had this many in the last minute.
    SlowDown(u32),
    /// Too many nicks are followed already.
    Busy,
}

/// Private messages relayed per IRC nick over a rolling minute. Bounded: a
/// nick silent for a minute is forgotten, and at most [`MAX_LIMITED_NICKS`]
/// are followed (each with at most `per_minute` instants).
struct PrivateLimiter {
    /// 0: no limit.
    per_minute: u32,
    seen: HashMap<String, VecDeque<Instant>>,
    swept: Option<Instant>,
}

impl PrivateLimiter {
    fn new(per_minute: u32) -> Self {
        Self { per_minute, seen: HashMap::new(), swept: None }
    }

    /// Whether `nick` may have one more message relayed at `now`; counts it if so.
    fn check(&mut self, nick: &str, now: Instant) -> Verdict {
        if self.per_minute == 0 {
            return Verdict::Relay;
        }
        let recent = |t: &Instant| now.saturating_duration_since(*t) < MINUTE;
        if self.seen.len() >= MAX_LIMITED_NICKS || self.swept.is_none_or(|s| now.saturating_duration_since(s) >= MINUTE)
        {
            self.seen.retain(|_, times| times.back().is_some_and(recent));
            self.swept = Some(now);
        }
        let key = irc_lowercase(nick);
        if !self.seen.contains_key(&key) && self.seen.len() >= MAX_LIMITED_NICKS {
            return Verdict::Busy;
        }
        let times = self.seen.entry(key).or_default();
        while times.front().is_some_and(|t| !recent(t)) {
            times.pop_front();
        }
        if times.len() >= self.per_minute as usize {
            return Verdict::SlowDown(self.per_minute);
        }
        times.push_back(now);
        Verdict::Relay
    }
}

/// A nick as IRC compares them (RFC 1459 case mapping).
fn irc_lowercase(nick: &str) -> String {
    nick.chars()
        .map(|c| match c {
            '[' => '{',
            ']' => '}',
            '\\' => '|',
            '~' => '^',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

/// `#name@network`.
pub fn channel_address(channel: &IrcChannel) -> String {
    format!("{}@{}", channel.name, channel.network)
}

/// A `subscribe #channel@network` or `unsubscribe #channel@network` subject
/// from a contact, sent to the gateway itself: applies it and returns the
/// answer to send back. `None` if the subject is not such a command.
pub async fn subscription_command(gw: &Gateway, sender: &Contact, subject: &str) -> Option<Result<String, String>> {
    let (verb, what) = subject.trim().split_once(' ')?;
    let what = what.trim();
    let (mode, what) = match verb.to_ascii_lowercase().as_str() {
        "subscribe" => match what.split_once(' ') {
            Some((m, rest)) if m.eq_ignore_ascii_case("mentions") => (Subscription::Mentions, rest.trim()),
            _ => (Subscription::All, what),
        },
        "unsubscribe" => (Subscription::Off, what),
        _ => return None,
    };
    let Some((name, network)) = what.rsplit_once('@') else {
        return Some(Err(format!("{what:?} is not #channel@network")));
    };
    let Some(channel) = gw.settings.irc.channel(name, network) else {
        return Some(Err(format!("{what} is not a channel this gateway bridges")));
    };
    match gw.store.set_subscription(&channel_address(channel), &sender.address, mode).await {
        Ok(()) => Some(Ok(format!(
            "{} {} {}{}.",
            sender.address,
            match mode {
                Subscription::Off => "is no longer subscribed to",
                Subscription::All | Subscription::Mentions => "is now subscribed to",
            },
            channel_address(channel),
            if mode == Subscription::Mentions { " (only the lines that name them)" } else { "" },
        ))),
        Err(e) => Some(Err(format!("the gateway cannot record it now ({e}); try again later"))),
    }
}

/// The IRC side of a message from a LATSSIAM contact: what to post where,
/// or (inner `Err`) the reason to refuse it (a channel the sender does not
/// subscribe to).
///
/// # Errors
/// [`StoreError`] if the subscriptions cannot be read: a local problem, not
/// a reason to refuse the message.
pub fn posts_for(
    gw: &Gateway,
    sender: &Contact,
    recipients: &[String],
    message: &Message<'_>,
) -> Result<Result<Vec<IrcPost>, String>, StoreError> {
    irc_posts(&gw.settings.irc, sender, recipients, message, |c| {
        gw.store.subscribers(&channel_address(c), &c.subscribers)
    })
}

/// [`posts_for`] with the settings and the subscribers of a channel given:
/// everything it decides, without the store (for tests and fuzzing).
///
/// # Errors
/// What `subscribers` returns.
pub fn irc_posts(
    irc: &IrcSettings,
    sender: &Contact,
    recipients: &[String],
    message: &Message<'_>,
    subscribers: impl Fn(&IrcChannel) -> Result<Vec<String>, StoreError>,
) -> Result<Result<Vec<IrcPost>, String>, StoreError> {
    let mut posts = Vec::new();
    let mut lines: Option<IrcPost> = None;
    for r in recipients {
        let Some((local, host)) = r.rsplit_once('@') else { continue };
        if !irc.is_network(host) {
            continue;
        }
        let target = if is_channel(local) {
            let Some(channel) = irc.channel(local, host) else {
                return Ok(Err(format!("{r} is not a bridged channel")));
            };
            if !subscribers(channel)?.iter().any(|s| s.eq_ignore_ascii_case(&sender.address)) {
                return Ok(Err(format!("{} does not subscribe to {r}", sender.address)));
            }
            channel.name.clone()
        } else if is_service(local) {
            return Ok(Err(format!("{r} is an IRC service; the gateway does not talk to services")));
        } else if is_nick(local) {
            local.to_owned()
        } else {
            return Ok(Err(format!("{r} is neither a bridged channel nor a valid IRC nick")));
        };
        let post = lines.get_or_insert_with(|| post_for(irc, sender, message)).clone();
        posts.push(IrcPost { target, ..post });
    }
    Ok(Ok(posts))
}

/// Whether `name` is an IRC channel (any of the prefixes `#`, `&`, `+`, `!`).
fn is_channel(name: &str) -> bool {
    name.starts_with(['#', '&', '+', '!'])
}

/// Whether `nick` is a valid IRC nick (RFC 2812's characters, at most 30):
/// never a channel, a target list or anything else a server would read as more.
fn is_nick(nick: &str) -> bool {
    let special = |c: char| "[]\\`_^{|}".contains(c);
    let mut chars = nick.chars();
    nick.len() <= 30
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic() || special(c))
        && chars.all(|c| c.is_ascii_alphanumeric() || special(c) || c == '-')
}

/// Whether `nick` names an IRC service (NickServ, ChanServ, ...), which
/// would take a post as a command from the bot's account.
fn is_service(nick: &str) -> bool {
    let nick = nick.to_ascii_lowercase();
    nick.ends_with("serv") || ["global", "alis", "q", "x"].contains(&nick.as_str())
}

/// The name a contact is shown under on IRC: the display name of their
/// certificate, else the local part of their address.
fn irc_name(contact: &Contact) -> String {
    CertInfo::from_der(&contact.cert)
        .ok()
        .and_then(|i| i.display_name)
        .unwrap_or_else(|| contact.address.split('@').next().unwrap_or("someone").to_owned())
}

/// Most quoted lines of a message kept to find the digest line it answers, and their length.
const MAX_QUOTED: usize = 32;
const MAX_QUOTED_LEN: usize = 2048;

/// The post for a message (its target left empty): the text body without
/// quoted lines and signature, empty lines dropped, each in `line_format`;
/// beyond `max_lines` the first `max_lines` and, for the outbox to make
/// into a link, the whole text. Also what the outbox needs to post it as
/// an IRCv3 reply: the messages it answers and the lines it quotes.
fn post_for(irc: &IrcSettings, sender: &Contact, message: &Message<'_>) -> IrcPost {
    let text = message
        .body_text(0)
        .map_or_else(|| String::from_utf8_lossy(message.raw_message()).into_owned(), |t| t.into_owned());
    let mut lines: Vec<&str> = Vec::new();
    let mut quoted = Vec::new();
    for line in text.lines() {
        if line == "-- " {
            break;
        }
        let line = line.trim_end();
        if let Some(q) = line.strip_prefix('>') {
            if quoted.len() < MAX_QUOTED && q.len() <= MAX_QUOTED_LEN {
                quoted.push(q.strip_prefix(' ').unwrap_or(q).to_owned());
            }
            continue;
        }
        if line.is_empty() {
            continue;
        }
        lines.push(line);
    }
    let name = irc_name(sender);
    let shown_name = if irc.zero_width_names { bridge_irc::format::defang(&name) } else { name.clone() };
    let max = irc.max_lines.max(1);
    let format = |line: &str| irc.line_format.replace("{name}", &shown_name).replace("{line}", line);
    let out: Vec<String> = lines.iter().take(max).map(|l| format(l)).collect();
    let parents: Vec<String> = message
        .in_reply_to()
        .as_text_list()
        .into_iter()
        .flatten()
        .chain(message.references().as_text_list().into_iter().flatten().rev())
        .filter_map(|id| msg_id(id))
        .take(MAX_PARENTS)
        .collect();
    // The paste holds what the lines are cut from: no quoted lines, no signature, no header.
    let whole = (lines.len() > max).then(|| {
        let mut whole = String::new();
        for l in &lines {
            if whole.len() + l.len() + 1 > MAX_PASTE {
                whole.push_str("[cut: longer than a paste keeps]\n");
                break;
            }
            whole.push_str(l);
            whole.push('\n');
        }
        (lines.len() - max, whole)
    });
    IrcPost {
        target: String::new(),
        lines: out,
        more: whole,
        parents,
        quoted,
        message_id: message.message_id().and_then(msg_id),
        name: shown_name,
    }
}

/// Most octets of text one paste keeps.
const MAX_PASTE: usize = 256 * 1024;

/// `<id>` if `id` (with or without its angle brackets) is a plain msg-id
/// (`left@right` of printable ASCII, no space, at most 250 octets): the
/// only form that goes into a digest's `In-Reply-To` or the reply map.
fn msg_id(id: &str) -> Option<String> {
    let id = id.trim().trim_start_matches('<').trim_end_matches('>');
    let plain = !id.is_empty()
        && id.len() <= 250
        && id.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'<' | b'>' | b'"' | b'\\'))
        && id.split_once('@').is_some_and(|(l, r)| !l.is_empty() && !r.is_empty());
    plain.then(|| format!("<{id}>"))
}

/// The line that stands for the `more` lines of a long post: a link to its
/// whole text on the gateway's Gemini capsule (and public HTTP listener),
/// or, where neither is on, how many lines were cut.
async fn more_line(gw: &Gateway, post: &IrcPost, more: usize, text: &str) -> String {
    let irc = &gw.settings.irc;
    let said = |what: &str| irc.line_format.replace("{name}", &post.name).replace("{line}", what);
    let host = &gw.settings.gateway.hostname;
    let gemini = match gw.settings.gemini.listen.rsplit_once(':') {
        Some((_, "1965")) => Some(format!("gemini://{host}/paste/")),
        Some((_, port)) => Some(format!("gemini://{host}:{port}/paste/")),
        None => None,
    };
    let https = (!gw.settings.http.public_listen.is_empty()).then(|| format!("https://{host}/paste/"));
    if gemini.is_none() && https.is_none() {
        return said(&format!("[{more} more lines cut]"));
    }
    match gw.store.paste(text, irc.paste_days).await {
        Ok(token) => {
            let links: Vec<String> = gemini.into_iter().chain(https).map(|base| format!("{base}{token}")).collect();
            said(&format!("[{more} more lines: {}]", links.join(" ")))
        }
        Err(e) => {
            warn!(error = %e, "Cannot keep the whole text of a long IRC post; it is cut.");
            said(&format!("[{more} more lines cut]"))
        }
    }
}

/// Posts the outbox in order while the bot is in its channels; runs until `shutdown`.
pub async fn outbox(gw: Arc<Gateway>, core: Arc<IrcCore>, mut handle: Handle, shutdown: CancellationToken) {
    loop {
        let next = tokio::select! {
            n = gw.queue.next_post() => n,
            () = shutdown.cancelled() => return,
        };
        let (ticket, mut post) = match next {
            Ok(Some(n)) => n,
            Ok(None) => continue,
            Err(e) => {
                warn!(error = %e, "Cannot read the IRC outbox.");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    () = shutdown.cancelled() => return,
                }
            }
        };
        if let Some((more, text)) = post.more.take() {
            let line = more_line(&gw, &post, more, &text).await;
            post.lines.push(line);
        }
        let reply_to = post.parents.iter().find_map(|p| gw.store.reply_msgid(p, &post.quoted).ok().flatten());
        if let Some(id) = &post.message_id {
            let mut posters = core.posters.lock().unwrap_or_else(PoisonError::into_inner);
            if posters.len() >= 64 {
                posters.pop_front();
            }
            posters.push_back((id.clone(), post.name.clone()));
        }
        let target = post.target.clone();
        let sending = async {
            handle.ready().await;
            handle.post_tagged(&post.target, post.lines, reply_to, post.message_id).await.is_ok()
        };
        let mut sending = std::pin::pin!(sending);
        let alive_every = super::queue::POST_ACK_WAIT / 3;
        let posted = loop {
            tokio::select! {
                r = &mut sending => break r,
                () = tokio::time::sleep(alive_every) => ticket.alive().await,
                () = shutdown.cancelled() => break false,
            }
        };
        if posted {
            info!(target_name = %target, "Posted to IRC.");
        }
        if let Err(e) = ticket.done(posted).await {
            warn!(error = %e, "Cannot mark a post for IRC done; it may be posted again.");
        }
        if shutdown.is_cancelled() {
            return;
        }
        if !posted {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Runs the IRC bot, with the outbox and the digests, until `shutdown`: at
/// once with one node; with `queue.backend = "jetstream"` only while this
/// node holds the lease `irc` (one bot per network across the cluster).
pub async fn run(gw: Arc<Gateway>, config: bridge_irc::IrcConfig, shutdown: CancellationToken) {
    let Some(shared) = gw.cluster.clone() else {
        bot(gw, config, shutdown).await;
        return;
    };
    let holder = format!("{}-{}", gw.settings.gateway.hostname, std::process::id());
    // The bucket's own lease time (made by the first node, with its irc.lease_secs).
    let ttl = shared.lease_ttl();
    loop {
        let Some(mut revision) = shared.lease("irc", &holder, None).await else {
            tokio::select! {
                () = tokio::time::sleep(ttl / 3) => continue,
                () = shutdown.cancelled() => return,
            }
        };
        info!(holder = %holder, "This node holds the IRC lease: it runs the bot.");
        let lead = shutdown.child_token();
        let mut task = tokio::spawn(bot(Arc::clone(&gw), config.clone(), lead.clone()));
        // Renewed every third of its time, until shutdown, its loss, or the bot's end.
        let bot_ended = loop {
            tokio::select! {
                () = tokio::time::sleep(ttl / 3) => {}
                () = shutdown.cancelled() => break false,
                _ = &mut task => break true,
            }
            match shared.lease("irc", &holder, Some(revision)).await {
                Some(r) => revision = r,
                None => {
                    warn!("Lost the IRC lease; stopping the bot here (another node runs it).");
                    break false;
                }
            }
        };
        lead.cancel();
        if bot_ended {
            // The bot gave up here (refused nick or SASL): another node gets the first chance.
            warn!("The IRC bot ended on this node; giving the lease up.");
            shared.release_lease("irc", revision).await;
            tokio::select! {
                () = tokio::time::sleep(ttl) => continue,
                () = shutdown.cancelled() => return,
            }
        }
        let _ = task.await;
        if shutdown.is_cancelled() {
            shared.release_lease("irc", revision).await;
            return;
        }
    }
}

/// The bot with its outbox and digests, until `shutdown` or until the bot
/// itself gives up (then the outbox and digests stop with it).
async fn bot(gw: Arc<Gateway>, config: bridge_irc::IrcConfig, shutdown: CancellationToken) {
    let helpers = shutdown.child_token();
    let core = IrcCore::new(Arc::clone(&gw));
    let (handle, bot) = bridge_irc::spawn(config, Arc::clone(&core), shutdown.clone());
    let digests = tokio::spawn(Arc::clone(&core).digest_timer(helpers.clone()));
    let posts = tokio::spawn(outbox(gw, core, handle, helpers.clone()));
    match bot.await {
        Ok(Err(e)) => tracing::error!(error = %e, "The IRC bot stopped; email keeps working."),
        Err(e) => tracing::error!(error = %e, "The IRC bot failed."),
        Ok(Ok(())) => {}
    }
    helpers.cancel();
    let _ = digests.await;
    let _ = posts.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel() -> IrcChannel {
        IrcChannel {
            name: "#chat".into(),
            key: String::new(),
            network: "irc.example.org".into(),
            subscribers: Vec::new(),
            digest_window: 60,
            relay_joins: true,
        }
    }

    fn at_noon() -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp(1_714_566_896).unwrap()
    }

    fn waiting(line: String) -> WaitingLine {
        WaitingLine { heard_ms: 1, line, text: String::new(), nick: String::new(), msgid: None, parent: None }
    }

    #[test]
    fn a_busy_window_becomes_several_digests_that_each_fit() {
        let text = "x".repeat(480);
        let mut digest = Digest::default();
        let mut messages = Vec::new();
        let mut sent = 0;
        let mut held: Vec<String> = Vec::new();
        let mut previous: Option<String> = None;
        let mut flush = |held: &mut Vec<String>, messages: &mut Vec<String>, sent: &mut usize| {
            let lines: Vec<&str> = held.iter().map(String::as_str).collect();
            *sent += lines.len();
            let id = format!("<irc.{}.chat@gw.example>", messages.len());
            let date = mail::date_now();
            let h = DigestHeader { message_id: &id, previous: previous.as_deref(), parents: &[], date: &date };
            messages.push(digest_message(&channel(), &lines, &h, 0));
            previous = Some(id);
            held.clear();
        };
        for i in 0..1000 {
            let line = digest_line(Kind::Message, &format!("nick{i}"), &text, false, at_noon(), None).unwrap();
            if !digest.fits(&line) {
                flush(&mut held, &mut messages, &mut sent);
                digest = Digest::default();
            }
            digest.push(&waiting(line.clone()));
            held.push(line);
        }
        flush(&mut held, &mut messages, &mut sent);
        assert_eq!(sent, 1000);
        assert!(messages.len() > 1);
        for m in &messages {
            assert!(m.len() <= MAX_PLAINTEXT, "{}", m.len());
        }
        assert!(messages[1].contains("In-Reply-To: <irc.0.chat@gw.example>\r\n"));
        // One enormous line alone still fits.
        let huge = digest_line(Kind::Message, "n", &"é".repeat(20_000), false, at_noon(), None).unwrap();
        assert!(huge.len() <= DIGEST_BUDGET - 2);
        assert!(Digest::default().fits(&huge));
    }

    #[test]
    fn a_digest_answers_the_messages_its_lines_reply_to_and_marks_mentions() {
        let line = digest_line(Kind::Message, "carl", "yes, alice", false, at_noon(), Some("alice")).unwrap();
        assert_eq!(line, "[12:34:56] <carl> (re alice) yes, alice");
        let date = mail::date_now();
        let h = DigestHeader {
            message_id: "<d2@gw>",
            previous: Some("<d1@gw>"),
            parents: &["<alice1@example.org>"],
            date: &date,
        };
        let marked = mark(&line, true);
        assert_eq!(marked, "[12:34:56] (@) <carl> (re alice) yes, alice");
        let m = digest_message(&channel(), &[&marked], &h, 1);
        assert!(
            m.contains("In-Reply-To: <alice1@example.org>\r\nReferences: <d1@gw>\r\n <alice1@example.org>\r\n"),
            "{m}"
        );
        // Only plain msg-ids become parents: nothing that could fold or smuggle a header field.
        assert_eq!(msg_id(" <a.b@example.org> ").as_deref(), Some("<a.b@example.org>"));
        for bad in ["a\rX-Injected: y@x", "a b@x", "no-at-sign", "@x", "a@", &format!("{}@x", "a".repeat(250)), "a\"@x"]
        {
            assert_eq!(msg_id(bad), None, "{bad:?}");
        }
        assert!(m.contains("Subject: #chat on irc.example.org: 1 line, 1 names you\r\n"), "{m}");
        for (text, name, yes) in [
            ("alice: look", "alice", true),
            ("hey Alice!", "alice", true),
            ("Alice Liddell, see", "alice liddell", true),
            ("malice aforethought", "alice", false),
            ("alice_bot said", "alice", false),
            ("", "alice", false),
            ("anything", " ", false),
        ] {
            // As queue_digests gives them: both lower-cased, the name trimmed.
            assert_eq!(mentions(&text.to_lowercase(), &name.trim().to_lowercase()), yes, "{text:?} {name:?}");
        }
    }

    #[test]
    fn no_control_character_reaches_a_digest_or_a_private_message() {
        let line = digest_line(Kind::Topic, "ev\ril", "a\rb\nc\0d\x1be\x0304f\tg", true, at_noon(), None).unwrap();
        assert_eq!(line, "[12:34:56] *** ev il set the topic: a b cdef\tg");
        for kind in [Kind::Message, Kind::Action, Kind::Notice, Kind::Join, Kind::Part, Kind::Quit] {
            let line = digest_line(kind, "n\r", "t\rx\u{85}", true, at_noon(), None).unwrap();
            assert!(!line.chars().any(char::is_control), "{line:?}");
        }
        assert_eq!(digest_line(Kind::Join, "n", "", false, at_noon(), None), None);
        let m = private_message("we\"ird\\\r", "irc.example.org", "alice@example.org", "hi\rthere\x07", "DATE");
        assert_eq!(m.matches('\r').count(), m.matches("\r\n").count(), "no bare CR: {m:?}");
        assert!(m.starts_with("From: \"we\\\"ird\\\\ \" <\"we\\\"ird\\\\ \"@irc.example.org>\r\n"), "{m}");
        assert!(m.ends_with("\r\n\r\nhi there\r\n"), "{m}");
        let m = private_message("carl", "irc.example.org", "alice@example.org", "hi", "DATE");
        assert!(m.starts_with("From: \"carl\" <carl@irc.example.org>\r\n"), "{m}");
    }

    #[test]
    fn every_channel_prefix_is_a_channel_and_nicks_are_checked() {
        for c in ["#chat", "&local", "+modeless", "!12345safe"] {
            assert!(is_channel(c), "{c}");
            assert!(!is_nick(c), "{c}");
        }
        for n in ["alice", "[away]", "bob-2", "^_`{|}\\", &"a".repeat(30)] {
            assert!(is_nick(n), "{n}");
        }
        for n in ["", "2alice", "-x", "a,#secret", "a b", "a:b", "alice\r", "a@b", "é", &"a".repeat(31)] {
            assert!(!is_nick(n), "{n}");
        }
        assert!(is_service("NickServ") && is_service("chanserv") && is_service("Q"));
        assert!(!is_service("alice"));
    }

    #[test]
    fn the_private_message_limit_rolls_and_stays_bounded() {
        let t0 = Instant::now();
        let mut l = PrivateLimiter::new(3);
        for _ in 0..3 {
            assert_eq!(l.check("Carl", t0), Verdict::Relay);
        }
        assert_eq!(l.check("carl", t0 + Duration::from_secs(10)), Verdict::SlowDown(3));
        assert_eq!(l.check("dave", t0 + Duration::from_secs(10)), Verdict::Relay);
        // Rolling: a minute after the first three, carl may again.
        assert_eq!(l.check("CARL", t0 + Duration::from_secs(59)), Verdict::SlowDown(3));
        assert_eq!(l.check("carl", t0 + Duration::from_secs(60)), Verdict::Relay);
        // The RFC 1459 case mapping: [ and { are the same nick.
        let mut l = PrivateLimiter::new(1);
        assert_eq!(l.check("a[b", t0), Verdict::Relay);
        assert_eq!(l.check("A{B", t0), Verdict::SlowDown(1));
        // Bounded: at most MAX_LIMITED_NICKS active nicks; idle ones are forgotten.
        let mut l = PrivateLimiter::new(5);
        for i in 0..MAX_LIMITED_NICKS {
            assert_eq!(l.check(&format!("n{i}"), t0), Verdict::Relay);
        }
        assert_eq!(l.check("late", t0 + Duration::from_secs(1)), Verdict::Busy);
        assert_eq!(l.check("n0", t0 + Duration::from_secs(1)), Verdict::Relay);
        assert_eq!(l.check("late", t0 + Duration::from_secs(61)), Verdict::Relay);
        assert_eq!(l.seen.len(), 1, "only late; n0 went idle a minute ago");
        // 0: no limit, nothing kept.
        let mut l = PrivateLimiter::new(0);
        for _ in 0..100 {
            assert_eq!(l.check("carl", t0), Verdict::Relay);
        }
        assert!(l.seen.is_empty());
    }
}
