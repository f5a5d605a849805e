//! The outbound poller: holds `ACCEPT <deadline>` open on the gateway's home
//! server and turns each message from a LATSSIAM person into queue jobs.
//!
//! For each message: the signature must verify (unsigned: `32`; bad: `52`),
//! its signer must be a contact allowed to send (else `52`), it must decrypt
//! and parse as an Internet Message with at least one recipient and no mail
//! loop (else `52`). Then `Bcc:` is removed, a `Received:` header added, one
//! job per recipient is written and flushed, and only then is `31` sent.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use latssiam::client::{Accepted, Client, Delivered};
use latssiam::wire::{Code, Status};
use latssiam::{crypto, Fingerprint};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::mail;
use super::store::{message_id_string, Origin, Target};
use super::Gateway;

/// Runs until `shutdown`, reconnecting with backoff (1 s doubling to 60 s,
/// reset after a good round trip).
pub async fn run(gw: Arc<Gateway>, shutdown: CancellationToken) {
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

async fn session(gw: &Gateway, backoff: &mut Duration) -> Result<(), String> {
    let (name, addr) = gw.home.clone();
    let mut client = Client::connect(addr, &name, Some(Arc::clone(&gw.identity)), &gw.pins)
        .await
        .map_err(|e| format!("{name} ({addr}): {e}"))?;
    let deadline = Duration::from_secs(gw.settings.home.accept_deadline_secs);
    loop {
        let answer = client.accept(deadline).await.map_err(|e| e.to_string())?;
        gw.metrics.accept_round_trips.fetch_add(1, Ordering::Relaxed);
        match answer {
            Accepted::Message(d) => {
                *backoff = Duration::from_secs(1);
                match take(gw, &d).await {
                    Ok(()) => {
                        client.ack().await.map_err(|e| e.to_string())?;
                        gw.metrics.accept_taken.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(Refusal::Refuse(code, why)) => {
                        warn!(code = code.as_u8(), reason = %why, "Refused a message on the home server.");
                        client.refuse(Status::of(code)).await.map_err(|e| e.to_string())?;
                        gw.metrics.accept_refused.fetch_add(1, Ordering::Relaxed);
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

async fn take(gw: &Gateway, d: &Delivered) -> Result<(), Refusal> {
    let refuse = |code, why: String| Refusal::Refuse(code, why);
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
    if mail::count_received(&plaintext) > mail::MAX_RECEIVED {
        return Err(refuse(Code::MessageRefused, "mail loop (too many Received: headers)".into()));
    }
    let message = mail_parser::MessageParser::default()
        .parse(&plaintext)
        .ok_or_else(|| refuse(Code::MessageRefused, "not an Internet Message".into()))?;
    let recipients = mail::recipients(&message);
    if recipients.is_empty() {
        return Err(refuse(Code::MessageRefused, "no recipients in To, Cc or Bcc".into()));
    }
    // A message to the gateway itself may change IRC subscriptions (any contact).
    let own = gw.identity.address().map(|a| a.to_string().to_lowercase());
    if recipients.len() == 1 && own.as_deref() == Some(recipients[0].as_str()) {
        let subject = message.subject().unwrap_or_default().to_owned();
        let Some(answer) = super::irc::subscription_command(gw, &contact, &subject).await else {
            return Err(refuse(Code::MessageRefused, "a message to the gateway that is no command".into()));
        };
        let text = match answer {
            Ok(t) | Err(t) => t,
        };
        let reply = mail::notice(&gw.settings.gateway.hostname, &contact.address, &subject, &text, &plaintext);
        let target = Target::Latssiam { fingerprint: fp.to_string(), address: contact.address.clone() };
        gw.store.enqueue(&reply, vec![target], &Origin::Gateway).await.map_err(|e| Refusal::Later(e.to_string()))?;
        info!(%subject, "Subscription command handled.");
        return Ok(());
    }
    if !contact.allow_send {
        return Err(refuse(Code::MessageRefused, format!("{fp} is not a contact allowed to send")));
    }
    let irc_posts = super::irc::posts_for(gw, &contact, &recipients, &message)
        .map_err(|e| Refusal::Later(e.to_string()))?
        .map_err(|why| refuse(Code::MessageRefused, why))?;
    let mut targets = Vec::new();
    for r in recipients {
        if r.rsplit_once('@').is_some_and(|(_, host)| gw.settings.irc.is_network(host)) {
            continue;
        }
        match gw.store.latssiam_target(&r) {
            Ok(Some(target)) => targets.push(target),
            Ok(None) => targets.push(Target::Smtp { rcpt: r }),
            Err(e) => return Err(Refusal::Later(e.to_string())),
        }
    }
    let from = contact.email.clone().unwrap_or_else(|| contact.address.clone());
    let id = gw.store.new_message_id().map_err(|e| Refusal::Later(e.to_string()))?;
    let header = mail::received(
        &format!("{} ({fp})", contact.address),
        &gw.settings.gateway.hostname,
        "LATSSIAM",
        &message_id_string(id),
        None,
    );
    let body = mail::prepend(&header, &mail::remove_bcc(&plaintext));
    let n = targets.len();
    if !irc_posts.is_empty() {
        gw.store.irc_enqueue(&irc_posts).await.map_err(|e| Refusal::Later(e.to_string()))?;
        info!(posts = irc_posts.len(), "Queued posts for IRC from LATSSIAM.");
    }
    if n > 0 {
        let origin = Origin::Latssiam { fingerprint: fp.to_string(), from };
        gw.store.enqueue_as(id, &body, targets, &origin).await.map_err(|e| Refusal::Later(e.to_string()))?;
        info!(queue_id = %message_id_string(id), recipients = n, "Queued mail from LATSSIAM.");
    }
    Ok(())
}
