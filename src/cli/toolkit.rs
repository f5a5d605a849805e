//! The offline toolkit commands: identities, seal/open, sign/verify.
//!
//! Files may be DER or LATSSIAM armour (the wire's `-----BEGIN ...-----`
//! blocks). `seal --armor` writes armour in wire form (CRLF lines): an optional
//! `SIGNATURE` block, then the `ENCRYPTED MESSAGE` block, exactly what `SEND`
//! transmits.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use latssiam::identity::{certificate_from_pem_or_der, CertInfo, LatssiamUrl};
use latssiam::wire::{decode_all, encode_frame, Block, Frame, Label};
use latssiam::{crypto, Address, Fingerprint, Identity};

#[derive(Subcommand)]
pub enum IdentityCommand {
    /// Generate a P-256 (or RSA) identity for an address; prints its fingerprint.
    New {
        /// The LATSSIAM address, mailbox@host.
        #[arg(long)]
        address: String,
        /// Display name (the certificate's CN); defaults to the mailbox.
        #[arg(long)]
        name: Option<String>,
        /// Make a 2048-bit RSA key instead of P-256.
        #[arg(long)]
        rsa: bool,
        /// Directory to write cert.pem and key.pem (mode 0600) into.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print an identity's address, fingerprint and LATSSIAM URL.
    Show {
        /// Directory holding cert.pem (and key.pem), or a certificate file.
        dir: PathBuf,
        /// Also draw the LATSSIAM URL as a QR code.
        #[arg(long)]
        qr: bool,
        /// With --qr: write the QR code into this PNG file instead.
        #[arg(long, requires = "qr", value_name = "FILE")]
        png: Option<PathBuf>,
    },
}

#[derive(Args)]
pub struct SealArgs {
    /// The recipient's certificate (PEM or DER).
    #[arg(long)]
    to: PathBuf,
    /// Also sign the encrypted message with this identity directory.
    #[arg(long, value_name = "DIR")]
    sign: Option<PathBuf>,
    /// Write LATSSIAM armour (CRLF wire blocks) instead of DER.
    #[arg(long)]
    armor: bool,
    /// The plaintext (default: standard input).
    input: Option<PathBuf>,
    /// Where to write (default: standard output). With --sign and DER output,
    /// the signature goes to OUT.sig.
    #[arg(short = 'o', long = "out")]
    out: Option<PathBuf>,
}

#[derive(Args)]
pub struct OpenArgs {
    /// The recipient's identity directory.
    #[arg(long)]
    identity: PathBuf,
    /// The message, DER or armour (default: standard input).
    input: Option<PathBuf>,
    /// Where to write the plaintext (default: standard output).
    #[arg(short = 'o', long = "out")]
    out: Option<PathBuf>,
}

#[derive(Args)]
pub struct SignArgs {
    /// The signer's identity directory.
    #[arg(long)]
    identity: PathBuf,
    /// The content to sign (default: standard input).
    input: Option<PathBuf>,
    /// Where to write the DER signature (default: standard output).
    #[arg(short = 'o', long = "out")]
    out: Option<PathBuf>,
}

pub(crate) fn read_input(path: Option<&Path>) -> Result<Vec<u8>> {
    match path {
        Some(p) => std::fs::read(p).with_context(|| format!("cannot read {}", p.display())),
        None => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf).context("cannot read standard input")?;
            Ok(buf)
        }
    }
}

fn write_output(path: Option<&Path>, bytes: &[u8]) -> Result<()> {
    match path {
        Some(p) => std::fs::write(p, bytes).with_context(|| format!("cannot write {}", p.display())),
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(bytes).and_then(|()| out.flush()).context("cannot write standard output")
        }
    }
}

pub(crate) fn load_identity(dir: &Path) -> Result<Identity> {
    Identity::load(dir).with_context(|| format!("cannot load identity from {}", dir.display()))
}

/// The blocks of an armoured file, or `None` when it is not armour.
fn armour_blocks(bytes: &[u8]) -> Result<Option<Vec<Block>>> {
    let text = bytes.trim_ascii_start();
    if !text.starts_with(b"-----BEGIN ") {
        return Ok(None);
    }
    // Files may have lost their CRs on the way; the wire may not.
    let owned;
    let text = if text.windows(2).any(|w| w == b"\r\n") {
        text
    } else {
        owned = String::from_utf8_lossy(text).replace('\n', "\r\n").into_bytes();
        &owned
    };
    let (frames, err) = decode_all(text);
    if let Some(e) = err {
        bail!("bad armour: {e}");
    }
    frames
        .into_iter()
        .map(|f| match f {
            Frame::Block(b) => Ok(b),
            other => bail!("unexpected line in armour: {other:?}"),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn describe(info: &CertInfo) -> String {
    let who = info.address.as_ref().map_or_else(|| "(no address)".to_owned(), Address::to_string);
    match &info.display_name {
        Some(name) => format!("{name} <{who}> {}", info.fingerprint),
        None => format!("{who} {}", info.fingerprint),
    }
}

pub fn identity(cmd: IdentityCommand) -> Result<()> {
    match cmd {
        IdentityCommand::New { address, name, rsa, out } => {
            let address: Address = address.parse()?;
            let id = Identity::generate(&address, name.as_deref(), rsa)?;
            id.save(&out)?;
            println!("{}", id.fingerprint());
            Ok(())
        }
        IdentityCommand::Show { dir, qr, png } => {
            let cert_path = if dir.is_dir() { dir.join("cert.pem") } else { dir.clone() };
            let bytes = std::fs::read(&cert_path).with_context(|| format!("cannot read {}", cert_path.display()))?;
            let der = certificate_from_pem_or_der(&bytes)?;
            let info = CertInfo::from_der(&der)?;
            if dir.is_dir() && dir.join("key.pem").exists() {
                // Loading checks that the key belongs to the certificate.
                load_identity(&dir)?;
            }
            let address = info.address.as_ref().map_or_else(|| "(none)".to_owned(), Address::to_string);
            println!("address:     {address}");
            if let Some(name) = &info.display_name {
                println!("name:        {name}");
            }
            println!("fingerprint: {}", info.fingerprint);
            let url = LatssiamUrl::for_certificate(&info);
            if let Some(url) = &url {
                println!("url:         {url}");
            }
            if qr {
                let url = url.context("the certificate names no address, so it has no LATSSIAM URL")?;
                if let Some(png) = png {
                    crate::cli::qr::write_png(&url.to_string(), &png)?;
                    println!("qr code:     {}", png.display());
                    return Ok(());
                }
                let code = qrcode::QrCode::new(url.to_string().as_bytes()).context("cannot encode QR code")?;
                let image = code
                    .render::<qrcode::render::unicode::Dense1x2>()
                    .dark_color(qrcode::render::unicode::Dense1x2::Light)
                    .light_color(qrcode::render::unicode::Dense1x2::Dark)
                    .quiet_zone(true)
                    .build();
                println!("{image}");
            }
            Ok(())
        }
    }
}

pub fn seal(args: SealArgs) -> Result<()> {
    let cert_bytes = std::fs::read(&args.to).with_context(|| format!("cannot read {}", args.to.display()))?;
    let cert = certificate_from_pem_or_der(&cert_bytes)?;
    let signer = args.sign.as_deref().map(load_identity).transpose()?;
    let plaintext = read_input(args.input.as_deref())?;
    let message = crypto::seal(&plaintext, &cert)?;
    let signature = signer.as_ref().map(|id| crypto::sign(&message, id)).transpose()?;
    if args.armor {
        let mut out = Vec::new();
        if let Some(sig) = signature {
            out.extend_from_slice(&encode_frame(&Frame::Block(Block::new(Label::Signature, sig)))?);
        }
        let block = encode_frame(&Frame::Block(Block::new(Label::EncryptedMessage, message)))
            .context("the message is too large for one LATSSIAM block")?;
        out.extend_from_slice(&block);
        return write_output(args.out.as_deref(), &out);
    }
    if let Some(sig) = signature {
        let Some(out) = &args.out else {
            bail!("--sign with DER output needs -o OUT (the signature goes to OUT.sig); or use --armor");
        };
        let mut sig_path = out.clone().into_os_string();
        sig_path.push(".sig");
        write_output(Some(Path::new(&sig_path)), &sig)?;
    }
    write_output(args.out.as_deref(), &message)
}

pub fn open(args: OpenArgs) -> Result<()> {
    let id = load_identity(&args.identity)?;
    let input = read_input(args.input.as_deref())?;
    let (message, signature) = match armour_blocks(&input)? {
        None => (input, None),
        Some(blocks) => match blocks.as_slice() {
            [m] if m.label == Label::EncryptedMessage => (m.der.clone(), None),
            [s, m] if s.label == Label::Signature && m.label == Label::EncryptedMessage => {
                (m.der.clone(), Some(s.der.clone()))
            }
            _ => bail!("armour must hold an ENCRYPTED MESSAGE block, optionally after a SIGNATURE block"),
        },
    };
    let signer =
        signature.map(|sig| crypto::verify(&sig, &message).context("the signature does not verify")).transpose()?;
    let plaintext = crypto::open(&message, &id)?;
    if let Some(signer) = signer {
        eprintln!("signed by {}", describe(&CertInfo::from_der(&signer)?));
    }
    write_output(args.out.as_deref(), &plaintext)
}

pub fn sign(args: SignArgs) -> Result<()> {
    let id = load_identity(&args.identity)?;
    let content = read_input(args.input.as_deref())?;
    write_output(args.out.as_deref(), &crypto::sign(&content, &id)?)
}

pub fn verify(signature: &Path, input: Option<&Path>) -> Result<()> {
    let raw = std::fs::read(signature).with_context(|| format!("cannot read {}", signature.display()))?;
    let sig = match armour_blocks(&raw)? {
        None => raw,
        Some(blocks) => match blocks.into_iter().find(|b| b.label == Label::Signature) {
            Some(b) => b.der,
            None => bail!("no SIGNATURE block in {}", signature.display()),
        },
    };
    let content = read_input(input)?;
    let signer = crypto::verify(&sig, &content)?;
    let info = CertInfo::from_der(&signer)?;
    let address = info.address.as_ref().map_or_else(|| "(none)".to_owned(), Address::to_string);
    println!("address:     {address}");
    println!("fingerprint: {}", Fingerprint::of(&signer));
    Ok(())
}
