//! `latssiam-bridge run`, `contacts …` and `queue …`.
//!
//! The operator commands go through the running gateway's admin socket, and
//! open the data dir directly only when no gateway answers there.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use latssiam::client::{Client, Resolver};
use latssiam::identity::{certificate_from_pem_or_der, CertInfo};
use latssiam::tls::FilePins;
use latssiam::{Fingerprint, Identity};
use latssiam_bridge::gateway::admin::{self, Request};
use latssiam_bridge::gateway::config::{LogFormat, Settings};
use latssiam_bridge::gateway::contacts::Contact;
use latssiam_bridge::gateway::db::Store;
use tokio_util::sync::CancellationToken;

#[derive(Args)]
pub struct ConfigArg {
    /// A TOML file of settings (see config/default.toml).
    #[arg(long, env = "LATSSIAM_BRIDGE_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    config: ConfigArg,
}

// Parsed once per command line: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum ContactsCommand {
    /// Add (or replace) a contact, from a certificate file or by asking their server (VERIFY).
    Add {
        #[command(flatten)]
        config: ConfigArg,
        /// Their certificate (PEM or DER).
        #[arg(long, group = "source")]
        cert: Option<PathBuf>,
        /// Their fingerprint; the certificate is obtained with VERIFY from --server.
        #[arg(long, requires = "server", group = "source")]
        fingerprint: Option<Fingerprint>,
        /// Their LATSSIAM URL (latssiam:FP//HOST/PATH): the certificate is
        /// fetched over Gemini and accepted only if its fingerprint is the URL's.
        #[arg(long, group = "source")]
        url: Option<String>,
        /// A PNG picture of their QR code (what `identity show --qr --png` writes): read, then as --url.
        #[arg(long, group = "source", value_name = "FILE.png")]
        qr: Option<PathBuf>,
        /// Their address (user@domain): its LATSSIAM URL is found by WebFinger
        /// (https://DOMAIN/.well-known/webfinger), then as --url.
        #[arg(long, group = "source", value_name = "ADDRESS")]
        address: Option<String>,
        /// With --address: where to ask WebFinger instead of https://DOMAIN (e.g. http://127.0.0.1:8080).
        #[arg(long, requires = "address", value_name = "URL")]
        webfinger: Option<String>,
        /// With --url, --qr or --address: fetch the certificate from this
        /// ADDR:PORT instead of the URL's host (TLS name, pin and fingerprint check stay the URL's).
        #[arg(long, value_name = "ADDR:PORT")]
        gemini_connect: Option<std::net::SocketAddr>,
        /// Their server, HOST[:PORT] (default: the host of their address).
        #[arg(long)]
        server: Option<String>,
        /// An email address that reaches them.
        #[arg(long)]
        email: Option<String>,
        /// They may send out through the gateway.
        #[arg(long)]
        allow_send: bool,
        /// WebFinger may describe them to anyone who asks (their LATSSIAM
        /// URL, key and email alias): only with their consent. People with a
        /// mailbox on the embedded home server are described anyway.
        #[arg(long)]
        discoverable: bool,
    },
    /// List contacts.
    List {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Remove a contact (by fingerprint, address or email alias).
    Remove {
        #[command(flatten)]
        config: ConfigArg,
        /// Fingerprint, LATSSIAM address or email alias.
        who: String,
    },
}

#[derive(Subcommand)]
pub enum QueueCommand {
    /// List queued jobs and dead letters (like mailq).
    List {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Show one job and its message's header.
    Show {
        #[command(flatten)]
        config: ConfigArg,
        /// The job id (as `queue list` shows it).
        id: String,
    },
    /// Make a job due now (a dead letter goes back in the queue); --all for every job.
    Retry {
        #[command(flatten)]
        config: ConfigArg,
        /// The job id.
        #[arg(required_unless_present = "all")]
        id: Option<String>,
        /// Every job.
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Delete a job or dead letter (ALL for everything, like postsuper -d ALL).
    Delete {
        #[command(flatten)]
        config: ConfigArg,
        /// The job id, or ALL.
        id: String,
    },
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start tokio")
}

/// `latssiam-bridge run`.
pub fn run(args: RunArgs, log_json: &dyn Fn(bool)) -> Result<()> {
    let settings = Settings::load(args.config.config.as_deref())?;
    log_json(settings.gateway.log_format == LogFormat::Json);
    runtime()?.block_on(async {
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        tokio::spawn(async move {
            crate::cli::server::shutdown_signal().await;
            token.cancel();
        });
        latssiam_bridge::gateway::run(settings, shutdown).await
    })
}

#[derive(Args)]
pub struct HealthcheckArgs {
    #[command(flatten)]
    config: ConfigArg,
}

/// Where to reach a listener bound to `addr` from this host (an unspecified
/// address is reached on loopback).
fn local(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => (std::net::Ipv4Addr::LOCALHOST, addr.port()).into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => (std::net::Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// Connects to `addr`, with every step within 1 s (the whole check stays
/// inside the 5 s a container runtime gives it).
fn connect(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpStream> {
    let limit = std::time::Duration::from_secs(1);
    let s = std::net::TcpStream::connect_timeout(&addr, limit)?;
    s.set_read_timeout(Some(limit))?;
    s.set_write_timeout(Some(limit))?;
    Ok(s)
}

/// `latssiam-bridge healthcheck`: the running gateway's `/healthz` (queue
/// writable, home server reachable) and its SMTP greeting.
pub fn healthcheck(args: HealthcheckArgs) -> Result<()> {
    use std::io::{BufRead as _, Read as _, Write as _};
    let settings = Settings::load(args.config.config.as_deref())?;
    let http = local(settings.http.listen);
    let mut s = connect(http).with_context(|| format!("unhealthy: http.listen {http}"))?;
    // /healthz answers within 3 s (a durable write and a connection to the home server).
    s.set_read_timeout(Some(std::time::Duration::from_secs(3)))
        .with_context(|| format!("unhealthy: http.listen {http}"))?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .with_context(|| format!("unhealthy: http.listen {http}"))?;
    let mut answer = String::new();
    s.take(64 * 1024).read_to_string(&mut answer).with_context(|| format!("unhealthy: http.listen {http}"))?;
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b).trim();
    if !answer.starts_with("HTTP/1.1 200") {
        bail!("unhealthy: {}", if body.is_empty() { answer.lines().next().unwrap_or("no answer") } else { body });
    }
    let smtp = local(settings.smtp.listen);
    let s = connect(smtp).with_context(|| format!("unhealthy: smtp.listen {smtp}"))?;
    let mut greeting = String::new();
    std::io::BufReader::new(&s)
        .take(1024)
        .read_line(&mut greeting)
        .with_context(|| format!("unhealthy: smtp.listen {smtp}"))?;
    let _ = (&s).write_all(b"QUIT\r\n");
    // A listener at its connection limit still answers (421 4.7.0): it is up.
    if !greeting.starts_with("220") && !greeting.starts_with("421 4.7.0") {
        bail!("unhealthy: smtp.listen {smtp} greeted {:?}", greeting.trim_end());
    }
    Ok(())
}

/// Sends `request` to the running gateway, or carries it out on the data dir.
async fn operate(settings: &Settings, request: Request) -> Result<()> {
    let response = match admin::call(&settings.admin_socket(), &request).await.map_err(anyhow::Error::msg)? {
        Some(r) => r,
        // With the shared queue, no node is needed: the contacts and the
        // queue are on NATS (a machine with only this command and the URL).
        None if settings.queue.backend == latssiam_bridge::gateway::config::QueueBackend::Jetstream => {
            let shared = latssiam_bridge::gateway::queue::jetstream::connect(settings).await?;
            match admin::execute_shared(&shared, request).await {
                Ok(text) => admin::Response { ok: true, text },
                Err(text) => admin::Response { ok: false, text },
            }
        }
        None => {
            let store = Store::open(&settings.queue_dir()).with_context(|| {
                format!("cannot open {} and no gateway answers on its admin socket", settings.queue_dir().display())
            })?;
            admin::execute(&store, None, request).await
        }
    };
    if response.ok {
        print!("{}", response.text);
        if !response.text.ends_with('\n') {
            println!();
        }
        Ok(())
    } else {
        bail!("{}", response.text)
    }
}

async fn verify_certificate(settings: &Settings, server: &str, fingerprint: Fingerprint) -> Result<Vec<u8>> {
    let identity = Arc::new(
        Identity::load(&settings.gateway.data_dir.join("identity"))
            .context("the gateway identity is needed for VERIFY: start the gateway once first")?,
    );
    let pins = FilePins::open(settings.gateway.data_dir.join("cli-pins"))?;
    let candidates = Resolver::new(settings.routes.clone()).resolve_server(server).await?;
    let (name, addr) = candidates.into_iter().next().with_context(|| format!("no address for {server}"))?;
    let mut client = Client::connect(addr, &name, Some(identity), &pins).await?;
    let result = client.verify(fingerprint).await?;
    client.quit().await;
    match result {
        Ok(v) => Ok(v.owner_cert),
        Err(status) => bail!("{server} answered {status}"),
    }
}

/// `latssiam-bridge contacts …`.
pub fn contacts(command: ContactsCommand) -> Result<()> {
    // Stopped, the command opens the gateway's database itself: what it
    // creates there is as private as what `run` creates.
    latssiam::files::private_umask();
    runtime()?.block_on(async {
        match command {
            ContactsCommand::Add {
                config,
                cert,
                fingerprint,
                url,
                qr,
                address,
                webfinger,
                gemini_connect,
                server,
                email,
                allow_send,
                discoverable,
            } => {
                let settings = Settings::load(config.config.as_deref())?;
                let asked = address.clone();
                let url = match (url, qr, address) {
                    (Some(u), _, _) => Some(u),
                    (None, Some(png), _) => Some(crate::cli::qr::read_png(&png)?),
                    (None, None, Some(a)) => Some(
                        latssiam_bridge::gateway::discovery::lookup(&a, webfinger.as_deref())
                            .await
                            .map_err(|e| anyhow::anyhow!("WebFinger: {e}"))?
                            .to_string(),
                    ),
                    _ => None,
                };
                // The address the URL's path names (mailbox@host), which the certificate must name too.
                let url_address = url
                    .as_deref()
                    .and_then(|u| u.parse::<latssiam::identity::LatssiamUrl>().ok())
                    .and_then(|u| latssiam_bridge::gateway::discovery::path_address(&u.host, &format!("/{}", u.path)));
                // WebFinger at a domain speaks for that domain's addresses only.
                if let (Some(asked), Some(named)) = (&asked, &url_address) {
                    if !named.eq_ignore_ascii_case(asked) {
                        bail!("WebFinger for {asked} points to {named}'s certificate; not added");
                    }
                }
                let cert = match (cert, fingerprint, &server, url) {
                    (Some(path), _, _, _) => {
                        let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
                        certificate_from_pem_or_der(&bytes)?.to_vec()
                    }
                    (None, Some(fp), Some(server), _) => verify_certificate(&settings, server, fp).await?,
                    (None, None, _, Some(url)) => {
                        let pins = FilePins::open(settings.gateway.data_dir.join("cli-pins"))?;
                        crate::cli::net::fetch_certificate(&url, gemini_connect, &pins).await?
                    }
                    _ => bail!(
                        "contacts add needs --cert FILE, --fingerprint FP --server HOST, --url URL, --qr FILE.png or --address ADDRESS"
                    ),
                };
                let info = CertInfo::from_der(&cert)?;
                let Some(address) = info.address else {
                    bail!("the certificate names no LATSSIAM address (UID and SAN rfc822Name)");
                };
                // WebFinger at a domain speaks for that domain's addresses only:
                // what it points to must be the certificate of the address asked for.
                if let Some(asked) = &asked {
                    if !address.to_string().eq_ignore_ascii_case(asked) {
                        bail!("WebFinger for {asked} points to {address}'s certificate; not added");
                    }
                }
                if let Some(named) = &url_address {
                    if !address.to_string().eq_ignore_ascii_case(named) {
                        bail!("the certificate at that URL is {address}'s, not {named}'s");
                    }
                }
                if let Some(e) = &email {
                    if !e.contains('@') || e.chars().any(|c| c.is_whitespace() || c.is_control()) {
                        bail!("--email {e:?} is not an email address");
                    }
                }
                let contact =
                    Contact { address: address.to_string(), cert, email, allow_send, server, gone: false, discoverable };
                operate(&settings, Request::ContactAdd { contact }).await
            }
            ContactsCommand::List { config } => {
                operate(&Settings::load(config.config.as_deref())?, Request::ContactList).await
            }
            ContactsCommand::Remove { config, who } => {
                operate(&Settings::load(config.config.as_deref())?, Request::ContactRemove { who }).await
            }
        }
    })
}

/// `latssiam-bridge queue …`.
pub fn queue(command: QueueCommand) -> Result<()> {
    latssiam::files::private_umask();
    let (config, request) = match command {
        QueueCommand::List { config } => (config, Request::QueueList),
        QueueCommand::Show { config, id } => (config, Request::QueueShow { id }),
        QueueCommand::Retry { config, id, all: _ } => (config, Request::QueueRetry { id }),
        QueueCommand::Delete { config, id } => (config, Request::QueueDelete { id }),
    };
    let settings = Settings::load(config.config.as_deref())?;
    runtime()?.block_on(operate(&settings, request))
}
