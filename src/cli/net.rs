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
    /// Seconds to wait for the first message.
    #[arg(long, default_value_t = 0)]
    deadline: u64,
    /// Stop after this many messages.
    #[arg(long)]
    max: Option<usize>,
    /// Where to write one .eml file per message.
    #[arg(long)]
    out_dir: PathBuf,
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

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start tokio")
}

/// Connects to `server` (HOST[:PORT]), trying each of its addresses.
async fn connect(server: &str, identity: &Arc<Identity>, pins: &FilePins) -> Result<Client> {
    connect_any(Resolver::default().resolve_server(server).await?, identity, pins).await
}

async fn connect_any(
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
        let message = crypto::seal(&plaintext, &cert)?;
        if message.len() > latssiam::wire::MAX_BLOCK_DER {
            bail!(
                "the message is too large: {} octets of CMS, at most {}",
                message.len(),
                latssiam::wire::MAX_BLOCK_DER
            );
        }
        let signature = if args.sign { Some(crypto::sign(&message, &identity)?) } else { None };
        let status = client.send(fingerprint, &message, signature.as_deref()).await?;
        client.quit().await;
        expect(&status, &[Code::MessageAccepted])
    })
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

pub fn fetch(args: FetchArgs) -> Result<()> {
    let identity = Arc::new(load_identity(&args.common.identity)?);
    let pins = pin_file(args.common.pins.as_deref())?;
    std::fs::create_dir_all(&args.out_dir).with_context(|| format!("cannot create {}", args.out_dir.display()))?;
    runtime()?.block_on(async {
        let mut client = connect(&args.server, &identity, &pins).await?;
        let mut deadline = Duration::from_secs(args.deadline);
        let mut fetched = 0usize;
        while args.max.is_none_or(|max| fetched < max) {
            let delivered = match client.accept(deadline).await? {
                Accepted::Message(d) => d,
                Accepted::Nothing(status) => {
                    println!("{status}");
                    if !matches!(status.code(), Code::NoMoreMessages | Code::SlowDown) {
                        client.quit().await;
                        bail!("the server answered {status}");
                    }
                    break;
                }
            };
            // After the first message, drain what is there without waiting.
            deadline = Duration::ZERO;
            let signer = match &delivered.signature {
                Some(sig) => match crypto::verify(sig, &delivered.message) {
                    Ok(cert) => Some(cert),
                    Err(e) => {
                        eprintln!("refused a message: its signature does not verify ({e})");
                        client.refuse(Status::of(Code::MessageRefused)).await?;
                        continue;
                    }
                },
                None if args.require_signature => {
                    eprintln!("refused an unsigned message");
                    client.refuse(Status::of(Code::SignatureRequired)).await?;
                    continue;
                }
                None => None,
            };
            let plaintext = match crypto::open(&delivered.message, &identity) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("refused a message: {e}");
                    client.refuse(Status::of(Code::MessageRefused)).await?;
                    continue;
                }
            };
            // Named by content, so a redelivered message overwrites its own copy.
            let digest = Fingerprint::of(&delivered.message).to_string();
            let path = write_durably(&args.out_dir, &format!("{}.eml", &digest[..24]), &plaintext)?;
            client.ack().await?;
            fetched += 1;
            match signer.map(|c| CertInfo::from_der(&c)).transpose()? {
                Some(info) => {
                    let who = info.address.map_or_else(|| "(no address)".to_owned(), |a| a.to_string());
                    println!("{} signed by {who} {}", path.display(), info.fingerprint);
                }
                None => println!("{} unsigned", path.display()),
            }
        }
        client.quit().await;
        Ok(())
    })
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
