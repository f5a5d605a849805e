//! The network client commands: register, deregister, send, fetch, verify.
//!
//! TOFU pins live in `$XDG_DATA_HOME/latssiam-bridge/pins` (or
//! `~/.local/share/latssiam-bridge/pins`) unless `--pins FILE` is given.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use latssiam::client::{Accepted, Client, Resolver};
use latssiam::identity::{certificate_from_pem_or_der, CertInfo};
use latssiam::tls::FilePins;
use latssiam::wire::{Code, Password, Status};
use latssiam::{crypto, Fingerprint, Identity};

use crate::cli::toolkit::{load_identity, read_input};

#[derive(Args)]
pub struct Common {
    /// Your identity directory (cert.pem, key.pem).
    #[arg(long)]
    identity: PathBuf,
    /// The TOFU pin file.
    #[arg(long)]
    pins: Option<PathBuf>,
}

#[derive(Args)]
pub struct RegisterArgs {
    #[command(flatten)]
    common: Common,
    /// The server, HOST[:PORT] (port 1977 by default).
    #[arg(long)]
    server: String,
    /// The operator's pre-shared registration password.
    #[arg(long)]
    password: String,
}

#[derive(Args)]
pub struct DeregisterArgs {
    #[command(flatten)]
    common: Common,
    /// The server, HOST[:PORT].
    #[arg(long)]
    server: String,
}

#[derive(Args)]
pub struct SendArgs {
    #[command(flatten)]
    common: Common,
    /// The recipient's server, HOST[:PORT]; default: found from the
    /// recipient certificate's host by DNS (MX, then A/AAAA).
    /// (`--to` is a certificate file, a fingerprint with `--server`, or a
    /// LATSSIAM URL, whose certificate is fetched over Gemini and must have
    /// the URL's fingerprint.)
    #[arg(long)]
    server: Option<String>,
    /// The recipient: a certificate file, or a fingerprint (the certificate is then obtained with VERIFY).
    #[arg(long)]
    to: String,
    /// With `--to latssiam:...`: fetch the certificate from this ADDR:PORT
    /// instead of the URL's host (the TLS name, pin and fingerprint check stay the URL's).
    #[arg(long, value_name = "ADDR:PORT")]
    gemini_connect: Option<std::net::SocketAddr>,
    /// Sign the message with your identity.
    #[arg(long)]
    sign: bool,
    /// The message, an Internet Message (default: standard input).
    file: Option<PathBuf>,
}

#[derive(Args)]
pub struct FetchArgs {
    #[command(flatten)]
    common: Common,
    /// Your home server, HOST[:PORT].
    #[arg(long)]
    server: String,
    /// Seconds to wait for the first message (with --follow: for each long-poll, default 300).
    #[arg(long)]
    deadline: Option<u64>,
    /// Stop after taking this many messages off the server (a fragment of a
    /// large message counts as one).
    #[arg(long)]
    max: Option<usize>,
    /// Where to write one .eml file per message.
    #[arg(long, required_unless_present = "maildir", conflicts_with = "maildir")]
    out_dir: Option<PathBuf>,
    /// Deliver into this Maildir instead (tmp/, new/, cur/ made if absent;
    /// each message fsynced into new/ before the server is told 31).
    #[arg(long, value_name = "DIR")]
    maildir: Option<PathBuf>,
    /// Stay connected: long-poll ACCEPT, reconnect with back-off after a
    /// failure, stop cleanly on SIGTERM or SIGINT.
    #[arg(long)]
    follow: bool,
    /// Where fragments of large messages wait for the rest of their set
    /// (default: partials/ in the identity directory).
    #[arg(long, value_name = "DIR")]
    partials: Option<PathBuf>,
    /// Refuse unsigned messages (answered 32).
    #[arg(long)]
    require_signature: bool,
}

/// The certificate a LATSSIAM URL names, fetched over Gemini (from
/// `connect` if given) and accepted only with the URL's fingerprint.
///
/// # Errors
/// A bad URL, an unreachable capsule, or a certificate that is not the URL's.
pub async fn fetch_certificate(
    url: &str,
    connect: Option<std::net::SocketAddr>,
    pins: &dyn latssiam::tls::PinStore,
) -> Result<Vec<u8>> {
    let timeout = Duration::from_secs(30);
    let fetched = match connect {
        Some(addr) => latssiam::gemini::fetch_certificate_at(addr, url, pins, timeout).await,
        None => latssiam::gemini::fetch_certificate(url, pins, timeout).await,
    };
    fetched.with_context(|| format!("cannot obtain the certificate of {url}"))
}

pub fn pin_file(path: Option<&Path>) -> Result<FilePins> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => {
            let base = std::env::var_os("XDG_DATA_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
                .context("no HOME or XDG_DATA_HOME for the pin file; pass --pins FILE")?;
            base.join("latssiam-bridge").join("pins")
        }
    };
    Ok(FilePins::open(path)?)
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start tokio")
}

/// Connects to `server` (HOST[:PORT]), trying each of its addresses.
pub async fn connect(server: &str, identity: &Arc<Identity>, pins: &FilePins) -> Result<Client> {
    connect_any(Resolver::default().resolve_server(server).await?, identity, pins).await
}

pub async fn connect_any(
    candidates: impl IntoIterator<Item = (String, std::net::SocketAddr)>,
    identity: &Arc<Identity>,
    pins: &FilePins,
) -> Result<Client> {
    let mut last = None;
    for (host, addr) in candidates {
        match Client::connect(addr, &host, Some(identity.clone()), pins).await {
            Ok(c) => return Ok(c),
            Err(e @ latssiam::client::ClientError::Tls(latssiam::tls::TlsError::PinMismatch { .. })) => {
                return Err(e.into())
            }
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) => Err(e.into()),
        None => bail!("no address to connect to"),
    }
}

/// Success for `ok` codes; otherwise the server's status line as the error.
fn expect(status: &Status, ok: &[Code]) -> Result<()> {
    println!("{status}");
    if ok.contains(&status.code()) {
        Ok(())
    } else {
        bail!("the server answered {status}")
    }
}

pub fn register(args: RegisterArgs) -> Result<()> {
    let identity = Arc::new(load_identity(&args.common.identity)?);
    let pins = pin_file(args.common.pins.as_deref())?;
    let password = Password::new(args.password).context("the password must be 1-54 printable ASCII characters")?;
    runtime()?.block_on(async {
        let mut client = connect(&args.server, &identity, &pins).await?;
        let status = client.register(&password).await?;
        client.quit().await;
        expect(&status, &[Code::RegistrationComplete, Code::RegistrationPending])
    })
}

pub fn deregister(args: DeregisterArgs) -> Result<()> {
    let identity = Arc::new(load_identity(&args.common.identity)?);
    let pins = pin_file(args.common.pins.as_deref())?;
    runtime()?.block_on(async {
        let mut client = connect(&args.server, &identity, &pins).await?;
        let status = client.deregister().await?;
        client.quit().await;
        expect(&status, &[Code::RegistrationComplete])
    })
}

pub fn send(args: SendArgs) -> Result<()> {
    let identity = Arc::new(load_identity(&args.common.identity)?);
    let pins = pin_file(args.common.pins.as_deref())?;
    let plaintext = read_input(args.file.as_deref())?;
    let to_file = Path::new(&args.to);
    let rt = runtime()?;
    let recipient_cert = if args.to.to_ascii_lowercase().starts_with("latssiam:") {
        Some(rt.block_on(fetch_certificate(&args.to, args.gemini_connect, &pins))?)
    } else if to_file.is_file() {
        let bytes = std::fs::read(to_file).with_context(|| format!("cannot read {}", to_file.display()))?;
        Some(certificate_from_pem_or_der(&bytes)?.to_vec())
    } else {
        None
    };
    let fingerprint = match &recipient_cert {
        Some(c) => Fingerprint::of(c),
        None => args.to.parse().with_context(|| {
            format!("--to {:?}: neither a certificate file, a LATSSIAM URL nor a fingerprint", args.to)
        })?,
    };
    rt.block_on(async {
        let mut client = match (&args.server, &recipient_cert) {
            (Some(server), _) => connect(server, &identity, &pins).await?,
            (None, Some(cert)) => {
                let host = CertInfo::from_der(cert)?
                    .address
                    .context("the recipient certificate names no address; pass --server")?
                    .host()
                    .to_owned();
                connect_any(Resolver::default().resolve(&host).await?, &identity, &pins).await?
            }
            (None, None) => bail!("with only a fingerprint, --server is needed"),
        };
        let cert = match recipient_cert {
            Some(c) => c,
            None => match client.verify(fingerprint).await? {
                Ok(v) => v.owner_cert,
                Err(status) => bail!("cannot obtain the recipient's certificate: the server answered {status}"),
            },
        };
        let result = send_message(&mut client, &identity, &cert, &plaintext, args.sign).await;
        client.quit().await;
        let (status, fragments) = result?;
        if fragments > 1 && status.code() == Code::MessageAccepted {
            println!("{status} ({fragments} fragments)");
            return Ok(());
        }
        expect(&status, &[Code::MessageAccepted])
    })
}

/// Sends `plaintext` sealed to `cert` over `client`: as one message (signed
/// if `sign`), or, larger than one block, as PROFILE section 8 fragments,
/// each signed. Returns the last answer (the first that is not `31`) and
/// how many LATSSIAM messages the plaintext took.
///
/// # Errors
/// A message over the size limit, crypto or connection failures.
pub async fn send_message(
    client: &mut Client,
    identity: &Identity,
    cert: &[u8],
    plaintext: &[u8],
    sign: bool,
) -> Result<(Status, u32)> {
    let fingerprint = Fingerprint::of(cert);
    let overhead = latssiam::fragment::sealing_overhead(cert)?;
    if latssiam::fragment::fits_one_block(plaintext.len(), overhead) {
        let message = crypto::seal(plaintext, cert)?;
        let signature = if sign { Some(crypto::sign(&message, identity)?) } else { None };
        return Ok((client.send(fingerprint, &message, signature.as_deref()).await?, 1));
    }
    if plaintext.len() > latssiam::fragment::MAX_JOINED {
        bail!("the message is too large: {} octets, at most {}", plaintext.len(), latssiam::fragment::MAX_JOINED);
    }
    let own = identity.address().context("your certificate names no address, needed for a large message")?;
    let to = CertInfo::from_der(cert)?.address.map_or_else(|| format!("<{fingerprint}@unknown>"), |a| format!("<{a}>"));
    let id = latssiam::fragment::new_id(own.host())?;
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc2822)
        .context("cannot format the date")?;
    let cut = latssiam::fragment::Fragmenter::new(plaintext, overhead, &id, &format!("<{own}>"), &to, &date)?;
    let total = cut.total();
    let mut last = Status::of(Code::MessageAccepted);
    for fragment in cut {
        let message = crypto::seal(&fragment, cert)?;
        let signature = crypto::sign(&message, identity)?;
        last = client.send(fingerprint, &message, Some(&signature)).await?;
        if last.code() != Code::MessageAccepted {
            break;
        }
    }
    Ok((last, total))
}

/// Writes `bytes` to `dir/name` durably: temporary file, fsync, rename, fsync of the directory.
fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot rename to {}", path.display()))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("cannot sync {}", dir.display()))?;
    Ok(path)
}

/// Where `fetch` puts messages.
pub enum Output {
    /// One `<digest>.eml` per message (a redelivered message overwrites its copy).
    Dir(PathBuf),
    /// A Maildir.
    Maildir(PathBuf),
    /// The store of `latssiam-bridge local` (its INBOX).
    Store(Arc<latssiam_bridge::local::store::Store>),
}

impl Output {
    fn open(args: &FetchArgs) -> Result<Self> {
        let out = match (&args.maildir, &args.out_dir) {
            (Some(m), _) => {
                for sub in ["tmp", "new", "cur"] {
                    let d = m.join(sub);
                    std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
                }
                Output::Maildir(m.clone())
            }
            (None, Some(d)) => {
                std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
                Output::Dir(d.clone())
            }
            (None, None) => bail!("--out-dir or --maildir is needed"),
        };
        Ok(out)
    }

    /// Writes one message durably; returns where.
    fn write(&self, message: &[u8]) -> Result<PathBuf> {
        let digest = Fingerprint::of(message).to_string();
        match self {
            Output::Dir(dir) => write_durably(dir, &format!("{}.eml", &digest[..24]), message),
            Output::Maildir(dir) => {
                // Unique by content, so a redelivery after a crash writes the
                // same file again (until a mail program moves it to cur/).
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "localhost".into());
                let host = host.trim().replace(['/', ':'], "_");
                let name = format!("L{}.{host}", &digest[..32]);
                let tmp = write_durably(&dir.join("tmp"), &name, message)?;
                let new = dir.join("new").join(&name);
                std::fs::rename(&tmp, &new).with_context(|| format!("cannot move into {}", new.display()))?;
                let new_dir = dir.join("new");
                std::fs::File::open(&new_dir)
                    .and_then(|d| d.sync_all())
                    .with_context(|| format!("cannot sync {}", new_dir.display()))?;
                Ok(new)
            }
            Output::Store(store) => match store.deliver(message)? {
                Some(uid) => Ok(PathBuf::from(format!("INBOX/{uid}"))),
                None => Ok(PathBuf::from("INBOX (a copy already stored)")),
            },
        }
    }
}

/// The notice written in place of a set that never completed.
fn incomplete_notice(e: &latssiam::fragment::Expired) -> Vec<u8> {
    let (from, subject) =
        e.first.clone().unwrap_or_else(|| ("(unknown: its first part never came)".into(), String::new()));
    let mut m = String::new();
    m.push_str("From: latssiam-bridge fetch <MAILER-DAEMON@localhost>\r\n");
    m.push_str("Subject: A large message arrived incomplete and was discarded\r\n");
    m.push_str(&format!("Date: {}\r\n", latssiam_date_now()));
    m.push_str(
        "Auto-Submitted: auto-generated\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n",
    );
    m.push_str(&format!(
        "A message sent in {} parts arrived with only {} of them within 24 hours and was discarded.\r\n\r\nSigner: {}\r\nFrom: {from}\r\nSubject: {subject}\r\n",
        e.total, e.have, e.signer
    ));
    m.into_bytes()
}

fn latssiam_date_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc2822)
        .unwrap_or_else(|_| "Thu, 01 Jan 1970 00:00:00 +0000".into())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// One ACCEPT session's worth of messages: returns how many were written,
/// and whether the session ended because nothing more was there.
struct Fetcher<'a> {
    args: &'a FetchArgs,
    quiet: bool,
    identity: Arc<Identity>,
    output: Output,
    db: sled::Db,
    joiner: latssiam::fragment::Joiner,
    fetched: usize,
}

impl Fetcher<'_> {
    fn done(&self) -> bool {
        self.args.max.is_some_and(|max| self.fetched >= max)
    }

    async fn flush(&self) -> Result<()> {
        self.db.flush_async().await.context("cannot write the partial-set store")?;
        Ok(())
    }

    fn expire(&mut self) -> Result<()> {
        for e in self.joiner.expire(now_ms(), latssiam::fragment::SET_LIFETIME)? {
            let path = self.output.write(&incomplete_notice(&e))?;
            eprintln!("{} notice: an incomplete set from {} was discarded", path.display(), e.signer);
        }
        Ok(())
    }

    /// Drains the mailbox over `client`, waiting `deadline` for the first message.
    async fn session(&mut self, client: &mut Client, mut deadline: Duration, follow: bool) -> Result<()> {
        while !self.done() {
            let delivered = match client.accept(deadline).await? {
                Accepted::Message(d) => d,
                Accepted::Nothing(status) => {
                    if !follow {
                        println!("{status}");
                    }
                    if !matches!(status.code(), Code::NoMoreMessages | Code::SlowDown) {
                        bail!("the server answered {status}");
                    }
                    if follow {
                        if status.code() == Code::SlowDown {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        self.expire()?;
                        continue;
                    }
                    break;
                }
            };
            if !follow {
                // After the first message, drain what is there without waiting.
                deadline = Duration::ZERO;
            }
            self.take(client, delivered).await?;
        }
        Ok(())
    }

    async fn take(&mut self, client: &mut Client, delivered: latssiam::client::Delivered) -> Result<()> {
        let signer = match &delivered.signature {
            Some(sig) => match crypto::verify(sig, &delivered.message) {
                Ok(cert) => Some(cert),
                Err(e) => {
                    eprintln!("refused a message: its signature does not verify ({e})");
                    return Ok(client.refuse(Status::of(Code::MessageRefused)).await?);
                }
            },
            None if self.args.require_signature => {
                eprintln!("refused an unsigned message");
                return Ok(client.refuse(Status::of(Code::SignatureRequired)).await?);
            }
            None => None,
        };
        let plaintext = match crypto::open(&delivered.message, &self.identity) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("refused a message: {e}");
                return Ok(client.refuse(Status::of(Code::MessageRefused)).await?);
            }
        };
        let whole = match latssiam::fragment::parse(&plaintext) {
            Ok(None) => None,
            Err(e) => {
                eprintln!("refused a fragment: {e}");
                return Ok(client.refuse(Status::of(Code::MessageRefused)).await?);
            }
            Ok(Some(fragment)) => {
                let Some(cert) = &signer else {
                    eprintln!("refused an unsigned fragment");
                    return Ok(client.refuse(Status::of(Code::SignatureRequired)).await?);
                };
                let fp = Fingerprint::of(cert);
                match self.joiner.offer(&fp, &fragment, now_ms()) {
                    Err(latssiam::fragment::JoinError::Refused(e)) => {
                        eprintln!("refused a fragment of {} from {fp}: {e}", fragment.id);
                        return Ok(client.refuse(Status::of(Code::MessageRefused)).await?);
                    }
                    Err(e) => return Err(e.into()),
                    Ok(latssiam::fragment::Offer::Complete(message)) => Some((message, fp, fragment.id)),
                    Ok(_) => {
                        self.flush().await?;
                        client.ack().await?;
                        self.fetched += 1;
                        return Ok(());
                    }
                }
            }
        };
        let path = match &whole {
            Some((message, _, _)) => self.output.write(message)?,
            None => self.output.write(&plaintext)?,
        };
        // The set is forgotten (its tombstone kept) before the last fragment
        // is acknowledged: after a crash in between, the fragment comes
        // again and is dropped as a duplicate.
        if let Some((_, fp, id)) = &whole {
            self.joiner.finish(fp, id, now_ms())?;
            self.flush().await?;
        }
        client.ack().await?;
        self.fetched += 1;
        let message = whole.as_ref().map_or(plaintext.as_slice(), |(m, _, _)| m.as_slice());
        let warning = auth_warning(message);
        if self.quiet {
            tracing::info!("{} stored{warning}", path.display());
            return Ok(());
        }
        match signer.map(|c| CertInfo::from_der(&c)).transpose()? {
            Some(info) => {
                let who = info.address.map_or_else(|| "(no address)".to_owned(), |a| a.to_string());
                println!("{} signed by {who} {}{warning}", path.display(), info.fingerprint);
            }
            None => println!("{} unsigned{warning}", path.display()),
        }
        Ok(())
    }
}

/// The warning a gateway put on a message whose sender it could not
/// authenticate (the `LATSSIAM-Auth-Warning` header), for the fetch line.
fn auth_warning(message: &[u8]) -> String {
    let header_end = message.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(message.len());
    latssiam::fragment::header_values(&message[..header_end], "latssiam-auth-warning")
        .first()
        .map(|v| format!(" WARNING: {}", String::from_utf8_lossy(v).trim()))
        .unwrap_or_default()
}

fn open_fetcher<'a>(args: &'a FetchArgs, identity: &Arc<Identity>, output: Output, quiet: bool) -> Result<Fetcher<'a>> {
    let partials = args.partials.clone().unwrap_or_else(|| args.common.identity.join("partials"));
    let db = sled::Config::new().path(&partials).open().with_context(|| {
        format!("cannot open the partial-set store {} (another fetch running?)", partials.display())
    })?;
    let limit = latssiam::fragment::MAX_JOINED + latssiam::fragment::TRACE_ROOM;
    let joiner = latssiam::fragment::Joiner::new(db.open_tree("partials")?, limit);
    let mut fetcher = Fetcher { args, quiet, identity: Arc::clone(identity), output, db, joiner, fetched: 0 };
    fetcher.expire()?;
    Ok(fetcher)
}

pub fn fetch(args: FetchArgs) -> Result<()> {
    let identity = Arc::new(load_identity(&args.common.identity)?);
    let pins = pin_file(args.common.pins.as_deref())?;
    let output = Output::open(&args)?;
    let mut fetcher = open_fetcher(&args, &identity, output, false)?;
    runtime()?.block_on(async {
        if !args.follow {
            let mut client = connect(&args.server, &identity, &pins).await?;
            let result = fetcher.session(&mut client, Duration::from_secs(args.deadline.unwrap_or(0)), false).await;
            client.quit().await;
            return result;
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = follow(&mut fetcher, &identity, &pins) => r,
            _ = term.recv() => Ok(()),
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })
}

/// Long-polls ACCEPT for good, reconnecting with back-off after a failure.
async fn follow(fetcher: &mut Fetcher<'_>, identity: &Arc<Identity>, pins: &FilePins) -> Result<()> {
    let args = fetcher.args;
    let deadline = Duration::from_secs(args.deadline.unwrap_or(300).max(1));
    let mut backoff = Duration::from_secs(1);
    loop {
        let result = async {
            let mut client = connect(&args.server, identity, pins).await?;
            let r = fetcher.session(&mut client, deadline, true).await;
            client.quit().await;
            r
        }
        .await;
        match result {
            Ok(()) => return Ok(()),
            Err(e) if fetcher.quiet => tracing::warn!("mail in: {e:#}; reconnecting in {} s", backoff.as_secs()),
            Err(e) => eprintln!("fetch: {e:#}; reconnecting in {} s", backoff.as_secs()),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}

/// Takes the person's mail off their home server into `store` for good
/// (what `local` runs beside its listeners).
///
/// # Errors
/// The partial-set store cannot be opened, or a message cannot be stored.
pub async fn follow_into_store(
    identity_dir: PathBuf,
    pins: Option<PathBuf>,
    server: String,
    store: Arc<latssiam_bridge::local::store::Store>,
) -> Result<()> {
    let args = FetchArgs {
        common: Common { identity: identity_dir, pins },
        server,
        deadline: None,
        max: None,
        out_dir: None,
        maildir: None,
        follow: true,
        partials: None,
        require_signature: false,
    };
    let identity = Arc::new(load_identity(&args.common.identity)?);
    let pins = pin_file(args.common.pins.as_deref())?;
    let mut fetcher = open_fetcher(&args, &identity, Output::Store(store), true)?;
    follow(&mut fetcher, &identity, &pins).await
}

pub fn verify(server: &str, identity: &Path, pins: Option<&Path>, fingerprint: Fingerprint) -> Result<()> {
    let identity = Arc::new(load_identity(identity)?);
    let pins = pin_file(pins)?;
    runtime()?.block_on(async {
        let mut client = connect(server, &identity, &pins).await?;
        let result = client.verify(fingerprint).await?;
        let server = Fingerprint::of(client.server_certificate());
        client.quit().await;
        match result {
            Ok(v) => {
                let info = CertInfo::from_der(&v.owner_cert)?;
                let who = info.address.map_or_else(|| "(no address)".to_owned(), |a| a.to_string());
                println!("owner:       {who}");
                println!("fingerprint: {}", info.fingerprint);
                println!("attested:    server key {server} is authorised by the owner");
                Ok(())
            }
            Err(status) => {
                println!("{status}");
                bail!("the server answered {status}")
            }
        }
    })
}
