//! `latssiam-bridge local`: the person's own IMAP bridge (src/local/).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use latssiam_bridge::local::{self, store::Store, Access};

use bridge_smtp::{Envelope, ListenerConfig, Reply, Sink};

use crate::cli::net;
use crate::cli::sendmail::{Refused, Router};
use crate::cli::toolkit::load_identity;

#[derive(Args)]
pub struct LocalArgs {
    /// Your identity directory (cert.pem, key.pem).
    #[arg(long)]
    identity: PathBuf,
    /// The TOFU pin file.
    #[arg(long)]
    pins: Option<PathBuf>,
    /// Your home server, HOST[:PORT]; without it no mail is taken in (the
    /// store is served as it is).
    #[arg(long)]
    server: Option<String>,
    /// Where the Maildir, its index and the bridge's credentials live
    /// (default: local/ in the identity directory).
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// The IMAP listener (STARTTLS; a password in the clear only on loopback).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:1143")]
    imap: SocketAddr,
    /// An IMAP listener with implicit TLS (off unless given).
    #[arg(long, value_name = "ADDR:PORT")]
    imaps: Option<SocketAddr>,
    /// The submission listener (SMTP with STARTTLS and AUTH PLAIN/LOGIN;
    /// a password in the clear only on loopback). Mail is routed as the
    /// `sendmail` command routes it, by its settings file.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:1025")]
    submission: SocketAddr,
    /// A submission listener with implicit TLS (RFC 8314's port 465; off
    /// unless given), routed as `--submission` is.
    #[arg(long, value_name = "ADDR:PORT")]
    submissions: Option<SocketAddr>,
    /// The sendmail settings the submission listener routes by (default:
    /// `$LATSSIAM_SENDMAIL_CONFIG`, else ~/.config/latssiam-bridge/sendmail.toml).
    #[arg(long, value_name = "FILE")]
    sendmail_config: Option<PathBuf>,
    /// Make a new bridge password (printed once; only its hash is kept) and,
    /// if there is none, the self-signed certificate; then stop.
    #[arg(long)]
    init: bool,
}

impl LocalArgs {
    /// Whether this is `--init` (a one-shot), not the long-running bridge.
    pub fn initialising(&self) -> bool {
        self.init
    }
}

pub fn local(args: LocalArgs) -> Result<()> {
    let data = args.data.clone().unwrap_or_else(|| args.identity.join("local"));
    if args.init {
        let identity = load_identity(&args.identity)?;
        let user = identity.address().map_or_else(|| identity.fingerprint().to_string(), ToString::to_string);
        let made = local::init(&data, &user)?;
        println!("user name:   {}", made.user);
        println!("password:    {}", made.password);
        println!("certificate: {} (SHA-256 {})", made.certificate.display(), made.fingerprint);
        println!("The password is shown only now; `local --init` again makes a new one.");
        return Ok(());
    }
    let access = Arc::new(Access::load(&data)?);
    let store = Arc::new(Store::open(&data)?);
    let max_message = u32::try_from(latssiam::fragment::MAX_JOINED).unwrap_or(u32::MAX);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start tokio")?;
    runtime.block_on(async {
        let idle = Arc::new(tokio::sync::Semaphore::new(local::imap::MAX_IDLE));
        let imap = tokio::net::TcpListener::bind(args.imap)
            .await
            .with_context(|| format!("cannot listen on {}", args.imap))?;
        eprintln!("IMAP on {} (user {})", imap.local_addr()?, access.user());
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(local::serve_imap(
            imap,
            Arc::clone(&store),
            Arc::clone(&access),
            Arc::clone(&idle),
            max_message,
            false,
        ));
        if let Some(addr) = args.imaps {
            let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
            eprintln!("IMAP with TLS on {}", l.local_addr()?);
            tasks.spawn(local::serve_imap(l, Arc::clone(&store), Arc::clone(&access), idle, max_message, true));
        }
        match Router::load(args.sendmail_config.as_deref()) {
            Ok(router) => {
                let sink = Arc::new(Submission { router });
                // One budget of message data in memory for both listeners.
                let data_memory = Arc::new(tokio::sync::Semaphore::new(bridge_smtp::listener::DATA_MEMORY_MIB));
                let listeners = [(args.submission, false)].into_iter().chain(args.submissions.map(|a| (a, true)));
                for (addr, implicit_tls) in listeners {
                    let l = tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("cannot listen on {addr}"))?;
                    let with = if implicit_tls { " with TLS" } else { "" };
                    eprintln!("submission{with} on {}", l.local_addr()?);
                    let mut config = ListenerConfig::new("localhost", max_message as usize);
                    config.tls = access.tls.clone();
                    config.implicit_tls = implicit_tls;
                    config.data_memory = Arc::clone(&data_memory);
                    config.auth = Some(Arc::clone(&access) as Arc<dyn bridge_smtp::Authenticator>);
                    config.auth_without_tls = addr.ip().is_loopback();
                    config.max_connections = local::imap::MAX_CONNECTIONS;
                    let sink = Arc::clone(&sink);
                    tasks.spawn(async move {
                        bridge_smtp::serve(l, Arc::new(config), sink, tokio_util::sync::CancellationToken::new()).await;
                        Ok(())
                    });
                }
            }
            Err(e) => eprintln!("no submission listener: {e:#}"),
        }
        if let Some(server) = args.server.clone() {
            tasks.spawn(net::follow_into_store(args.identity.clone(), args.pins.clone(), server, Arc::clone(&store)));
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            Some(r) = tasks.join_next() => r.context("a task failed")?,
            _ = term.recv() => Ok(()),
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })
}

/// What the submission listener hands mail to: the sendmail router.
struct Submission {
    router: Router,
}

impl Sink for Submission {
    fn recipient(&self, _from: &str, to: &str) -> impl std::future::Future<Output = Result<(), Reply>> + Send {
        let ok = to.rsplit_once('@').is_some_and(|(l, h)| !l.is_empty() && !h.is_empty());
        async move {
            if ok {
                Ok(())
            } else {
                Err(Reply::new(550, [5, 1, 3], "Not an address"))
            }
        }
    }

    async fn message(&self, envelope: Envelope, data: Vec<u8>) -> Reply {
        let mut recipients: Vec<String> = envelope.recipients.iter().map(|r| r.trim().to_lowercase()).collect();
        let mut seen = std::collections::HashSet::new();
        recipients.retain(|r| seen.insert(r.clone()));
        match self.router.submit(&data, recipients).await {
            Ok(()) => Reply::new(250, [2, 0, 0], "Sent"),
            Err(Refused { exit, why }) => {
                tracing::warn!("submission refused: {why}");
                // sendmail's exit codes (sysexits) as SMTP replies.
                match exit {
                    67 => Reply::new(550, [5, 1, 1], why),
                    65 => Reply::new(554, [5, 6, 0], why),
                    64 => Reply::new(554, [5, 5, 4], why),
                    69 => Reply::new(550, [5, 7, 1], why),
                    78 => Reply::new(451, [4, 3, 5], why),
                    _ => Reply::new(451, [4, 4, 1], why),
                }
            }
        }
    }
}
