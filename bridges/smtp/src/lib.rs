//! The SMTP side of latssiam-bridge: a listener that hands accepted mail to a
//! [`Sink`], and a [`smarthost::Smarthost`] that relays mail out. The crate
//! knows nothing of LATSSIAM: the gateway core implements [`Sink`].

pub mod listener;
pub mod smarthost;

use std::borrow::Cow;
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

/// Who may submit mail (RFC 4954): a listener with one offers `AUTH PLAIN
/// LOGIN` and takes `MAIL` only after a successful `AUTH`.
pub trait Authenticator: Send + Sync + 'static {
    /// Whether `user` may submit with `password`. A wrong answer should come
    /// late (the implementation slows failures down).
    fn check(&self, user: Vec<u8>, password: Vec<u8>) -> std::pin::Pin<Box<dyn Future<Output = bool> + Send + '_>>;
}

/// `data` with CRLF line ends only: a bare LF or a bare CR becomes CRLF.
///
/// Whatever a message's author wrote, what goes out on the wire can then
/// neither end `DATA` early at a receiver that accepts `<LF>.<CR><LF>` (SMTP
/// smuggling) nor escape dot-stuffing, which works line by line on CRLF.
pub fn crlf_only(data: &[u8]) -> Cow<'_, [u8]> {
    let clean = data.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => data.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && data[i - 1] == b'\r',
        _ => true,
    });
    if clean {
        return Cow::Borrowed(data);
    }
    let mut out = Vec::with_capacity(data.len() + data.len() / 16);
    let mut i = 0;
    while i < data.len() {
        match data[i] {
            b'\r' if data.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 1;
            }
            b'\r' | b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::crlf_only;

    #[test]
    fn crlf_only_leaves_no_bare_lf_or_cr() {
        assert_eq!(&*crlf_only(b"a\r\nb\r\n"), b"a\r\nb\r\n");
        assert!(matches!(crlf_only(b"a\r\nb"), std::borrow::Cow::Borrowed(_)));
        assert_eq!(&*crlf_only(b"hi\n.\r\nMAIL FROM:<e@x>\r"), b"hi\r\n.\r\nMAIL FROM:<e@x>\r\n");
        assert_eq!(&*crlf_only(b"\n\r\r\n\r"), b"\r\n\r\n\r\n\r\n");
        for input in [&b"x\ny\rz\r\r\n\n"[..], b"\r", b"\n\n", b""] {
            let out = crlf_only(input);
            for (i, &b) in out.iter().enumerate() {
                if b == b'\r' {
                    assert_eq!(out.get(i + 1), Some(&b'\n'), "{input:?}");
                }
                if b == b'\n' {
                    assert!(i > 0 && out[i - 1] == b'\r', "{input:?}");
                }
            }
        }
    }
}
