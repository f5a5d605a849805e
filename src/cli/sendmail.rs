//! `latssiam-bridge sendmail`: a sendmail-compatible submission command, so
//! that mutt, aerc, neomutt and `git send-email --sendmail-cmd` send through
//! LATSSIAM. The message comes on standard input; recipients are the
//! arguments, or with `-t` the `To`, `Cc` and `Bcc` fields. A recipient
//! named in the settings' `[recipients]` (a certificate file or a LATSSIAM
//! URL) gets the message directly, sealed and signed by the person; every
//! other address goes through the person's gateway in one message (the
//! gateway relays by the header fields, so an argument recipient missing
//! from them is added as `Bcc`, which the gateway removes). Large messages
//! go as PROFILE section 8 fragments. Exit codes are sendmail's (sysexits).

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use latssiam::client::Resolver;
use latssiam::identity::{certificate_from_pem_or_der, CertInfo};
use latssiam::wire::Code;
use latssiam::Identity;
use serde::Deserialize;

use crate::cli::net::{connect, connect_any, fetch_certificate, pin_file, runtime, send_message};
use crate::cli::toolkit::load_identity;

/// sysexits.h.
mod exit {
    pub const USAGE: u8 = 64;
    pub const DATAERR: u8 = 65;
    pub const NOUSER: u8 = 67;
    pub const UNAVAILABLE: u8 = 69;
    pub const IOERR: u8 = 74;
    pub const TEMPFAIL: u8 = 75;
    pub const CONFIG: u8 = 78;
}

/// Largest message read from standard input.
const MAX_INPUT: usize = latssiam::fragment::MAX_JOINED;

#[derive(Args)]
pub struct SendmailArgs {
    /// Recipients from the message's To, Cc and Bcc fields (the Bcc field is not sent).
    #[arg(short = 't')]
    from_headers: bool,
    /// A line with a single dot does not end the message.
    #[arg(short = 'i')]
    ignore_dots: bool,
    /// sendmail options: `-oi` is `-i`, others (`-oem`, `-odb`...) are accepted and ignored.
    #[arg(short = 'o', value_name = "OPTION")]
    options: Vec<String>,
    /// The envelope sender (accepted; the sender is your identity).
    #[arg(short = 'f', value_name = "FROM")]
    from: Option<String>,
    /// The full name (accepted and ignored).
    #[arg(short = 'F', value_name = "NAME")]
    full_name: Option<String>,
    /// The settings file (default: $LATSSIAM_SENDMAIL_CONFIG, else
    /// $XDG_CONFIG_HOME/latssiam-bridge/sendmail.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Recipients.
    recipients: Vec<String>,
}

/// The person's settings for `sendmail`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// Their identity directory.
    identity: PathBuf,
    /// The TOFU pin file (default: the client's).
    pins: Option<PathBuf>,
    /// Their gateway's certificate: email addresses go through it.
    gateway: Option<PathBuf>,
    /// Where to SEND to the gateway, HOST[:PORT] (its home server).
    gateway_server: Option<String>,
    /// LATSSIAM people reached directly: address -> certificate file or LATSSIAM URL.
    #[serde(default)]
    recipients: BTreeMap<String, String>,
    /// Servers by host: HOST -> HOST[:PORT] (else MX, then A/AAAA).
    #[serde(default)]
    routes: BTreeMap<String, String>,
}

/// A failure with its sysexits code.
struct Failed(u8, String);

impl<E: std::fmt::Display> From<E> for Failed {
    fn from(e: E) -> Self {
        Failed(exit::TEMPFAIL, format!("{e:#}"))
    }
}

fn fail<T>(code: u8, what: impl Into<String>) -> Result<T, Failed> {
    Err(Failed(code, what.into()))
}

pub fn sendmail(args: SendmailArgs) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failed(code, why)) => {
            eprintln!("latssiam-bridge sendmail: {why}");
            ExitCode::from(code)
        }
    }
}

fn settings_path(args: &SendmailArgs) -> Result<PathBuf, Failed> {
    default_settings_path(args.config.as_deref())
}

/// The settings file: `given`, `$LATSSIAM_SENDMAIL_CONFIG`, or
/// `~/.config/latssiam-bridge/sendmail.toml`.
fn default_settings_path(given: Option<&Path>) -> Result<PathBuf, Failed> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("LATSSIAM_SENDMAIL_CONFIG") {
        return Ok(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
    match base {
        Some(b) => Ok(b.join("latssiam-bridge").join("sendmail.toml")),
        None => fail(exit::CONFIG, "no HOME or XDG_CONFIG_HOME; pass --config FILE"),
    }
}

fn load_settings(path: &Path) -> Result<Settings, Failed> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failed(exit::CONFIG, format!("cannot read the settings {}: {e}", path.display())))?;
    let settings: Settings = config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Toml))
        .build()
        .and_then(config::Config::try_deserialize)
        .map_err(|e| Failed(exit::CONFIG, format!("{}: {e}", path.display())))?;
    // Relative paths are relative to the settings file.
    let base = path.parent().unwrap_or(Path::new("."));
    let mut settings = settings;
    settings.identity = base.join(&settings.identity);
    settings.pins = settings.pins.map(|p| base.join(p));
    settings.gateway = settings.gateway.map(|p| base.join(p));
    for source in settings.recipients.values_mut() {
        if !source.to_ascii_lowercase().starts_with("latssiam:") {
            *source = base.join(&*source).to_string_lossy().into_owned();
        }
    }
    Ok(settings)
}

/// Standard input as an Internet Message with CRLF line ends; without
/// `ignore_dots`, a line with a single dot ends it.
fn read_message(ignore_dots: bool) -> Result<Vec<u8>, Failed> {
    let mut raw = Vec::new();
    std::io::stdin()
        .take(MAX_INPUT as u64 + 1)
        .read_to_end(&mut raw)
        .map_err(|e| Failed(exit::IOERR, format!("cannot read the message: {e}")))?;
    if raw.len() > MAX_INPUT {
        return fail(exit::DATAERR, format!("the message is larger than {MAX_INPUT} octets"));
    }
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 40);
    for line in raw.split_inclusive(|&b| b == b'\n') {
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        if !ignore_dots && text == b"." {
            break;
        }
        out.extend_from_slice(text);
        out.extend_from_slice(b"\r\n");
    }
    if out.is_empty() {
        return fail(exit::DATAERR, "the message is empty");
    }
    if out.len() > MAX_INPUT {
        return fail(exit::DATAERR, format!("the message is larger than {MAX_INPUT} octets"));
    }
    Ok(out)
}

/// The addresses in To, Cc and Bcc, lower case, in order, once each.
fn header_recipients(message: &[u8]) -> Vec<String> {
    let Some(parsed) = mail_parser::MessageParser::default().parse_headers(message) else { return Vec::new() };
    let mut out: Vec<String> = Vec::new();
    for list in [parsed.to(), parsed.cc(), parsed.bcc()].into_iter().flatten() {
        for a in list.iter().filter_map(|a| a.address()) {
            let a = a.trim().to_lowercase();
            if !a.is_empty() && !out.contains(&a) {
                out.push(a);
            }
        }
    }
    out
}

/// The message without its Bcc fields (what a direct recipient gets).
fn without_bcc(message: &[u8]) -> Vec<u8> {
    let header_end = message.windows(4).position(|w| w == b"\r\n\r\n").map_or(message.len(), |i| i + 2);
    let mut out = Vec::with_capacity(message.len());
    let mut skipping = false;
    for line in message[..header_end].split_inclusive(|&b| b == b'\n') {
        if !line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
            skipping = line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"bcc:");
        }
        if !skipping {
            out.extend_from_slice(line);
        }
    }
    out.extend_from_slice(&message[header_end..]);
    out
}

fn run(args: SendmailArgs) -> Result<(), Failed> {
    let ignore_dots = args.ignore_dots || args.options.iter().any(|o| o == "i");
    let _ = (&args.from, &args.full_name);
    let settings = load_settings(&settings_path(&args)?)?;
    let message = read_message(ignore_dots)?;
    let mut recipients: Vec<String> = args.recipients.iter().map(|r| r.trim().to_lowercase()).collect();
    if args.from_headers {
        recipients.extend(header_recipients(&message));
    }
    recipients.retain(|r| !r.is_empty());
    recipients.dedup();
    let mut seen = std::collections::HashSet::new();
    recipients.retain(|r| seen.insert(r.clone()));
    if recipients.is_empty() {
        return fail(exit::USAGE, "no recipients (name them, or use -t)");
    }
    if let Some(bad) = recipients.iter().find(|r| r.rsplit_once('@').is_none_or(|(l, h)| l.is_empty() || h.is_empty()))
    {
        return fail(exit::NOUSER, format!("<{bad}>: not an address"));
    }
    let router = Router::new(settings)?;
    runtime()?.block_on(router.send(&message, recipients))
}

/// Where mail goes, as the sendmail settings say: `local`'s submission
/// listener routes with the same rules as the `sendmail` command.
pub struct Router {
    settings: Settings,
    identity: Arc<Identity>,
    pins: latssiam::tls::FilePins,
}

/// Why a submission failed: sendmail's exit code and a line.
pub struct Refused {
    pub exit: u8,
    pub why: String,
}

impl Router {
    /// The router of the settings file `path` (default: sendmail's own).
    ///
    /// # Errors
    /// The settings, the identity or the pins cannot be read.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let inner = || -> Result<Self, Failed> { Router::new(load_settings(&default_settings_path(path)?)?) };
        inner().map_err(|Failed(_, why)| anyhow::anyhow!(why))
    }

    fn new(settings: Settings) -> Result<Self, Failed> {
        let identity = Arc::new(load_identity(&settings.identity).map_err(|e| Failed(exit::CONFIG, format!("{e:#}")))?);
        let pins = pin_file(settings.pins.as_deref()).map_err(|e| Failed(exit::CONFIG, format!("{e:#}")))?;
        Ok(Router { settings, identity, pins })
    }

    /// Sends `message` (CRLF line ends) to `recipients` (lower-case, checked).
    ///
    /// # Errors
    /// Why it was not sent, with sendmail's exit code.
    pub async fn submit(&self, message: &[u8], recipients: Vec<String>) -> Result<(), Refused> {
        self.send(message, recipients).await.map_err(|Failed(exit, why)| Refused { exit, why })
    }

    async fn send(&self, message: &[u8], recipients: Vec<String>) -> Result<(), Failed> {
        let (settings, identity, pins) = (&self.settings, &self.identity, &self.pins);
        let message = message.to_vec();
        let (direct, email): (Vec<String>, Vec<String>) =
            recipients.into_iter().partition(|r| settings.recipients.contains_key(r));
        for r in &direct {
            let source = &settings.recipients[r];
            let cert = if source.to_ascii_lowercase().starts_with("latssiam:") {
                fetch_certificate(source, None, pins).await?
            } else {
                let bytes = std::fs::read(source)
                    .map_err(|e| Failed(exit::CONFIG, format!("<{r}>: cannot read {source}: {e}")))?;
                certificate_from_pem_or_der(&bytes).map_err(|e| Failed(exit::CONFIG, format!("<{r}>: {e}")))?.to_vec()
            };
            let host = CertInfo::from_der(&cert)?
                .address
                .map(|a| a.host().to_owned())
                .ok_or_else(|| Failed(exit::CONFIG, format!("<{r}>: the certificate names no address")))?;
            let mut client = match settings.routes.get(&host) {
                Some(server) => connect(server, identity, pins).await?,
                None => connect_any(Resolver::default().resolve(&host).await?, identity, pins).await?,
            };
            deliver(&mut client, identity, &cert, &without_bcc(&message), r).await?;
            client.quit().await;
        }
        if email.is_empty() {
            return Ok(());
        }
        let (Some(gateway), Some(server)) = (&settings.gateway, &settings.gateway_server) else {
            return fail(exit::CONFIG, format!("<{}>: no gateway configured (gateway, gateway_server)", email[0]));
        };
        let bytes = std::fs::read(gateway)
            .map_err(|e| Failed(exit::CONFIG, format!("cannot read {}: {e}", gateway.display())))?;
        let cert = certificate_from_pem_or_der(&bytes)
            .map_err(|e| Failed(exit::CONFIG, format!("{}: {e}", gateway.display())))?
            .to_vec();
        // The gateway relays by the header fields: add the argument recipients
        // they lack as Bcc; header recipients that are not to get it cannot
        // be left out, so that is refused.
        let named = header_recipients(&message);
        if let Some(extra) = named.iter().find(|n| !email.contains(n) && !direct.contains(n)) {
            return fail(
                exit::USAGE,
                format!("<{extra}> is in the header but not a recipient; the gateway relays by the header (use -t)"),
            );
        }
        let missing: Vec<&String> = email.iter().filter(|r| !named.contains(r)).collect();
        let mut to_gateway = Vec::with_capacity(message.len() + 64);
        if !missing.is_empty() {
            let list = missing.iter().map(|r| format!("<{r}>")).collect::<Vec<_>>().join(", ");
            to_gateway.extend_from_slice(format!("Bcc: {list}\r\n").as_bytes());
        }
        to_gateway.extend_from_slice(&message);
        let mut client = connect(server, identity, pins).await?;
        deliver(&mut client, identity, &cert, &to_gateway, &email.join(", ")).await?;
        client.quit().await;
        Ok(())
    }
}

async fn deliver(
    client: &mut latssiam::client::Client,
    identity: &Identity,
    cert: &[u8],
    message: &[u8],
    to: &str,
) -> Result<(), Failed> {
    let (status, _) = send_message(client, identity, cert, message, true).await?;
    let code = match status.code() {
        Code::MessageAccepted => return Ok(()),
        Code::NoMailbox | Code::MailboxGone => exit::NOUSER,
        Code::MessageTooLong => exit::DATAERR,
        Code::MailboxFull | Code::SlowDown | Code::InternalError | Code::Timeout => exit::TEMPFAIL,
        _ => exit::UNAVAILABLE,
    };
    fail(code, format!("<{to}>: the server answered {status}"))
}
