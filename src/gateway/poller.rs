//! The outbound poller: holds `ACCEPT <deadline>` open on the gateway's home
//! server and turns each message from a LATSSIAM person into queue jobs.
//!
//! For each message: the signature must verify (unsigned: `32`; bad: `52`),
//! its signer must be a contact allowed to send (else `52`), it must decrypt
//! and parse as an Internet Message with at least one recipient and no mail
//! loop (else `52`). Then [`inspect`] applies the relay policy: one `From:`
//! and at most one `Sender:`, each the contact's email alias or LATSSIAM
//! address (else `52` and a notice saying why, or with
//! `relay.from_mismatch = "rewrite"` the contact's address in `From:` and the
//! original in `Reply-To:`; a message without `From:` gets the contact's),
//! at most `relay.max_recipients` recipients, and at most
//! `relay.messages_per_hour` messages per contact. Then `Bcc:` is removed, a
//! `Received:` header added, one job per recipient is written and flushed,
//! and only then is `31` sent.

use std::sync::Arc;
use std::time::Duration;

use latssiam::client::{Accepted, Client, Delivered};
use latssiam::fragment::{self, JoinError, Offer};
use latssiam::wire::{Code, Status};
use latssiam::{crypto, Fingerprint};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::config::FromMismatch;
use super::contacts::{Contact, Reach};
use super::mail;
use super::queue::SharedOffer;
use super::queue::{message_id_string, now_ms, Origin, Target};
use super::Gateway;

/// The relay policy for contacts' messages (from `[relay]`).
#[derive(Debug, Clone)]
pub struct Policy {
    /// What to do with a `From:`/`Sender:` that is not the contact's.
    pub from_mismatch: FromMismatch,
    /// Most recipients of one message.
    pub max_recipients: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Self { from_mismatch: FromMismatch::Reject, max_recipients: 50 }
    }
}

/// A contact's message that passed [`inspect`].
#[derive(Debug, Clone)]
pub struct Outbound {
    /// Its recipients (To, Cc, Bcc), lower case, deduplicated.
    pub recipients: Vec<String>,
    /// Its subject (empty if none).
    pub subject: String,
    /// The message to relay: as written, or with `From:` made the contact's.
    pub message: Vec<u8>,
}

/// The header fields named `name` (case-insensitive), unfolded, without the name.
fn fields(header: &[u8], name: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    for line in header.split_inclusive(|&b| b == b'\n') {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches(['\r', '\n']);
        if line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
            if let Some(c) = current.as_mut() {
                c.push_str(text);
            }
            continue;
        }
        out.extend(current.take());
        if let Some((field, value)) = text.split_once(':') {
            if field.trim_end_matches([' ', '\t']).eq_ignore_ascii_case(name) {
                current = Some(value.to_owned());
            }
        }
    }
    out.extend(current);
    out
}

/// The addresses in one address-list field value, lower case; `None` if it
/// does not parse or has an entry without an address (a display name alone).
fn addresses(value: &str) -> Option<Vec<String>> {
    let raw = format!("From:{value}\r\n\r\n");
    let message = mail_parser::MessageParser::default().parse(raw.as_bytes())?;
    let list = message
        .from()?
        .iter()
        .map(|a| a.address().map(|a| a.trim().to_lowercase()).filter(|a| !a.is_empty()))
        .collect::<Option<Vec<String>>>()?;
    (!list.is_empty()).then_some(list)
}

/// Applies the relay policy to a decrypted message from `contact`.
///
/// # Errors
/// The code to refuse it with (`52`) and why, for the sender's notice.
pub fn inspect(plaintext: &[u8], contact: &Contact, policy: &Policy) -> Result<Outbound, (Code, String)> {
    let refuse = |why: String| (Code::MessageRefused, why);
    // The bytes checked here are the bytes that go out: a bare CR or LF that
    // the smarthost path would turn into a line break is one already.
    let plaintext = &*bridge_smtp::crlf_only(plaintext);
    if mail::count_received(plaintext) > mail::MAX_RECEIVED {
        return Err(refuse("mail loop (too many Received: headers)".into()));
    }
    let message = mail_parser::MessageParser::default()
        .parse(plaintext)
        .ok_or_else(|| refuse("not an Internet Message".into()))?;
    let recipients = mail::recipients(&message);
    if recipients.is_empty() {
        return Err(refuse("no recipients in To, Cc or Bcc".into()));
    }
    if recipients.len() > policy.max_recipients {
        return Err(refuse(format!(
            "{} recipients; at most {} per message through this gateway",
            recipients.len(),
            policy.max_recipients
        )));
    }
    // Decoded (an encoded word may carry CR LF): control characters become
    // spaces before it goes into a notice's header or a log line.
    let subject: String =
        message.subject().unwrap_or_default().chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    let own: Vec<String> = contact.email.iter().chain([&contact.address]).map(|a| a.to_lowercase()).collect();
    let you = own.join(" or ");
    let header = mail::header_section(plaintext);
    let from = fields(header, "from");
    let sender = fields(header, "sender");
    let resent: Vec<String> = ["resent-from", "resent-sender"].iter().flat_map(|n| fields(header, n)).collect();
    let problem = if from.len() > 1 || sender.len() > 1 {
        Some("more than one From: or Sender: field".to_owned())
    } else {
        from.iter().chain(&sender).chain(&resent).find_map(|value| match addresses(value) {
            None => Some(format!("From:/Sender: {:?} does not parse", value.trim())),
            Some(list) => {
                list.into_iter().find(|a| !own.contains(a)).map(|a| format!("<{a}> is not your address ({you})"))
            }
        })
    };
    let own_from = format!("From: <{}>\r\n", own[0]);
    let message = match (problem, policy.from_mismatch) {
        (None, _) if from.is_empty() => mail::prepend(&own_from, plaintext),
        (None, _) => plaintext.to_vec(),
        (Some(why), FromMismatch::Reject) => return Err(refuse(format!("you may send only as yourself: {why}"))),
        (Some(_), FromMismatch::Rewrite) => {
            let reply_to = if fields(header, "reply-to").is_empty() {
                from.first().map(|f| format!("Reply-To:{}\r\n", f.replace(['\r', '\n'], ""))).unwrap_or_default()
            } else {
                String::new()
            };
            let body = mail::without_fields(plaintext, &["from", "sender", "resent-from", "resent-sender"]);
            mail::prepend(&format!("{own_from}{reply_to}"), &body)
        }
    };
    Ok(Outbound { recipients, subject, message })
}

/// Runs until `shutdown`, reconnecting with backoff (1 s doubling to 60 s,
/// reset after a good round trip).
pub async fn run(gw: Arc<Gateway>, shutdown: CancellationToken) {
    tokio::spawn(expire_sets(Arc::clone(&gw), shutdown.clone()));
    let mut backoff = Duration::from_secs(1);
    while !shutdown.is_cancelled() {
        let result = tokio::select! {
            r = session(&gw, &mut backoff) => r,
            () = shutdown.cancelled() => break,
        };
        if let Err(e) = result {
            warn!(error = %e, retry_in = ?backoff, "Home server session failed.");
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.cancelled() => break,
        }
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}

/// Every ten minutes, discards the fragment sets incomplete for 24 hours
/// (PROFILE section 8), each with one notice to the contact who sent it.
async fn expire_sets(gw: Arc<Gateway>, shutdown: CancellationToken) {
    loop {
        match gw.joiner.expire(now_ms(), fragment::SET_LIFETIME) {
            Ok(expired) => {
                for e in expired {
                    gw.metrics.fragments_expired.inc();
                    let (from, subject) = e.first.clone().unwrap_or_default();
                    warn!(signer = %e.signer, set = %e.id, have = e.have, total = e.total, "Discarded an incomplete fragment set.");
                    let Ok(Some(contact)) = gw.store.contact(&e.signer) else { continue };
                    let text = format!(
                        "Your message arrived in {} of its {} parts within 24 hours and was discarded; please send it again.\r\n\r\nFrom: {from}\r\nSubject: {subject}",
                        e.have, e.total
                    );
                    let notice = mail::notice(
                        &gw.settings.gateway.hostname,
                        &contact.address,
                        "Message not relayed: incomplete",
                        &text,
                        b"",
                    );
                    let target =
                        Target::Latssiam { fingerprint: e.signer.to_string(), address: contact.address.clone() };
                    if let Err(err) = gw.queue.enqueue(&notice, vec![target], &Origin::Gateway).await {
                        warn!(error = %err, "Cannot queue an incomplete-set notice.");
                    }
                }
            }
            Err(e) => warn!(error = %e, "Cannot read the partial sets."),
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(600)) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

async fn session(gw: &Gateway, backoff: &mut Duration) -> Result<(), String> {
    let (name, addr) = gw.home.clone();
    let timeout = Duration::from_secs(gw.settings.queue.connect_timeout_secs.max(1));
    let mut client = Client::connect_within(addr, &name, Some(Arc::clone(&gw.identity)), &gw.pins, timeout)
        .await
        .map_err(|e| format!("{name} ({addr}): {e}"))?;
    let deadline = Duration::from_secs(gw.settings.home.accept_deadline_secs);
    loop {
        let answer = client.accept(deadline).await.map_err(|e| e.to_string())?;
        gw.metrics.accept_round_trips.inc();
        match answer {
            Accepted::Message(d) => {
                *backoff = Duration::from_secs(1);
                match take(gw, &d).await {
                    Ok(()) => {
                        client.ack().await.map_err(|e| e.to_string())?;
                        gw.metrics.accept_taken.inc();
                    }
                    Err(Refusal::Refuse(code, why)) => {
                        warn!(code = code.as_u8(), reason = %why, "Refused a message on the home server.");
                        client.refuse(Status::of(code)).await.map_err(|e| e.to_string())?;
                        gw.metrics.accept_refused.inc();
                    }
                    // Not acknowledged: the server hands it out again later.
                    Err(Refusal::Later(why)) => return Err(format!("cannot keep a message: {why}")),
                }
            }
            Accepted::Nothing(s) if s.code() == Code::NoMoreMessages => *backoff = Duration::from_secs(1),
            Accepted::Nothing(s) if s.code() == Code::SlowDown => tokio::time::sleep(Duration::from_secs(1)).await,
            Accepted::Nothing(s) => return Err(format!("ACCEPT answered {s}")),
        }
    }
}

enum Refusal {
    /// Answer the server with this code.
    Refuse(Code, String),
    /// A local problem: leave the message on the server.
    Later(String),
}

/// Refuses a contact's message and tells them why in a notice (at most
/// `queue.max_bounces_per_hour` notices to one contact).
async fn refuse_with_notice(
    gw: &Gateway,
    fp: &Fingerprint,
    contact: &Contact,
    code: Code,
    why: String,
    plaintext: &[u8],
) -> Refusal {
    if gw.bounces.allow(&contact.address, gw.settings.queue.max_bounces_per_hour).await {
        let text = format!("The gateway did not relay your message.\r\n\r\nReason: {why}");
        let notice =
            mail::notice(&gw.settings.gateway.hostname, &contact.address, "Message not relayed", &text, plaintext);
        let target = Target::Latssiam { fingerprint: fp.to_string(), address: contact.address.clone() };
        if let Err(e) = gw.queue.enqueue(&notice, vec![target], &Origin::Gateway).await {
            warn!(error = %e, "Cannot queue a refusal notice.");
        }
    }
    Refusal::Refuse(code, why)
}

async fn take(gw: &Gateway, d: &Delivered) -> Result<(), Refusal> {
    let refuse = |code, why: String| Refusal::Refuse(code, why);
    if let Err(free) = gw.store.room() {
        return Err(Refusal::Later(format!("the queue's disk is low on space ({} MiB free)", free >> 20)));
    }
    let Some(signature) = &d.signature else {
        return Err(refuse(Code::SignatureRequired, "unsigned".into()));
    };
    let signer = crypto::verify(signature, &d.message)
        .map_err(|e| refuse(Code::MessageRefused, format!("signature does not verify: {e}")))?;
    let fp = Fingerprint::of(&signer);
    let contact = match gw.store.contact(&fp) {
        Ok(Some(c)) => c,
        Ok(None) => return Err(refuse(Code::MessageRefused, format!("{fp} is not a contact"))),
        Err(e) => return Err(Refusal::Later(e.to_string())),
    };
    let plaintext = crypto::open(&d.message, &gw.identity)
        .map_err(|e| refuse(Code::MessageRefused, format!("does not decrypt: {e}")))?;
    // A fragment (PROFILE section 8) is kept until its set is complete; the
    // joined message is then relayed as one and its set forgotten, with the
    // relay's jobs durable first (a crash in between relays it again, never
    // loses it).
    let fragment = match fragment::parse(&plaintext) {
        Ok(f) => f,
        Err(e) => return Err(drop_fragment(gw, &fp, &e)),
    };
    let Some(fragment) = fragment else {
        return relay(gw, &fp, &contact, plaintext).await;
    };
    // Only a contact who may send has anything large to relay: nobody else's
    // fragments take room in the gateway's database.
    if !contact.allow_send {
        return Err(refuse(Code::MessageRefused, format!("{fp} is not a contact allowed to send")));
    }
    let id = fragment.id.clone();
    // With several nodes on JetStream, the set is joined where every node sees it.
    if let Some(j) = &gw.cluster {
        let limit = gw.settings.smtp.max_message_size + fragment::TRACE_ROOM;
        let whole = match j.offer_fragment(&fp, &fragment, limit).await {
            Ok(SharedOffer::Kept) => return Ok(()),
            Ok(SharedOffer::Join(whole)) => whole,
            Ok(SharedOffer::Refused(e)) => return Err(drop_fragment(gw, &fp, &e)),
            Err(e) => return Err(Refusal::Later(e.to_string())),
        };
        let total = fragment.total;
        drop(plaintext);
        let result = relay(gw, &fp, &contact, whole).await;
        if matches!(result, Err(Refusal::Later(_))) {
            j.unjoin_fragments(&fp, &id).await;
        } else {
            j.finish_fragments(&fp, &id, total).await;
            gw.metrics.fragments_joined.inc();
        }
        return result;
    }
    let whole = match gw.joiner.offer(&fp, &fragment, now_ms()) {
        Ok(Offer::Complete(whole)) => whole,
        Ok(_) => return gw.store.durable().await.map_err(|e| Refusal::Later(e.to_string())),
        Err(JoinError::Refused(e)) => return Err(drop_fragment(gw, &fp, &e)),
        Err(e) => return Err(Refusal::Later(e.to_string())),
    };
    drop(plaintext);
    let result = relay(gw, &fp, &contact, whole).await;
    if !matches!(result, Err(Refusal::Later(_))) {
        gw.joiner.finish(&fp, &id, now_ms()).map_err(|e| Refusal::Later(e.to_string()))?;
        gw.store.durable().await.map_err(|e| Refusal::Later(e.to_string()))?;
        gw.metrics.fragments_joined.inc();
    }
    result
}

/// A fragment section 8 refuses: logged, counted, answered `52`.
fn drop_fragment(gw: &Gateway, fp: &Fingerprint, why: &fragment::Refused) -> Refusal {
    warn!(signer = %fp, error = %why, "Dropped a fragment.");
    gw.metrics.fragments_refused.inc();
    Refusal::Refuse(Code::MessageRefused, format!("fragment: {why}"))
}

/// Relays one whole message from `contact` (after the relay policy).
async fn relay(gw: &Gateway, fp: &Fingerprint, contact: &Contact, plaintext: Vec<u8>) -> Result<(), Refusal> {
    let (fp, contact) = (*fp, contact.clone());
    let refuse = |code, why: String| Refusal::Refuse(code, why);
    if plaintext.len() > gw.settings.smtp.max_message_size {
        let why =
            format!("{} octets; at most {} through this gateway", plaintext.len(), gw.settings.smtp.max_message_size);
        return Err(refuse_with_notice(gw, &fp, &contact, Code::MessageRefused, why, &plaintext).await);
    }
    let relay = &gw.settings.relay;
    let policy = Policy { from_mismatch: relay.from_mismatch, max_recipients: relay.max_recipients };
    let Outbound { recipients, subject, message: plaintext } = match inspect(&plaintext, &contact, &policy) {
        Ok(o) => o,
        Err((code, why)) => return Err(refuse_with_notice(gw, &fp, &contact, code, why, &plaintext).await),
    };
    let message = mail_parser::MessageParser::default()
        .parse(&plaintext)
        .ok_or_else(|| refuse(Code::MessageRefused, "not an Internet Message".into()))?;
    // A message to the gateway itself may change IRC subscriptions (any contact).
    let own = gw.identity.address().map(|a| a.to_string().to_lowercase());
    if recipients.len() == 1 && own.as_deref() == Some(recipients[0].as_str()) {
        let Some(answer) = super::irc::subscription_command(gw, &contact, &subject).await else {
            return Err(refuse(Code::MessageRefused, "a message to the gateway that is no command".into()));
        };
        let text = match answer {
            Ok(t) | Err(t) => t,
        };
        let reply = mail::notice(&gw.settings.gateway.hostname, &contact.address, &subject, &text, &plaintext);
        let target = Target::Latssiam { fingerprint: fp.to_string(), address: contact.address.clone() };
        gw.queue.enqueue(&reply, vec![target], &Origin::Gateway).await.map_err(|e| Refusal::Later(e.to_string()))?;
        info!(%subject, "Subscription command handled.");
        return Ok(());
    }
    if !contact.allow_send {
        return Err(refuse(Code::MessageRefused, format!("{fp} is not a contact allowed to send")));
    }
    // With DKIM keys, only mail the gateway can sign in its From: domain goes out.
    if gw.border.signs() {
        let domain = message
            .from()
            .and_then(|f| f.first())
            .and_then(|a| a.address())
            .and_then(|a| a.rsplit_once('@'))
            .map(|(_, d)| d.to_ascii_lowercase());
        if !domain.as_deref().is_some_and(|d| gw.border.can_sign(d)) {
            let why = format!("the gateway signs mail only for its DKIM domains, not {}", domain.unwrap_or_default());
            return Err(refuse_with_notice(gw, &fp, &contact, Code::MessageRefused, why, &plaintext).await);
        }
    }
    if !gw.relayed.allow(&fp.to_string(), relay.messages_per_hour).await {
        let why = format!("more than {} messages in an hour; try again later", relay.messages_per_hour);
        return Err(refuse_with_notice(gw, &fp, &contact, Code::MessageRefused, why, &plaintext).await);
    }
    let irc_posts = super::irc::posts_for(gw, &contact, &recipients, &message)
        .map_err(|e| Refusal::Later(e.to_string()))?
        .map_err(|why| refuse(Code::MessageRefused, why))?;
    let mut targets = Vec::new();
    for r in recipients {
        if r.rsplit_once('@').is_some_and(|(_, host)| gw.settings.irc.is_network(host)) {
            continue;
        }
        match gw.store.reach(&r) {
            Ok(Reach::Contact { target, .. }) => targets.push(target),
            Ok(Reach::Unknown) => targets.push(Target::Smtp { rcpt: r }),
            Ok(Reach::Gone) => {
                let why = format!("the LATSSIAM mailbox of <{r}> is gone");
                return Err(refuse_with_notice(gw, &fp, &contact, Code::MessageRefused, why, &plaintext).await);
            }
            Err(e) => return Err(Refusal::Later(e.to_string())),
        }
    }
    let from = contact.email.clone().unwrap_or_else(|| contact.address.clone());
    let id = gw.queue.new_message_id().map_err(|e| Refusal::Later(e.to_string()))?;
    let header = mail::received(
        &format!("{} ({fp})", contact.address),
        &gw.settings.gateway.hostname,
        "LATSSIAM",
        &message_id_string(id),
        None,
    );
    // What leaves has the fields RFC 5322 requires (a contact's client may
    // leave them to the gateway, and MTAs do not add them for mail relayed
    // from elsewhere), and tells correspondents the encrypted way to write:
    // the contact's LATSSIAM URL (`LATSSIAM-URL:`, see README.md).
    let mut added = header;
    if message.date().is_none() {
        added.push_str(&format!("Date: {}\r\n", mail::date_now()));
    }
    if message.message_id().is_none() {
        added.push_str(&format!(
            "Message-ID: <latssiam.{}@{}>\r\n",
            message_id_string(id),
            gw.settings.gateway.hostname
        ));
    }
    if let Some(url) = latssiam::identity::CertInfo::from_der(&contact.cert)
        .ok()
        .and_then(|info| latssiam::identity::LatssiamUrl::for_certificate(&info))
    {
        added.push_str(&format!("{}: {url}\r\n", mail::LATSSIAM_URL_FIELD));
    }
    let body = mail::prepend(&added, &mail::without_fields(&mail::remove_bcc(&plaintext), &["latssiam-url"]));
    // SMTP allows 998 octets a line: a part with longer lines goes out re-encoded, never cut or refused.
    let body = mail::reencode_long_lines(&body).unwrap_or(body);
    let n = targets.len();
    let origin = Origin::Latssiam { fingerprint: fp.to_string(), from };
    // Jobs and IRC posts are kept in one step: all of them, or (not
    // acknowledged, handed out again) none.
    gw.queue
        .enqueue_with_posts(id, &body, targets, &origin, &irc_posts)
        .await
        .map_err(|e| Refusal::Later(e.to_string()))?;
    info!(queue_id = %message_id_string(id), recipients = n, posts = irc_posts.len(), "Queued a message from LATSSIAM.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> Contact {
        Contact {
            address: "alice@localhost".into(),
            cert: Vec::new(),
            email: Some("alice@example.org".into()),
            allow_send: true,
            server: None,
            gone: false,
            discoverable: false,
        }
    }

    fn check(m: &str) -> Result<Outbound, (Code, String)> {
        inspect(m.as_bytes(), &alice(), &Policy::default())
    }

    #[test]
    fn from_and_sender_must_be_the_contacts() {
        assert!(check("From: Alice <ALICE@example.org>\r\nTo: v@x.test\r\n\r\nb").is_ok());
        assert!(check("From: alice@localhost\r\nSender: alice@example.org\r\nTo: v@x.test\r\n\r\nb").is_ok());
        for forged in [
            "From: ceo@bank.example\r\nTo: v@x.test\r\n\r\nb",
            "From: alice@example.org\r\nFrom : ceo@bank.example\r\nTo: v@x.test\r\n\r\nb",
            "From: alice@example.org,\r\n ceo@bank.example\r\nTo: v@x.test\r\n\r\nb",
            "From: alice@example.org\r\nResent-From: ceo@bank.example\r\nTo: v@x.test\r\n\r\nb",
            "From: alice@example.org, \"CEO\"\r\nTo: v@x.test\r\n\r\nb",
            // A bare CR that the wire would make a line break hides a second From:.
            "To: v@x.test\r\nSubject: s\rFrom: ceo@bank.example\r\r\nFrom: alice@example.org\r\n\r\nb",
            // So does a bare LF.
            "To: v@x.test\r\nSubject: s\nFrom: ceo@bank.example\r\nFrom: alice@example.org\r\n\r\nb",
        ] {
            let refused = check(forged);
            assert!(matches!(refused, Err((Code::MessageRefused, _))), "{forged:?}: {refused:?}");
        }
    }

    #[test]
    fn an_encoded_subject_cannot_carry_a_line_break() {
        // Hostile review 2, item 12: =0D=0A in an encoded word decoded to CR LF,
        // which went into the subscription reply's header and the log.
        let out =
            check("From: alice@example.org\r\nTo: v@x.test\r\nSubject: =?utf-8?q?a=0D=0AX:_y?=\r\n\r\nb").unwrap();
        assert_eq!(out.subject, "a  X: y");
    }

    #[test]
    fn what_goes_out_has_crlf_only() {
        let out = check("From: alice@example.org\nTo: v@x.test\n\nhi\n.\r\nMAIL FROM:<e@x>\r").unwrap();
        assert_eq!(out.message, b"From: alice@example.org\r\nTo: v@x.test\r\n\r\nhi\r\n.\r\nMAIL FROM:<e@x>\r\n");
        assert_eq!(out.recipients, ["v@x.test"]);
    }
}
