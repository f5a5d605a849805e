//! `latssiam-bridge dkim new`: a DKIM signing key for `[[dkim]]` and the DNS
//! record to publish for it.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use aws_lc_rs::encoding::AsDer as _;
use aws_lc_rs::signature::KeyPair as _;
use base64::Engine as _;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum DkimCommand {
    /// Make a key (RSA 2048, or Ed25519), write it as a PKCS#8 PEM and print
    /// the TXT record to publish at SELECTOR._domainkey.DOMAIN.
    New {
        /// The signing domain (d=).
        #[arg(long)]
        domain: String,
        /// The selector (s=).
        #[arg(long)]
        selector: String,
        /// Where to write the private key (refused if it exists).
        #[arg(long)]
        out: PathBuf,
        /// An Ed25519 key (RFC 8463) instead of RSA 2048.
        #[arg(long)]
        ed25519: bool,
    },
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        s.push_str(&String::from_utf8_lossy(line));
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

/// (PKCS#8 PEM, TXT record value).
fn generate(ed25519: bool) -> Result<(String, String)> {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    if ed25519 {
        let doc = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new())
            .map_err(|_| anyhow::anyhow!("cannot make an Ed25519 key"))?;
        let pair = aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref())
            .map_err(|e| anyhow::anyhow!("cannot read the new key: {e}"))?;
        // RFC 8463: p= is the raw 32-octet public key.
        let txt = format!("v=DKIM1; k=ed25519; p={}", b64(pair.public_key().as_ref()));
        return Ok((pem("PRIVATE KEY", doc.as_ref()), txt));
    }
    let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
        .map_err(|_| anyhow::anyhow!("cannot make an RSA key"))?;
    let pkcs8 = pair.as_der().map_err(|_| anyhow::anyhow!("cannot encode the RSA key"))?;
    let spki = pair.public_key().as_der().map_err(|_| anyhow::anyhow!("cannot encode the public key"))?;
    let txt = format!("v=DKIM1; k=rsa; p={}", b64(spki.as_ref()));
    Ok((pem("PRIVATE KEY", pkcs8.as_ref()), txt))
}

pub fn dkim(command: DkimCommand) -> Result<()> {
    let DkimCommand::New { domain, selector, out, ed25519 } = command;
    if !latssiam::identity::is_dns_name(&domain) {
        bail!("--domain {domain:?} is not a domain name");
    }
    if selector.is_empty() || !selector.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        bail!("--selector {selector:?}: letters, digits and '-' only");
    }
    if out.exists() {
        bail!("{} exists; not overwritten", out.display());
    }
    let (key, txt) = generate(ed25519)?;
    latssiam::files::write_atomic(&out, key.as_bytes(), 0o600)
        .with_context(|| format!("cannot write {}", out.display()))?;
    // TXT character-strings are at most 255 octets: an RSA key takes two.
    let strings: Vec<String> =
        txt.as_bytes().chunks(250).map(|c| format!("\"{}\"", String::from_utf8_lossy(c))).collect();
    println!("{selector}._domainkey.{domain}. 3600 IN TXT ( {} )", strings.join(" "));
    Ok(())
}
