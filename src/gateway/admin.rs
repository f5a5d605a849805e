//! Operator commands on the queue and contacts, and the admin socket through
//! which they reach a running gateway (sled admits one process).
//!
//! The socket is `<data_dir>/admin.sock`. It is created inside the data dir,
//! which is mode 0700, so no other user can reach it even before it is made
//! 0600; and the gateway answers only a peer whose uid (`SO_PEERCRED`) is its
//! own or root's. A client writes one JSON [`Request`] and a newline; the
//! gateway answers one JSON [`Response`] and closes.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use latssiam::Fingerprint;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::contacts::Contact;
use super::db::Store;
use super::queue::jetstream::JetQueue;
use super::queue::{message_id_string, JobId};

/// One operator command.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    ContactAdd { contact: Contact },
    ContactList,
    ContactRemove { who: String },
    QueueList,
    QueueShow { id: String },
    QueueRetry { id: Option<String> },
    QueueDelete { id: String },
}

/// The answer: text for the operator, and whether it worked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    pub text: String,
}

fn ts(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

fn find_contact(store: &Store, who: &str) -> Result<Option<Fingerprint>, String> {
    if let Ok(fp) = who.parse::<Fingerprint>() {
        return Ok(Some(fp));
    }
    Ok(store.contact_by_name(who).map_err(|e| e.to_string())?.map(|(fp, _)| fp))
}

fn contact_table(contacts: &[Contact]) -> String {
    let mut out = format!("{:<36} {:<36} {:<5} {:<64} server\n", "address", "email", "send", "fingerprint");
    for c in contacts {
        out.push_str(&format!(
            "{:<36} {:<36} {:<5} {} {}\n",
            c.address,
            c.email.as_deref().unwrap_or("-"),
            if c.allow_send { "yes" } else { "no" },
            c.fingerprint(),
            c.server_host()
        ));
    }
    out
}

/// Carries out `request` on `store`, and with `shared` (`queue.backend =
/// "jetstream"`) the queue requests on JetStream.
pub async fn execute(store: &Store, shared: Option<&JetQueue>, request: Request) -> Response {
    let result = match (shared, request) {
        (
            Some(j),
            r @ (Request::QueueList
            | Request::QueueShow { .. }
            | Request::QueueRetry { .. }
            | Request::QueueDelete { .. }),
        ) => execute_shared(j, r).await,
        (_, r) => execute_inner(store, r).await,
    };
    match result {
        Ok(text) => Response { ok: true, text },
        Err(text) => Response { ok: false, text },
    }
}

/// `request` on the shared queue and contacts alone, without a node's
/// database: for the command line on a machine with only the NATS URL, and
/// for the queue requests on any node.
pub async fn execute_shared(j: &JetQueue, request: Request) -> Result<String, String> {
    let e = |e: super::db::StoreError| e.to_string();
    // As the name index finds them: a fingerprint, or a name lower-cased.
    let find = |contacts: &[Contact], who: &str| {
        let (fp, who) = (who.parse::<Fingerprint>().ok(), who.to_lowercase());
        contacts
            .iter()
            .map(|c| (c.fingerprint(), c))
            .find(|(f, c)| Some(*f) == fp || c.names().any(|n| n == who))
            .map(|(f, _)| f)
    };
    match request {
        Request::ContactAdd { contact } => {
            let fp = contact.fingerprint();
            let all = j.contacts().await.map_err(e)?;
            for name in contact.names() {
                if find(&all, &name).is_some_and(|other| other != fp) {
                    return Err(format!("{name} already belongs to another contact"));
                }
            }
            j.share_contact(&fp, Some(&contact)).await.map_err(e)??;
            Ok(format!("added {} {fp}", contact.address))
        }
        Request::ContactList => Ok(contact_table(&j.contacts().await.map_err(e)?)),
        Request::ContactRemove { who } => {
            let fp = find(&j.contacts().await.map_err(e)?, &who).ok_or_else(|| format!("no contact {who}"))?;
            j.share_contact(&fp, None).await.map_err(e)??;
            Ok(format!("removed {fp}"))
        }
        Request::QueueList => j.summary().await.map_err(e),
        Request::QueueShow { .. } | Request::QueueRetry { .. } | Request::QueueDelete { .. } => Err(format!(
            "with queue.backend = \"jetstream\" the jobs are JetStream messages: see them with the nats CLI \
             (`nats stream view {0}`, dead letters in `{0}-dead`)",
            j.stream_name()
        )),
    }
}

async fn execute_inner(store: &Store, request: Request) -> Result<String, String> {
    let e = |e: super::db::StoreError| e.to_string();
    match request {
        Request::ContactAdd { contact } => {
            let fp = contact.fingerprint();
            store.put_contact(&contact).await.map_err(e)??;
            Ok(format!("added {} {fp}", contact.address))
        }
        Request::ContactList => Ok(contact_table(&store.contacts().map_err(e)?)),
        Request::ContactRemove { who } => {
            let fp = find_contact(store, &who)?.ok_or_else(|| format!("no contact {who}"))?;
            if store.remove_contact(&fp).await.map_err(e)? {
                Ok(format!("removed {fp}"))
            } else {
                Err(format!("no contact {who}"))
            }
        }
        Request::QueueList => {
            let mut out =
                format!("{:<16} {:<8} {:<25} {:<30} recipient / last error\n", "id", "size", "arrived", "sender");
            let mut n = 0;
            for (dead, list) in [(false, store.jobs().map_err(e)?), (true, store.dead_letters().map_err(e)?)] {
                for (id, job) in list {
                    n += 1;
                    let size = store.body(job.message).map_err(e)?.map_or(0, |b| b.len());
                    let from = match job.origin.envelope_from() {
                        "" => "<>".to_owned(),
                        f => f.to_owned(),
                    };
                    let mark = if dead {
                        "!"
                    } else if job.attempts > 0 {
                        "*"
                    } else {
                        " "
                    };
                    out.push_str(&format!(
                        "{:<15}{mark} {size:<8} {:<25} {from:<30} {}\n",
                        id.to_string(),
                        ts(job.arrived_ms),
                        job.target.describe()
                    ));
                    if let Some(err) = &job.last_error {
                        out.push_str(&format!("{:<81}({})\n", "", err));
                    }
                }
            }
            out.push_str(&format!("-- {n} jobs (* deferred, ! dead letter)\n"));
            Ok(out)
        }
        Request::QueueShow { id } => {
            let jid: JobId = id.parse()?;
            let (job, dead) = store.job(jid).map_err(e)?.ok_or_else(|| format!("no job {id}"))?;
            let body = store.body(jid.message).map_err(e)?.unwrap_or_default();
            Ok(format!(
                "id: {jid}\nmessage: {}\nstate: {}\ntarget: {}\nsender: {}\narrived: {}\nattempts: {}\nnext attempt: {}\nlast error: {}\nsize: {}\n\n{}",
                message_id_string(jid.message),
                if dead { "dead letter" } else if job.attempts > 0 { "deferred" } else { "active" },
                job.target.describe(),
                job.origin.envelope_from(),
                ts(job.arrived_ms),
                job.attempts,
                ts(job.due_ms),
                job.last_error.as_deref().unwrap_or("-"),
                body.len(),
                String::from_utf8_lossy(super::mail::header_section(&body))
            ))
        }
        Request::QueueRetry { id: Some(id) } => {
            let jid: JobId = id.parse()?;
            if store.retry(jid).await.map_err(e)? {
                Ok(format!("{jid} is due now"))
            } else {
                Err(format!("no job {id}"))
            }
        }
        Request::QueueRetry { id: None } => {
            let mut n = 0;
            for (jid, _) in store.jobs().map_err(e)?.into_iter().chain(store.dead_letters().map_err(e)?) {
                if store.retry(jid).await.map_err(e)? {
                    n += 1;
                }
            }
            Ok(format!("{n} jobs are due now"))
        }
        Request::QueueDelete { id } if id.eq_ignore_ascii_case("all") => {
            let mut n = 0;
            for (jid, _) in store.jobs().map_err(e)?.into_iter().chain(store.dead_letters().map_err(e)?) {
                if store.delete(jid).await.map_err(e)? {
                    n += 1;
                }
            }
            Ok(format!("{n} jobs deleted"))
        }
        Request::QueueDelete { id } => {
            let jid: JobId = id.parse()?;
            if store.delete(jid).await.map_err(e)? {
                Ok(format!("{jid} deleted"))
            } else {
                Err(format!("no job {id}"))
            }
        }
    }
}

/// Whether a peer with `uid` may use the admin socket of a gateway running as `own`.
pub fn peer_allowed(uid: u32, own: u32) -> bool {
    uid == own || uid == 0
}

/// Serves the admin socket until `shutdown`, to peers whose uid is `own_uid` or root's.
pub async fn serve(
    listener: UnixListener,
    store: Arc<Store>,
    shared: Option<Arc<JetQueue>>,
    own_uid: u32,
    shutdown: CancellationToken,
) {
    // Few operators at once: more wait their turn.
    let slots = Arc::new(tokio::sync::Semaphore::new(8));
    loop {
        let stream = tokio::select! {
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "Admin socket accept failed.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        match stream.peer_cred() {
            Ok(cred) if peer_allowed(cred.uid(), own_uid) => {}
            Ok(cred) => {
                warn!(uid = cred.uid(), "Admin socket: refused a peer of another user.");
                continue;
            }
            Err(e) => {
                warn!(error = %e, "Admin socket: cannot tell who the peer is; refused.");
                continue;
            }
        }
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else { return };
        let store = Arc::clone(&store);
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            // Requests are small: at most 1 MiB is read.
            let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, 1 << 20));
            let response = match tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line)).await {
                Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
                    Ok(request) => execute(&store, shared.as_deref(), request).await,
                    Err(e) => Response { ok: false, text: format!("bad admin request: {e}") },
                },
                _ => return,
            };
            let mut out = serde_json::to_vec(&response).unwrap_or_default();
            out.push(b'\n');
            let _ = tokio::time::timeout(Duration::from_secs(10), write.write_all(&out)).await;
        });
    }
}

/// Sends `request` to the gateway running on `socket`. `Ok(None)` if no
/// gateway answers there (then the data dir may be opened directly).
///
/// # Errors
/// If a gateway answered but the exchange failed.
pub async fn call(socket: &Path, request: &Request) -> Result<Option<Response>, String> {
    let stream = match UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
            return Ok(None)
        }
        Err(e) => return Err(format!("cannot reach the gateway at {}: {e}", socket.display())),
    };
    let (read, mut write) = stream.into_split();
    let mut out = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    out.push(b'\n');
    write.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await.map_err(|e| e.to_string())?;
    serde_json::from_str(&line).map(Some).map_err(|e| format!("bad answer from the gateway: {e}"))
}
