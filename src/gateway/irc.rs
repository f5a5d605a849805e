//! The gateway's side of the IRC bot.
//!
//! IRC -> LATSSIAM: channel lines become `[HH:MM:SS] <nick> text`, gathered
//! per channel over its digest window into one Internet Message from
//! `"#channel" <#channel@network>`, queued with one job per subscriber and
//! delivered by the worker. IRC has no acknowledgement, so lines waiting in a
//! digest window live in memory only until the digest is queued.
//!
//! LATSSIAM -> IRC: the poller turns a message to `#channel@network` (from a
//! subscriber) or `nick@network` into an [`IrcPost`] in the `irc_outbox`
//! tree; [`outbox`] posts them strictly in order whenever the bot is in its
//! channels, and removes each only once all its lines were written.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bridge_irc::{Event, Handle, IrcSink, Kind};
use latssiam::identity::CertInfo;
use mail_parser::Message;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::config::IrcChannel;
use super::mail;
use super::store::{message_id_string, Contact, IrcPost, Origin, StoreError, Target};
use super::Gateway;

#[derive(Default)]
struct Digest {
    lines: Vec<String>,
    since: Option<tokio::time::Instant>,
    last_message_id: Option<String>,
}

/// The gateway as the bot's sink.
pub struct IrcCore {
    gw: Arc<Gateway>,
    digests: Mutex<HashMap<String, Digest>>,
}

impl IrcCore {
    /// A sink for the bot.
    pub fn new(gw: Arc<Gateway>) -> Arc<Self> {
        Arc::new(Self { gw, digests: Mutex::default() })
    }

    fn channel(&self, name: &str) -> Option<&IrcChannel> {
        self.gw.settings.irc.channels.iter().find(|c| c.name.eq_ignore_ascii_case(name))
    }

    /// Queues the lines gathered for `channel` as one message to its subscribers.
    async fn flush(&self, channel: &IrcChannel, digest: &mut Digest) {
        if digest.lines.is_empty() {
            return;
        }
        let lines = std::mem::take(&mut digest.lines);
        digest.since = None;
        let mut targets = Vec::new();
        let subscribers = match self.gw.store.subscribers(&channel_address(channel), &channel.subscribers) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "Cannot read the subscribers; using the configured ones.");
                channel.subscribers.clone()
            }
        };
        for address in &subscribers {
            match self.gw.store.latssiam_target(address) {
                Ok(Some(target)) => targets.push(target),
                Ok(None) => warn!(%address, channel = %channel.name, "A subscriber is not a contact; skipped."),
                Err(e) => warn!(error = %e, "Cannot read contacts."),
            }
        }
        if targets.is_empty() {
            return;
        }
        let Ok(id) = self.gw.store.new_message_id() else { return };
        let hostname = &self.gw.settings.gateway.hostname;
        let message_id =
            format!("<irc.{}.{}@{hostname}>", message_id_string(id), channel.name.trim_start_matches(['#', '&']));
        let mut m = format!(
            "From: \"{0}\" <{0}@{1}>\r\nTo: undisclosed-recipients:;\r\nSubject: {0} on {1}: {2} line{3}\r\nDate: {4}\r\nMessage-ID: {message_id}\r\n",
            channel.name,
            channel.network,
            lines.len(),
            if lines.len() == 1 { "" } else { "s" },
            mail::date_now()
        );
        if let Some(previous) = &digest.last_message_id {
            m.push_str(&format!("In-Reply-To: {previous}\r\nReferences: {previous}\r\n"));
        }
        m.push_str(
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n",
        );
        for l in &lines {
            m.push_str(l);
            m.push_str("\r\n");
        }
        match self.gw.store.enqueue_as(id, m.as_bytes(), targets, &Origin::Gateway).await {
            Ok(()) => {
                digest.last_message_id = Some(message_id);
                self.gw.metrics.irc_lines_queued.fetch_add(lines.len() as u64, Ordering::Relaxed);
                self.gw.metrics.irc_digests_queued.fetch_add(1, Ordering::Relaxed);
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
                let line = match kind {
                    Kind::Message => format!("<{nick}> {text}"),
                    Kind::Action => format!("* {nick} {text}"),
                    Kind::Notice => format!("-{nick}- {text}"),
                    _ if !config.relay_joins => return None,
                    Kind::Join => format!("--> {nick} joined"),
                    Kind::Part => format!("<-- {nick} left ({text})"),
                    Kind::Quit => format!("<-- {nick} quit ({text})"),
                    Kind::Topic => format!("*** {nick} set the topic: {text}"),
                };
                let now = time::OffsetDateTime::now_utc();
                let line = format!("[{:02}:{:02}:{:02}] {line}", now.hour(), now.minute(), now.second());
                self.gw.metrics.irc_lines_heard.fetch_add(1, Ordering::Relaxed);
                let mut digests = self.digests.lock().await;
                let d = digests.entry(config.name.to_ascii_lowercase()).or_default();
                d.lines.push(line);
                d.since.get_or_insert_with(tokio::time::Instant::now);
                if config.digest_window == 0 {
                    self.flush(config, d).await;
                }
                None
            }
            Event::Private { nick, text } => Some(self.private(&nick, &text).await),
            Event::Joined => {
                self.gw.metrics.irc_joins.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}

impl IrcCore {
    /// `ADDRESS text` to the bot: relayed to that contact if they accept it
    /// (`allow_send`: they take part in the gateway both ways).
    async fn private(&self, nick: &str, text: &str) -> String {
        let usage = "usage: /msg <bot> ADDRESS text (ADDRESS: a LATSSIAM address the gateway knows)".to_owned();
        let Some((address, body)) = text.trim().split_once(' ') else { return usage };
        let contact = match self.gw.store.contact_by_name(address) {
            Ok(Some((fp, c))) if c.allow_send => (fp, c),
            Ok(_) => return format!("{address} is not someone this gateway relays to. {usage}"),
            Err(_) => return "the gateway cannot read its contacts now; try later".into(),
        };
        let network = self.gw.settings.irc.channels.first().map_or("irc", |c| c.network.as_str());
        let m = format!(
            "From: \"{nick}\" <{nick}@{network}>\r\nTo: <{address}>\r\nSubject: IRC message from {nick}\r\nDate: {}\r\n\
             MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{body}\r\n",
            mail::date_now()
        );
        let target = Target::Latssiam { fingerprint: contact.0.to_string(), address: address.to_owned() };
        match self.gw.store.enqueue(m.as_bytes(), vec![target], &Origin::Gateway).await {
            Ok(_) => format!("relayed to {address}"),
            Err(_) => "the gateway cannot queue messages now; try later".into(),
        }
    }
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
    let irc = &gw.settings.irc;
    let mut posts = Vec::new();
    let mut lines: Option<Vec<String>> = None;
    for r in recipients {
        let Some((local, host)) = r.rsplit_once('@') else { continue };
        if !irc.is_network(host) {
            continue;
        }
        let target = if local.starts_with(['#', '&']) {
            let Some(channel) = irc.channel(local, host) else {
                return Ok(Err(format!("{r} is not a bridged channel")));
            };
            let subscribers = gw.store.subscribers(&channel_address(channel), &channel.subscribers)?;
            if !subscribers.iter().any(|s| s.eq_ignore_ascii_case(&sender.address)) {
                return Ok(Err(format!("{} does not subscribe to {r}", sender.address)));
            }
            channel.name.clone()
        } else {
            local.to_owned()
        };
        let lines = lines.get_or_insert_with(|| lines_for(gw, sender, message)).clone();
        posts.push(IrcPost { target, lines });
    }
    Ok(Ok(posts))
}

/// The lines to post: the text body without quoted lines and signature,
/// empty lines dropped, at most `max_lines` (the last then says how many
/// were cut), each in `line_format`.
fn lines_for(gw: &Gateway, sender: &Contact, message: &Message<'_>) -> Vec<String> {
    let irc = &gw.settings.irc;
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
        let next = match gw.store.irc_first() {
            Ok(n) => n,
            Err(e) => {
                warn!(error = %e, "Cannot read the IRC outbox.");
                None
            }
        };
        let Some((key, post)) = next else {
            tokio::select! {
                () = gw.store.irc_wake.notified() => continue,
                () = tokio::time::sleep(Duration::from_secs(5)) => continue,
                () = shutdown.cancelled() => return,
            }
        };
        tokio::select! {
            () = handle.ready() => {}
            () = shutdown.cancelled() => return,
        }
        let posted = tokio::select! {
            r = handle.post(&post.target, post.lines) => r,
            () = shutdown.cancelled() => return,
        };
        match posted {
            Ok(()) => {
                info!(target_name = %post.target, "Posted to IRC.");
                if let Err(e) = gw.store.irc_done(&key) {
                    warn!(error = %e, "Cannot remove a posted IRC message; it may be posted again.");
                }
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}
