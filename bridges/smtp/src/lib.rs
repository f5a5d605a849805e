//! The SMTP side of latssiam-bridge: a listener that hands accepted mail to a
//! [`Sink`], and a [`smarthost::Smarthost`] that relays mail out. The crate
//! knows nothing of LATSSIAM: the gateway core implements [`Sink`].

pub mod listener;
pub mod smarthost;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;

pub use listener::{serve, ListenerConfig};

/// An SMTP reply: code, enhanced status code (RFC 3463) and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code.
    pub code: u16,
    /// The enhanced status code, e.g. `[5, 1, 1]`.
    pub status: [u8; 3],
    /// One line of text (no CR or LF).
    pub text: String,
}

impl Reply {
    /// A reply; CR and LF in `text` are replaced by spaces.
    pub fn new(code: u16, status: [u8; 3], text: impl Into<String>) -> Self {
        let text = text.into().replace(['\r', '\n'], " ");
        Self { code, status, text }
    }

    /// Whether it is a 2xx reply.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c] = self.status;
        write!(f, "{} {a}.{b}.{c} {}", self.code, self.text)
    }
}

/// What the listener knows about a transaction when it hands the message over.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The client's address.
    pub peer: SocketAddr,
    /// The name the client gave in EHLO/HELO.
    pub helo: String,
    /// Whether the session runs over TLS (after STARTTLS).
    pub tls: bool,
    /// The reverse path; empty for the null sender `<>`.
    pub from: String,
    /// The accepted recipients, in order.
    pub recipients: Vec<String>,
}

/// Where accepted mail goes: implemented by the gateway core.
///
/// The listener answers the client with what these return, so `message`
/// must return a positive reply only once the message is durably kept.
pub trait Sink: Send + Sync + 'static {
    /// Decides on one `RCPT TO` (the address as given, without brackets).
    fn recipient(&self, from: &str, to: &str) -> impl Future<Output = Result<(), Reply>> + Send;

    /// Takes a whole message (CRLF line ends, dot-stuffing removed).
    fn message(&self, envelope: Envelope, data: Vec<u8>) -> impl Future<Output = Reply> + Send;
}
