//! `latssiam-bridge local`: one person's mail program keeps working after
//! the move. Mail taken off their home server lands in a Maildir with an
//! index (`store`), served over IMAP on loopback (`imap`), with the MIME
//! structure read from the stored octets (`mime`).
//!
//! Credentials (`Access`): `local --init` makes a password, prints it once
//! and keeps only its argon2 hash in `credentials` (mode 0600), and makes a
//! self-signed certificate for STARTTLS and implicit TLS (`tls/`), whose
//! SHA-256 fingerprint it prints. A password travels in the clear only on
//! a loopback listener.

pub mod imap;
pub mod mime;
pub mod store;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How long a TLS handshake may take.
const HANDSHAKE_TIME: Duration = Duration::from_secs(30);
/// At most this many password checks at once (argon2 takes 19 MiB each).
const MAX_CHECKS: usize = 2;

/// The credentials file.
#[derive(Serialize, Deserialize)]
struct Credentials {
    user: String,
    /// The argon2 hash, PHC string form.
    hash: String,
}

/// Who may log in, and the TLS to offer.
pub struct Access {
    user: String,
    hash: String,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    checks: tokio::sync::Semaphore,
    pub throttle: latssiam::limits::FailureDelay,
    /// SHA-256 of the last user name and password that passed argon2, in
    /// memory only: a mail program opens many connections, and each need
    /// not cost 19 MiB and tens of milliseconds (Dovecot's auth cache).
    verified: std::sync::Mutex<Option<[u8; 32]>>,
}

fn login_digest(user: &[u8], password: &[u8]) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(&(user.len() as u64).to_be_bytes());
    ctx.update(&user.to_ascii_lowercase());
    ctx.update(password);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

impl Access {
    /// Loads `credentials` and `tls/` from the data folder.
    ///
    /// # Errors
    /// `local --init` was not run, or the files are damaged.
    pub fn load(data: &Path) -> Result<Self> {
        let path = data.join("credentials");
        let bytes = std::fs::read(&path)
            .with_context(|| format!("cannot read {} (run `latssiam-bridge local --init` first)", path.display()))?;
        let c: Credentials = serde_json::from_slice(&bytes).context("the credentials file is damaged")?;
        PasswordHash::new(&c.hash).map_err(|e| anyhow::anyhow!("the credentials file is damaged: {e}"))?;
        let tls = load_tls(&data.join("tls"))?;
        Ok(Access {
            user: c.user,
            hash: c.hash,
            tls: Some(tls),
            checks: tokio::sync::Semaphore::new(MAX_CHECKS),
            throttle: latssiam::limits::FailureDelay::default(),
            verified: std::sync::Mutex::new(None),
        })
    }

    /// Whether `user` and `password` are right. A wrong answer comes after
    /// a delay that grows with the recent failures of every client.
    pub async fn check(&self, user: &[u8], password: &[u8]) -> bool {
        let digest = login_digest(user, password);
        let cached = *self.verified.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if cached.is_some_and(|c| aws_lc_rs::constant_time::verify_slices_are_equal(&c, &digest).is_ok()) {
            return true;
        }
        let ok = match self.checks.acquire().await {
            Ok(_permit) => {
                let hash = self.hash.clone();
                let password = password.to_vec();
                let right = tokio::task::spawn_blocking(move || {
                    PasswordHash::new(&hash)
                        .is_ok_and(|h| argon2::Argon2::default().verify_password(&password, &h).is_ok())
                })
                .await
                .unwrap_or(false);
                right && user.eq_ignore_ascii_case(self.user.as_bytes())
            }
            Err(_) => false,
        };
        if ok {
            *self.verified.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(digest);
        } else {
            tokio::time::sleep(self.throttle.failed()).await;
        }
        ok
    }

    /// Access for `user` with `password`, no TLS (for the fuzz target and tests).
    ///
    /// # Errors
    /// The password cannot be hashed.
    pub fn with_password(user: &str, password: &str) -> Result<Self> {
        let salt = SaltString::encode_b64(b"fixed salt, tests").map_err(|e| anyhow::anyhow!("{e}"))?;
        let hash = argon2::Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map_err(|e| anyhow::anyhow!("cannot hash the password: {e}"))?
            .to_string();
        Ok(Access {
            user: user.to_owned(),
            hash,
            tls: None,
            checks: tokio::sync::Semaphore::new(MAX_CHECKS),
            throttle: latssiam::limits::FailureDelay::default(),
            verified: std::sync::Mutex::new(None),
        })
    }

    pub fn user(&self) -> &str {
        &self.user
    }
}

/// The submission listener's check: the same password, the same slowing down.
impl bridge_smtp::Authenticator for Access {
    fn check(&self, user: Vec<u8>, password: Vec<u8>) -> Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>> {
        Box::pin(async move { Access::check(self, &user, &password).await })
    }
}

fn load_tls(dir: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let cert =
        std::fs::read(dir.join("cert.der")).with_context(|| format!("cannot read {}/cert.der", dir.display()))?;
    let key = std::fs::read(dir.join("key.der")).with_context(|| format!("cannot read {}/key.der", dir.display()))?;
    let key = rustls_pki_types::PrivateKeyDer::try_from(key).map_err(|e| anyhow::anyhow!("a damaged key: {e}"))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![rustls_pki_types::CertificateDer::from(cert)], key)?;
    Ok(Arc::new(config))
}

/// Writes `bytes` to a new file readable only by its owner.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// What `--init` made: the password (shown once) and the certificate's fingerprint.
pub struct Init {
    pub user: String,
    pub password: String,
    pub fingerprint: String,
    pub certificate: PathBuf,
}

/// Makes a new password (replacing any) and, if there is none, the
/// self-signed certificate.
///
/// # Errors
/// The data folder cannot be written.
pub fn init(data: &Path, user: &str) -> Result<Init> {
    std::fs::create_dir_all(data).with_context(|| format!("cannot create {}", data.display()))?;
    let mut raw = [0u8; 18];
    aws_lc_rs::rand::fill(&mut raw).map_err(|_| anyhow::anyhow!("no randomness"))?;
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyz23456789";
    let password: String = raw.iter().map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char).collect();
    let mut salt = [0u8; 16];
    aws_lc_rs::rand::fill(&mut salt).map_err(|_| anyhow::anyhow!("no randomness"))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow::anyhow!("{e}"))?;
    let hash = argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("cannot hash the password: {e}"))?
        .to_string();
    let creds = Credentials { user: user.to_owned(), hash };
    write_private(&data.join("credentials"), &serde_json::to_vec_pretty(&creds)?)?;
    let tls = data.join("tls");
    std::fs::create_dir_all(&tls)?;
    if !tls.join("cert.der").exists() {
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
        let made = rcgen::generate_simple_self_signed(names).context("cannot make the certificate")?;
        write_private(&tls.join("key.der"), made.signing_key.serialized_der())?;
        std::fs::write(tls.join("cert.der"), made.cert.der().as_ref())?;
        std::fs::write(tls.join("cert.pem"), made.cert.pem())?;
    }
    let der = std::fs::read(tls.join("cert.der"))?;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &der);
    let fingerprint = digest.as_ref().iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":");
    Ok(Init { user: user.to_owned(), password, fingerprint, certificate: tls.join("cert.pem") })
}

/// A client connection, plain or TLS.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Conn {
    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }

    /// The TLS handshake over this plain connection (STARTTLS, or implicit TLS).
    ///
    /// # Errors
    /// Already TLS, a failed or slow handshake.
    pub async fn start_tls(self, config: Arc<rustls::ServerConfig>) -> Result<Conn> {
        let Conn::Plain(tcp) = self else { bail!("TLS is already on") };
        let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
        let tls = tokio::time::timeout(HANDSHAKE_TIME, accept).await.context("the TLS handshake took too long")??;
        Ok(Conn::Tls(Box::new(tls)))
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Serves IMAP on `listener` until the task is dropped; `implicit_tls`
/// starts TLS before the greeting.
///
/// # Errors
/// Accepting fails for good.
pub async fn serve_imap(
    listener: tokio::net::TcpListener,
    store: Arc<store::Store>,
    access: Arc<Access>,
    idle: Arc<tokio::sync::Semaphore>,
    max_message: u32,
    implicit_tls: bool,
) -> Result<()> {
    let local: SocketAddr = listener.local_addr()?;
    let shared = Arc::new(imap::Shared {
        store,
        access: Arc::clone(&access),
        idle,
        max_message,
        plaintext_ok: local.ip().is_loopback(),
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(imap::MAX_CONNECTIONS));
    // Connections beyond the cap are told so, a few at a time; the rest are closed unanswered.
    let refusing = Arc::new(tokio::sync::Semaphore::new(8));
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: wait, do not spin.
                tracing::warn!("IMAP accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            if let Ok(answering) = Arc::clone(&refusing).try_acquire_owned() {
                tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt as _;
                    let _answering = answering;
                    let mut tcp = tcp;
                    let bye = tcp.write_all(b"* BYE too many connections\r\n");
                    let _ = tokio::time::timeout(Duration::from_secs(5), bye).await;
                });
            }
            continue;
        };
        let shared = Arc::clone(&shared);
        let tls = access.tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // Responses are gathered and written in batches: nothing to wait for.
            let _ = tcp.set_nodelay(true);
            let conn = Conn::Plain(tcp);
            let conn = match (implicit_tls, tls) {
                (true, Some(tls)) => match conn.start_tls(tls).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!("IMAP TLS handshake failed: {e:#}");
                        return;
                    }
                },
                _ => conn,
            };
            imap::serve(conn, shared).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    #[tokio::test]
    async fn a_login_is_checked_by_argon2_once_then_remembered_and_a_wrong_one_never() -> Result<()> {
        let access = Access::with_password("me@localhost", "right")?;
        assert!(access.check(b"ME@localhost", b"right").await, "the user name in any case");
        assert!(access.verified.lock().map(|v| v.is_some()).unwrap_or(false), "remembered");
        assert!(access.check(b"me@localhost", b"right").await);
        assert!(!access.check(b"me@localhost", b"wrong").await);
        assert!(!access.check(b"other@localhost", b"right").await, "another user with the right password");
        assert_eq!(access.throttle.total.load(Ordering::Relaxed), 2);
        Ok(())
    }
}
