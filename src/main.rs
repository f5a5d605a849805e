//! `latssiam-bridge`: the command line. Errors are one line on stderr and a
//! non-zero exit status.

mod toolkit;

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
    /// Create and inspect identities (certificate + private key).
    #[command(subcommand)]
    Identity(toolkit::IdentityCommand),
    /// Encrypt a message to a recipient's certificate (CMS AuthEnvelopedData).
    Seal(toolkit::SealArgs),
    /// Decrypt a message with an identity; verifies an armoured signature if present.
    Open(toolkit::OpenArgs),
    /// Make a detached CMS signature over a file.
    Sign(toolkit::SignArgs),
    /// Verify a detached signature and print who made it.
    Verify(toolkit::VerifyArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Identity(c) => toolkit::identity(c),
        Command::Seal(a) => toolkit::seal(a),
        Command::Open(a) => toolkit::open(a),
        Command::Sign(a) => toolkit::sign(a),
        Command::Verify(a) => toolkit::verify(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("latssiam-bridge: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
