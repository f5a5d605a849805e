//! `latssiam-bridge local`: the person's own IMAP bridge (src/local/).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use latssiam_bridge::local::{self, store::Store, Access};

use crate::cli::net;
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
    /// Make a new bridge password (printed once; only its hash is kept) and,
    /// if there is none, the self-signed certificate; then stop.
    #[arg(long)]
    init: bool,
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
    net::runtime()?.block_on(async {
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
