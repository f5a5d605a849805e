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
use super::mail;
use super::mail::MAX_PLAINTEXT;
use super::outbox::IrcPost;
use super::queue::{message_id_string, Origin, Target};
use super::Gateway;

/// Most octets of digest lines in one message: what a LATSSIAM message
/// carries, less room for the header section.
const DIGEST_BUDGET: usize = MAX_PLAINTEXT - 2000;

#[derive(Default)]
struct Digest {
    lines: Vec<String>,
    /// Octets the lines take in the body (each with its CRLF).
    body_len: usize,
    since: Option<tokio::time::Instant>,
    last_message_id: Option<String>,
}

impl Digest {
    /// Whether `line` still fits in this digest (a first line always does:
    /// [`digest_line`] keeps each within the budget).
    fn fits(&self, line: &str) -> bool {
        self.lines.is_empty() || self.body_len + line.len() + 2 <= DIGEST_BUDGET
    }

    fn push(&mut self, line: String) {
        self.body_len += line.len() + 2;
        self.lines.push(line);
        self.since.get_or_insert_with(tokio::time::Instant::now);
    }

    /// The lines gathered, leaving the digest empty (its chain kept).
    fn take(&mut self) -> Vec<String> {
        self.body_len = 0;
        self.since = None;
        std::mem::take(&mut self.lines)
    }
}

/// The gateway as the bot's sink.
pub struct IrcCore {
    gw: Arc<Gateway>,
    digests: Mutex<HashMap<String, Digest>>,
    limiter: std::sync::Mutex<PrivateLimiter>,
}

impl IrcCore {
    /// A sink for the bot.
    pub fn new(gw: Arc<Gateway>) -> Arc<Self> {
        let limiter = std::sync::Mutex::new(PrivateLimiter::new(gw.settings.irc.private_messages_per_minute));
        Arc::new(Self { gw, digests: Mutex::default(), limiter })
    }

    fn channel(&self, name: &str) -> Option<&IrcChannel> {
        self.gw.settings.irc.channels.iter().find(|c| c.name.eq_ignore_ascii_case(name))
    }

    /// Queues the lines gathered for `channel` as one message to its subscribers.
    async fn flush(&self, channel: &IrcChannel, digest: &mut Digest) {
        if digest.lines.is_empty() {
            return;
        }
        let lines = digest.take();
        let mut targets = Vec::new();
        let subscribers = match self.gw.store.subscribers(&channel_address(channel), &channel.subscribers) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "Cannot read the subscribers; using the configured ones.");
                channel.subscribers.clone()
            }
        };
        for address in &subscribers {
            match self.gw.store.reach(address) {
                Ok(Reach::Contact { target, .. }) => targets.push(target),
                Ok(Reach::Unknown) => {
                    warn!(%address, channel = %channel.name, "A subscriber is not a contact; skipped.")
                }
                Ok(Reach::Gone) => {
                    debug!(%address, channel = %channel.name, "A subscriber's mailbox is gone; skipped.")
                }
                Err(e) => warn!(error = %e, "Cannot read contacts."),
            }
        }
        if targets.is_empty() {
            return;
        }
        let Ok(id) = self.gw.queue.new_message_id() else { return };
        let hostname = &self.gw.settings.gateway.hostname;
        let message_id =
            format!("<irc.{}.{}@{hostname}>", message_id_string(id), channel.name.trim_start_matches(['#', '&']));
        let m = digest_message(channel, &lines, &message_id, digest.last_message_id.as_deref(), &mail::date_now());
        match self.gw.queue.enqueue_as(id, m.as_bytes(), targets, &Origin::Gateway).await {
            Ok(()) => {
                digest.last_message_id = Some(message_id);
                self.gw.metrics.irc_lines_queued.inc_by(lines.len() as u64);
                self.gw.metrics.irc_digests_queued.inc();
            }
            Err(e) => warn!(error = %e, channel = %channel.name, "Cannot queue an IRC digest; its lines are lost."),
        }
    }

    /// Flushes every digest whose window has passed; runs until `shutdown`, then flushes all.
    pub async fn digest_timer(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            let stopping = tokio::select! {
                _ = tick.tick() => false,
                () = shutdown.cancelled() => true,
            };
            let mut digests = self.digests.lock().await;
            for channel in &self.gw.settings.irc.channels {
                let Some(d) = digests.get_mut(&channel.name.to_ascii_lowercase()) else { continue };
                let due = d.since.is_some_and(|s| s.elapsed() >= Duration::from_secs(channel.digest_window));
                if due || stopping {
                    self.flush(channel, d).await;
                }
            }
            if stopping {
                return;
            }
        }
    }
}

impl IrcSink for IrcCore {
    async fn event(&self, event: Event) -> Option<String> {
        match event {
            Event::Channel { channel, nick, kind, text } => {
                let config = self.channel(&channel)?;
                let now = time::OffsetDateTime::now_utc();
                let line = digest_line(kind, &nick, &text, config.relay_joins, now)?;
                self.gw.metrics.irc_lines_heard.inc();
                let mut digests = self.digests.lock().await;
                let d = digests.entry(config.name.to_ascii_lowercase()).or_default();
                if !d.fits(&line) {
                    // A busy window: send what fits one message now, go on in the next (chained).
                    self.flush(config, d).await;
                }
                d.push(line);
                if config.digest_window == 0 {
                    self.flush(config, d).await;
                }
                None
            }
            Event::Private { nick, userhost, text } => Some(self.private(&nick, &userhost, &text).await),
            Event::Joined => {
                self.gw.metrics.irc_joins.inc();
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
fn digest_line(kind: Kind, nick: &str, text: &str, relay_joins: bool, now: time::OffsetDateTime) -> Option<String> {
    let nick = bridge_irc::format::clean_text(nick);
    let text = bridge_irc::format::clean_text(text);
    let line = match kind {
        Kind::Message => format!("<{nick}> {text}"),
        Kind::Action => format!("* {nick} {text}"),
        Kind::Notice => format!("-{nick}- {text}"),
        _ if !relay_joins => return None,
        Kind::Join => format!("--> {nick} joined"),
        Kind::Part => format!("<-- {nick} left ({text})"),
        Kind::Quit => format!("<-- {nick} quit ({text})"),
        Kind::Topic => format!("*** {nick} set the topic: {text}"),
    };
    let mut line = format!("[{:02}:{:02}:{:02}] {line}", now.hour(), now.minute(), now.second());
    let mut cut = line.len().min(DIGEST_BUDGET - 2);
    while !line.is_char_boundary(cut) {
        cut -= 1;
    }
    line.truncate(cut);
    Some(line)
}

/// The Internet Message of one digest, chained to `previous`.
fn digest_message(
    channel: &IrcChannel,
    lines: &[String],
    message_id: &str,
    previous: Option<&str>,
    date: &str,
) -> String {
    let mut m = format!(
        "From: \"{0}\" <{0}@{1}>\r\nTo: undisclosed-recipients:;\r\nSubject: {0} on {1}: {2} line{3}\r\nDate: {date}\r\nMessage-ID: {message_id}\r\n",
        channel.name,
        channel.network,
        lines.len(),
        if lines.len() == 1 { "" } else { "s" },
    );
    if let Some(previous) = previous {
        m.push_str(&format!("In-Reply-To: {previous}\r\nReferences: {previous}\r\n"));
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
    let on = match verb.to_ascii_lowercase().as_str() {
        "subscribe" => true,
        "unsubscribe" => false,
        _ => return None,
    };
    let what = what.trim();
    let Some((name, network)) = what.rsplit_once('@') else {
        return Some(Err(format!("{what:?} is not #channel@network")));
    };
    let Some(channel) = gw.settings.irc.channel(name, network) else {
        return Some(Err(format!("{what} is not a channel this gateway bridges")));
    };
    match gw.store.set_subscription(&channel_address(channel), &sender.address, on).await {
        Ok(()) => Some(Ok(format!(
            "{} {} {}.",
            sender.address,
            if on { "is now subscribed to" } else { "is no longer subscribed to" },
            channel_address(channel)
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
    let mut lines: Option<Vec<String>> = None;
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
        let lines = lines.get_or_insert_with(|| lines_for(irc, sender, message)).clone();
        posts.push(IrcPost { target, lines });
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

/// The lines to post: the text body without quoted lines and signature,
/// empty lines dropped, at most `max_lines` (the last then says how many
/// were cut), each in `line_format`.
fn lines_for(irc: &IrcSettings, sender: &Contact, message: &Message<'_>) -> Vec<String> {
    let text = message
        .body_text(0)
        .map_or_else(|| String::from_utf8_lossy(message.raw_message()).into_owned(), |t| t.into_owned());
    let mut lines: Vec<&str> = Vec::new();
    for line in text.lines() {
        if line == "-- " {
            break;
        }
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('>') {
            continue;
        }
        lines.push(line);
    }
    let name = CertInfo::from_der(&sender.cert)
        .ok()
        .and_then(|i| i.display_name)
        .unwrap_or_else(|| sender.address.split('@').next().unwrap_or("someone").to_owned());
    let name = if irc.zero_width_names { bridge_irc::format::defang(&name) } else { name };
    let max = irc.max_lines.max(1);
    let mut out: Vec<String> = Vec::new();
    let shown = if lines.len() > max { max - 1 } else { lines.len() };
    for line in &lines[..shown] {
        out.push(irc.line_format.replace("{name}", &name).replace("{line}", line));
    }
    if lines.len() > shown {
        let cut = lines.len() - shown;
        out.push(irc.line_format.replace("{name}", &name).replace("{line}", &format!("[{cut} more lines cut]")));
    }
    out
}

/// Posts the outbox in order while the bot is in its channels; runs until `shutdown`.
pub async fn outbox(gw: Arc<Gateway>, mut handle: Handle, shutdown: CancellationToken) {
    loop {
        let next = tokio::select! {
            n = gw.queue.next_post() => n,
            () = shutdown.cancelled() => return,
        };
        let (key, post) = match next {
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
        let sending = async {
            handle.ready().await;
            handle.post(&post.target, post.lines).await.is_ok()
        };
        let mut sending = std::pin::pin!(sending);
        let alive_every = super::queue::jetstream::IRC_ACK_WAIT / 3;
        let posted = loop {
            tokio::select! {
                r = &mut sending => break r,
                () = tokio::time::sleep(alive_every) => gw.queue.post_alive(&key).await,
                () = shutdown.cancelled() => break false,
            }
        };
        if posted {
            info!(target_name = %post.target, "Posted to IRC.");
        }
        if let Err(e) = gw.queue.post_done(key, posted).await {
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
    let Some(shared) = gw.queue.jetstream().cloned() else {
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
    let digests = tokio::spawn(core.digest_timer(helpers.clone()));
    let posts = tokio::spawn(outbox(gw, handle, helpers.clone()));
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

    #[test]
    fn a_busy_window_becomes_several_digests_that_each_fit() {
        let text = "x".repeat(480);
        let mut digest = Digest::default();
        let mut messages = Vec::new();
        let mut sent = 0;
        let mut previous: Option<String> = None;
        let mut flush = |d: &mut Digest, messages: &mut Vec<String>, sent: &mut usize| {
            let lines = d.take();
            *sent += lines.len();
            let id = format!("<irc.{}.chat@gw.example>", messages.len());
            messages.push(digest_message(&channel(), &lines, &id, previous.as_deref(), &mail::date_now()));
            previous = Some(id);
        };
        for i in 0..1000 {
            let line = digest_line(Kind::Message, &format!("nick{i}"), &text, false, at_noon()).unwrap();
            if !digest.fits(&line) {
                flush(&mut digest, &mut messages, &mut sent);
            }
            digest.push(line);
        }
        flush(&mut digest, &mut messages, &mut sent);
        assert_eq!(sent, 1000);
        assert!(messages.len() > 1);
        for m in &messages {
            assert!(m.len() <= MAX_PLAINTEXT, "{}", m.len());
        }
        assert!(messages[1].contains("In-Reply-To: <irc.0.chat@gw.example>\r\n"));
        // One enormous line alone still fits.
        let huge = digest_line(Kind::Message, "n", &"é".repeat(20_000), false, at_noon()).unwrap();
        assert!(huge.len() <= DIGEST_BUDGET - 2);
        assert!(Digest::default().fits(&huge));
    }

    #[test]
    fn no_control_character_reaches_a_digest_or_a_private_message() {
        let line = digest_line(Kind::Topic, "ev\ril", "a\rb\nc\0d\x1be\x0304f\tg", true, at_noon()).unwrap();
        assert_eq!(line, "[12:34:56] *** ev il set the topic: a b cdef\tg");
        for kind in [Kind::Message, Kind::Action, Kind::Notice, Kind::Join, Kind::Part, Kind::Quit] {
            let line = digest_line(kind, "n\r", "t\rx\u{85}", true, at_noon()).unwrap();
            assert!(!line.chars().any(char::is_control), "{line:?}");
        }
        assert_eq!(digest_line(Kind::Join, "n", "", false, at_noon()), None);
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
