//! The gateway's side of the SMTP listener: who may receive, and queueing
//! accepted mail for LATSSIAM delivery (one job per recipient, flushed
//! before the `250`).

use std::sync::Arc;

use bridge_smtp::{Envelope, Reply, Sink};
use tracing::{info, warn};

use super::config::Oversize;
use super::contacts::{Contact, Reach};
use super::db::StoreError;
use super::mail;
use super::queue::{message_id_string, Origin, Target};
use super::worker;
use super::Gateway;

use super::mail::MAX_PLAINTEXT;

/// The SMTP sink.
pub struct SmtpSink(pub Arc<Gateway>);

impl SmtpSink {
    /// The LATSSIAM target for `rcpt`; a contact whose mailbox is gone (`38`)
    /// is refused here, before anything is accepted (no backscatter).
    fn target_for(&self, rcpt: &str) -> Result<Option<(Target, Box<Contact>)>, Reply> {
        let found = self.0.store.reach(rcpt).map_err(|e| {
            warn!(error = %e, "Cannot read contacts.");
            Reply::new(451, [4, 3, 0], "Temporary local problem; try again later")
        })?;
        match found {
            Reach::Gone => {
                Err(Reply::new(550, [5, 1, 1], format!("<{rcpt}>: Recipient address rejected: mailbox gone")))
            }
            Reach::Contact { target, contact } => Ok(Some((target, contact))),
            Reach::Unknown => Ok(None),
        }
    }

    /// Whether each person of `targets` may get one more message from the
    /// origin of this one today, and if so counts it: each origin has
    /// `gateway.max_per_origin_per_day`, its own share of what the gateway
    /// (one sender for everyone) may have waiting in a person's mailbox, so
    /// that a flood from one origin cannot fill it for everyone else.
    ///
    /// The origin is the domain that vouches for the message (`vouched`:
    /// DMARC or SPF), so that nobody can spend another domain's share by
    /// naming it; mail nobody vouches for is counted by the client's network
    /// (IPv4 /24, IPv6 /48), or, behind an MTA in `smtp.limit_exempt`
    /// (whose network is every sender's), as one origin of its own. The
    /// organisation's own domains through `auth.trusted_networks` are not
    /// counted. Counted once the message is accepted, so a transaction that
    /// ends before its `250` spends nothing. Beyond the share, `452 4.2.2`:
    /// only the flooding origin waits.
    async fn origin_share(
        &self,
        envelope: &Envelope,
        vouched: Option<&str>,
        targets: &[(Target, Box<Contact>)],
    ) -> Result<(), Reply> {
        let peer = envelope.peer.ip();
        let gw = &self.0;
        let share = gw.settings.gateway.max_per_origin_per_day;
        if share == 0 {
            return Ok(());
        }
        // The organisation's own mail through its own MTA (which may claim
        // our domains: auth.trusted_networks) is not an origin to share out.
        let envelope_domain = envelope.from.rsplit_once('@').map_or("", |(_, d)| d);
        if gw.border.trusted(peer) && gw.settings.is_local_domain(envelope_domain) {
            return Ok(());
        }
        let origin = match vouched {
            Some(domain) => format!("d:{domain}"),
            None if gw.border.limit_exempt(peer) => "unauthenticated".to_owned(),
            None => format!("n:{}", origin_network(peer)),
        };
        let keys: Vec<String> = targets
            .iter()
            .map(|(target, _)| match target {
                Target::Latssiam { fingerprint, .. } => format!("{fingerprint}/{origin}"),
                Target::Smtp { rcpt } => format!("{rcpt}/{origin}"),
            })
            .collect();
        // (A message to several people, one of whom is over, has counted for
        // those before: the origin's own loss, and only the flooding one's.)
        for key in &keys {
            if !gw.origins.allow(key, share).await {
                info!(%peer, origin, "An origin has sent its daily share to one person; 452.");
                return Err(Reply::new(
                    452,
                    [4, 2, 2],
                    "Mailbox full for mail from your origin today; try again later",
                ));
            }
        }
        Ok(())
    }

    /// `452 4.3.1` while the queue's filesystem is below `queue.min_free_mb`.
    fn room(&self) -> Result<(), Reply> {
        self.0.store.room().map_err(|free| {
            let min_free_mb = self.0.settings.queue.min_free_mb;
            warn!(free_mb = free >> 20, min_free_mb, "The queue's disk is low on space; mail refused.");
            Reply::new(452, [4, 3, 1], "Insufficient system storage; try again later")
        })
    }
}

impl Sink for SmtpSink {
    async fn recipient(&self, _from: &str, to: &str) -> Result<(), Reply> {
        self.room()?;
        if self.target_for(to)?.is_some() {
            return Ok(());
        }
        let domain = to.rsplit_once('@').map_or("", |(_, d)| d);
        if self.0.settings.is_local_domain(domain) {
            Err(Reply::new(550, [5, 1, 1], format!("<{to}>: Recipient address rejected: no such user here")))
        } else {
            Err(Reply::new(550, [5, 7, 1], format!("<{to}>: Relay access denied")))
        }
    }

    async fn message(&self, envelope: Envelope, data: Vec<u8>) -> Reply {
        let gw = &self.0;
        let refuse = |r: Reply| {
            gw.metrics.smtp_refused.inc();
            r
        };
        if mail::count_received(&data) > mail::MAX_RECEIVED {
            return refuse(Reply::new(554, [5, 4, 6], "Too many Received: headers; mail loop?"));
        }
        if data.len() > gw.settings.smtp.max_message_size {
            return refuse(Reply::new(
                552,
                [5, 3, 4],
                format!("Message too large; at most {} octets", gw.settings.smtp.max_message_size),
            ));
        }
        // Authenticated on the octets as received, before anything is changed.
        let (mut data, vouched) = match gw.border.check(&envelope, data).await {
            Ok(checked) => (checked.data, checked.vouched),
            Err(reply) => return refuse(reply),
        };
        if data.len() > MAX_PLAINTEXT && gw.settings.smtp.oversize != Oversize::Fragment {
            let stripped = match gw.settings.smtp.oversize {
                Oversize::StripAttachments => mail::strip_attachments(&data).filter(|d| d.len() <= MAX_PLAINTEXT),
                Oversize::Reject | Oversize::Fragment => None,
            };
            match stripped {
                Some(d) => data = d,
                None => {
                    return refuse(Reply::new(
                        552,
                        [5, 3, 4],
                        format!("Message too large for LATSSIAM; at most {MAX_PLAINTEXT} octets"),
                    ))
                }
            }
        }
        // A fragment from SMTP would be joined by the recipient as one of the
        // gateway's own sets, under the gateway's signature: refused.
        if !matches!(latssiam::fragment::parse(&data), Ok(None)) {
            return refuse(Reply::new(554, [5, 6, 1], "message/partial is not accepted; send the message whole"));
        }
        let mut targets: Vec<(Target, Box<Contact>)> = Vec::with_capacity(envelope.recipients.len());
        for r in &envelope.recipients {
            match self.target_for(r) {
                // One copy per person, however many of their addresses (or
                // spellings of one) the envelope names.
                Ok(Some(t)) if targets.iter().any(|(_, c)| c.fingerprint() == t.1.fingerprint()) => {}
                Ok(Some(t)) => targets.push(t),
                // The contact was removed between RCPT and DATA.
                Ok(None) => return refuse(Reply::new(550, [5, 1, 1], format!("<{r}>: no such user here"))),
                Err(reply) => return refuse(reply),
            }
        }
        if let Err(reply) = self.room() {
            return refuse(reply);
        }
        if let Err(reply) = self.origin_share(&envelope, vouched.as_deref(), &targets).await {
            return refuse(reply);
        }
        let with = if envelope.tls { "ESMTPS" } else { "ESMTP" };
        let from = format!("{} ({})", envelope.helo, envelope.peer.ip());
        let started = std::time::Instant::now();
        let mut local = Vec::new();
        let mut sent = 0;
        let queued = async {
            let id = gw.queue.new_message_id()?;
            let for_rcpt = (envelope.recipients.len() == 1).then(|| envelope.recipients[0].as_str());
            let header = mail::received(&from, &gw.settings.gateway.hostname, with, &message_id_string(id), for_rcpt);
            let mut body = std::mem::take(&mut data);
            body.splice(0..0, header.into_bytes());
            // People on the embedded home server get it in their mailbox now,
            // within the same fsync; people on another server to which an
            // idle session is open get it now over that session (their
            // server's `31` makes it durable there); the others (and any
            // refused now) get a job. Only what fits one block goes out here;
            // a large message is sealed fragment by fragment by the worker,
            // not in the session.
            let mut jobs = Vec::new();
            // One deadline for all of this mail's deliveries during the session.
            let deadline = std::time::Instant::now() + worker::IN_SESSION_TIMEOUT;
            for (target, contact) in targets {
                if body.len() <= MAX_PLAINTEXT {
                    if worker::is_local(gw, &contact) {
                        let pieces = worker::Pieces::Whole(&body);
                        let fp = contact.fingerprint();
                        if let Ok(Some(p)) = worker::local_prepare_all(gw, &contact, &fp, &pieces) {
                            local.extend(p);
                            continue;
                        }
                    } else if gw.settings.queue.deliver_in_session
                        && matches!(target, Target::Latssiam { .. })
                        && worker::deliver_in_session(gw, &contact, &body, deadline).await
                    {
                        // Already delivered: a failure to queue the others
                        // below answers 451, and a retry brings this person
                        // a second copy (delivery is at-least-once).
                        sent += 1;
                        continue;
                    }
                }
                jobs.push(target);
            }
            if !jobs.is_empty() {
                gw.queue.enqueue_as(id, &body, jobs, &Origin::Smtp { from: envelope.from.clone() }).await?;
            } else if !local.is_empty() {
                // Only mailboxes of the embedded home server (beside copies
                // other servers already hold): their records in its log are
                // all that must be durable before 250 (sled's message ids
                // survive a crash on their own; the origin's daily counts are
                // written lazily, as for a refused mail).
                worker::local_durable(gw).await?;
            }
            Ok::<_, StoreError>((id, body.len()))
        };
        let result = queued.await;
        let count_delivered = |n: usize| {
            gw.metrics.to_latssiam.ok.inc_by(n as u64);
            for _ in 0..n {
                gw.metrics.end_to_end.observe(started.elapsed());
            }
        };
        // Copies another server took count whatever came of the rest.
        count_delivered(sent);
        let delivered = local.len();
        for p in local {
            if result.is_ok() {
                worker::local_commit(gw, p);
            } else {
                worker::local_discard(gw, p);
            }
        }
        match result {
            Ok((id, octets)) => {
                gw.metrics.smtp_accepted.inc();
                count_delivered(delivered);
                let id = message_id_string(id);
                let delivered = delivered + sent;
                info!(queue_id = %id, recipients = envelope.recipients.len(), delivered, octets, "Queued mail from SMTP.");
                Reply::new(250, [2, 0, 0], format!("Ok: queued as {id}"))
            }
            Err(e) => {
                warn!(error = %e, "Cannot queue a message.");
                refuse(Reply::new(451, [4, 3, 0], "Temporary local problem: the queue cannot be written"))
            }
        }
    }
}

/// The network an origin is counted by: an IPv4 /24, an IPv6 /48.
pub fn origin_network(ip: std::net::IpAddr) -> String {
    use std::net::IpAddr;
    match bridge_smtp::listener::client_key(ip) {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2])
        }
    }
}

#[cfg(test)]
mod tests {
    use latssiam::{crypto, Address, Identity};

    use super::*;

    #[test]
    fn sealing_overhead_fits() {
        let body = vec![b'x'; MAX_PLAINTEXT + 600];
        for rsa in [false, true] {
            let id = Identity::generate(
                &Address::new("a-rather-long-mailbox-name", "a.rather.long.host.example").unwrap(),
                Some("A long common name for good measure"),
                rsa,
            )
            .unwrap();
            let sealed = crypto::seal(&body, id.cert_der()).unwrap();
            // 600 = our Received: header (under 300) + the 256 more octets RSA-4096 wraps the key in than RSA-2048.
            assert!(sealed.len() <= latssiam::wire::MAX_BLOCK_DER, "rsa={rsa}: {}", sealed.len() - body.len());
        }
    }
}
