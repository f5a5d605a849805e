//! `latssiam-bridge`: the command line. Errors are one line on stderr and a
//! non-zero exit status.

mod cli;

use cli::{dkim, gateway, local, net, sendmail, server, toolkit};

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A gateway between email/IRC and LATSSIAM, and a LATSSIAM toolkit.
#[derive(Parser)]
#[command(name = "latssiam-bridge", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway: SMTP listener, delivery worker, ACCEPT poller, metrics
    /// (and the embedded home server unless home.server is set).
    Run(gateway::RunArgs),
    /// Exit 0 if the running gateway is healthy (queue writable, home server
    /// reachable, SMTP and HTTP listeners answering), else 1 with one line.
    Healthcheck(gateway::HealthcheckArgs),
    /// Manage the people the gateway knows (works while the gateway runs).
    #[command(subcommand)]
    Contacts(gateway::ContactsCommand),
    /// Inspect and act on the gateway's queue, like mailq and postsuper.
    #[command(subcommand)]
    Queue(gateway::QueueCommand),
    /// DKIM keys for signing mail going out.
    #[command(subcommand)]
    Dkim(dkim::DkimCommand),
    /// Create and inspect identities (certificate + private key).
    #[command(subcommand)]
    Identity(toolkit::IdentityCommand),
    /// Encrypt a message to a recipient's certificate (CMS AuthEnvelopedData).
    Seal(toolkit::SealArgs),
    /// Decrypt a message with an identity; verifies an armoured signature if present.
    Open(toolkit::OpenArgs),
    /// Make a detached CMS signature over a file.
    Sign(toolkit::SignArgs),
    /// Verify a detached signature (--signature SIG [IN]), or ask a server to
    /// prove it serves a mailbox (--server HOST --identity DIR FINGERPRINT).
    Verify(VerifyArgs),
    /// Run the reference LATSSIAM server, or operate on its mailboxes.
    Server(server::ServerArgs),
    /// Register your identity's mailbox on a server (MAILBOX REGISTER).
    Register(net::RegisterArgs),
    /// Deregister your mailbox (MAILBOX DEREGISTER).
    Deregister(net::DeregisterArgs),
    /// Encrypt (and optionally sign) a message and SEND it.
    Send(net::SendArgs),
    /// Fetch your messages (ACCEPT), decrypt them, join large ones, and save
    /// them as .eml files or into a Maildir.
    Fetch(net::FetchArgs),
    /// Submit a message like sendmail (for mutt, aerc, git send-email):
    /// LATSSIAM recipients directly, email addresses through your gateway.
    Sendmail(sendmail::SendmailArgs),
    /// Your own IMAP bridge on loopback: takes your mail off your home
    /// server into a Maildir and serves it to Thunderbird, Apple Mail, mutt
    /// or mbsync (`--init` first, for the password and certificate).
    Local(local::LocalArgs),
}

#[derive(clap::Args)]
struct VerifyArgs {
    /// The detached signature to check, DER or armour.
    #[arg(long, conflicts_with = "server")]
    signature: Option<std::path::PathBuf>,
    /// The server to ask, HOST[:PORT].
    #[arg(long)]
    server: Option<String>,
    /// Your identity directory (for --server).
    #[arg(long)]
    identity: Option<std::path::PathBuf>,
    /// The TOFU pin file (for --server).
    #[arg(long)]
    pins: Option<std::path::PathBuf>,
    /// With --signature: the signed file (default: standard input). With --server: the owner's fingerprint.
    arg: Option<String>,
}

/// Logs go to stderr, human-readable or JSON; the level comes from `LATSSIAM_LOG` (default `info`).
fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LATSSIAM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init();
    }
}

/// glibc's malloc serves a large buffer from `mmap` only until one is freed;
/// then it raises that threshold and serves the next ones from its arenas,
/// which keep freed memory. A gateway taking several 9 MB messages at once
/// then holds every size it ever had, in each arena (measured: 157 MB of
/// peak RSS growth with 8 such messages in flight, 54 MB with the threshold
/// fixed at 1 MiB). It is fixed at 256 KiB, below 512 KiB: sled makes 40
/// zeroed histograms of 512 KiB at start, which `mmap` leaves untouched but
/// the heap did not (5.5 MB resident in every process that opens a sled
/// database, at 1 MiB). The threshold can be fixed from the environment only
/// (the crate forbids `unsafe`, which `mallopt` needs), and glibc reads it
/// at start: so a long-running process without it starts itself again with
/// it, once, before any thread exists. An operator's own value is kept.
///
/// `one_arena`: one malloc arena for all threads (`MALLOC_ARENA_MAX=1`),
/// for `local`, one person's process whose threads mostly wait: glibc's
/// arena per busy thread held 4 MB of its 11 MB of heap (measured beside
/// Dovecot, docs/PERFORMANCE.md).
fn large_buffers_given_back(one_arena: bool) {
    const VAR: &str = "MALLOC_MMAP_THRESHOLD_";
    // Set by the restart itself: glibc drops MALLOC_* in a process with
    // file capabilities (a setcap for port 25), which must not restart forever.
    const RESTARTED: &str = "LATSSIAM_MALLOC_RESTARTED";
    let glibc = cfg!(all(target_os = "linux", target_env = "gnu"));
    if !glibc || std::env::var_os(VAR).is_some() || std::env::var_os(RESTARTED).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    use std::os::unix::process::CommandExt as _;
    let mut args = std::env::args_os();
    let mut command = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        command.arg0(arg0);
    }
    command.args(args).env(VAR, "262144").env(RESTARTED, "1");
    if one_arena && std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        command.env("MALLOC_ARENA_MAX", "1");
    }
    let e = command.exec();
    // Only reached if exec failed: go on as we are.
    eprintln!("latssiam-bridge: cannot restart with {VAR} set ({e}); large buffers may stay in memory");
}

/// Log segment buffers (512 KiB each) kept for reuse by `run` and `server`.
const SPARE_LOG_SEGMENTS: usize = 4;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(&cli.command, Command::Run(_)) || matches!(&cli.command, Command::Server(a) if a.serves()) {
        large_buffers_given_back(false);
        // A process that writes its log steadily reuses the buffers of
        // finished log segments instead of faulting in fresh ones: 8.3 -> 1.6
        // page faults per relayed message in the server, 2.5 -> 0 in the
        // gateway (vendor/sled/PATCHES.md, 4). At most 2 MiB stay resident.
        sled::keep_spare_segment_buffers(SPARE_LOG_SEGMENTS);
    }
    if matches!(&cli.command, Command::Local(a) if !a.initialising()) {
        large_buffers_given_back(true);
    }
    if let Command::Sendmail(a) = cli.command {
        init_logging(false);
        return sendmail::sendmail(a);
    }
    if !matches!(cli.command, Command::Run(_)) {
        init_logging(false);
    }
    let result = match cli.command {
        Command::Run(a) => gateway::run(a, &init_logging),
        Command::Healthcheck(a) => gateway::healthcheck(a),
        Command::Contacts(c) => gateway::contacts(c),
        Command::Queue(c) => gateway::queue(c),
        Command::Dkim(c) => dkim::dkim(c),
        Command::Identity(c) => toolkit::identity(c),
        Command::Seal(a) => toolkit::seal(a),
        Command::Open(a) => toolkit::open(a),
        Command::Sign(a) => toolkit::sign(a),
        Command::Verify(a) => match (a.signature, a.server, a.identity) {
            (Some(signature), None, _) => toolkit::verify(&signature, a.arg.as_deref().map(std::path::Path::new)),
            (None, Some(server), Some(identity)) => match a.arg.as_deref().map(str::parse) {
                Some(Ok(fingerprint)) => net::verify(&server, &identity, a.pins.as_deref(), fingerprint),
                _ => Err(anyhow::anyhow!(
                    "verify --server needs the mailbox owner's FINGERPRINT (64 lower-case hex digits)"
                )),
            },
            (None, Some(_), None) => Err(anyhow::anyhow!("verify --server needs --identity DIR")),
            _ => {
                Err(anyhow::anyhow!("verify needs --signature SIG [FILE], or --server HOST --identity DIR FINGERPRINT"))
            }
        },
        Command::Server(a) => server::run(a),
        Command::Register(a) => net::register(a),
        Command::Deregister(a) => net::deregister(a),
        Command::Send(a) => net::send(a),
        Command::Fetch(a) => net::fetch(a),
        Command::Sendmail(_) => Ok(()),
        Command::Local(a) => local::local(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("latssiam-bridge: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
