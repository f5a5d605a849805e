//! The LATSSIAM wire format of PROFILE.md sections 2-4, with no I/O.
//!
//! [`FrameCodec`] turns bytes into [`Frame`]s (a command, a status line or a
//! whole armoured block) and back. It owns the line rules (CRLF, at most 73
//! octets with the CRLF, printable US-ASCII only) and the block rules (label
//! pairs, base64 lines of at most 64 characters, at most 400 of them, DER
//! inside). Whatever a peer sends, the decoder holds at most one line plus one
//! block's base64 (25,600 octets) and answers with a [`WireError`] that says
//! which status code to send before hanging up.
//!
//! Reading decisions made where the profile leaves room (also in
//! `docs/PROFILE-NOTES.md`):
//! - The password of `MAILBOX REGISTER` is the rest of the line after one
//!   space. It may contain spaces but may not start with one, so "exactly one
//!   space before an argument" stays unambiguous. Byte 127 (DEL), allowed by
//!   the sketch, cannot appear because every line is printable 0x20-0x7E.
//! - A status line may carry any of the 24 codes of the table and no other.
//! - A block's content must be one DER SEQUENCE spanning all of it; deeper
//!   parsing (certificate, CMS) is the caller's.

use std::fmt;
use std::io;
use std::time::Duration;

use base64::Engine as _;
use bytes::{Buf as _, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::fingerprint::Fingerprint;

/// Longest line, CRLF included.
pub const MAX_LINE: usize = 73;
/// Longest line content, CRLF excluded.
pub const MAX_CONTENT: usize = MAX_LINE - 2;
/// Longest base64 line inside a block.
pub const MAX_BASE64_LINE: usize = 64;
/// Most base64 lines in one block.
pub const MAX_BLOCK_LINES: usize = 400;
/// Most DER octets one block can carry (400 full lines of 64 characters).
pub const MAX_BLOCK_DER: usize = MAX_BLOCK_LINES * MAX_BASE64_LINE / 4 * 3;
/// Longest `MAILBOX REGISTER` password.
pub const MAX_PASSWORD: usize = MAX_CONTENT - "MAILBOX REGISTER ".len();

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Every status code of the table (PROFILE.md section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
#[allow(missing_docs)]
pub enum Code {
    RegistrationComplete = 10,
    RegistrationRefused = 11,
    RegistrationPending = 12,
    AttestationRequested = 13,
    AttestationFollows = 14,
    RegistrationUnavailable = 15,
    CertificateRequired = 20,
    CertificateUnauthorised = 21,
    Proceed = 30,
    MessageAccepted = 31,
    SignatureRequired = 32,
    NoMoreMessages = 33,
    NoMailbox = 34,
    MailboxMoved = 35,
    MailboxFull = 36,
    SlowDown = 37,
    MailboxGone = 38,
    MessageTooLong = 39,
    MessageFollows = 40,
    SyntaxError = 50,
    SequencingError = 51,
    MessageRefused = 52,
    InternalError = 53,
    Timeout = 54,
}

impl Code {
    /// Whether a server may answer `SEND` with this instead of `30` or
    /// `32`: a refusal (`20`, `21`, `34`-`39`, `50`-`54`). Never `31`, which
    /// comes only after the message.
    pub fn refuses_send(self) -> bool {
        matches!(
            self,
            Code::CertificateRequired
                | Code::CertificateUnauthorised
                | Code::NoMailbox
                | Code::MailboxMoved
                | Code::MailboxFull
                | Code::SlowDown
                | Code::MailboxGone
                | Code::MessageTooLong
                | Code::SyntaxError
                | Code::SequencingError
                | Code::MessageRefused
                | Code::InternalError
                | Code::Timeout
        )
    }

    /// All codes, in numeric order.
    pub const ALL: [Code; 24] = [
        Code::RegistrationComplete,
        Code::RegistrationRefused,
        Code::RegistrationPending,
        Code::AttestationRequested,
        Code::AttestationFollows,
        Code::RegistrationUnavailable,
        Code::CertificateRequired,
        Code::CertificateUnauthorised,
        Code::Proceed,
        Code::MessageAccepted,
        Code::SignatureRequired,
        Code::NoMoreMessages,
        Code::NoMailbox,
        Code::MailboxMoved,
        Code::MailboxFull,
        Code::SlowDown,
        Code::MailboxGone,
        Code::MessageTooLong,
        Code::MessageFollows,
        Code::SyntaxError,
        Code::SequencingError,
        Code::MessageRefused,
        Code::InternalError,
        Code::Timeout,
    ];

    /// The two-digit number.
    pub const fn as_u8(self) -> u8 {
        self as u8
    }

    /// The code with this number, if the table has one.
    pub fn from_u8(n: u8) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| c.as_u8() == n)
    }

    /// The table's text for this code.
    pub const fn text(self) -> &'static str {
        match self {
            Code::RegistrationComplete => "Registration complete",
            Code::RegistrationRefused => "Registration refused",
            Code::RegistrationPending => "Registration pending",
            Code::AttestationRequested => "Attestation requested",
            Code::AttestationFollows => "Attestation follows",
            Code::RegistrationUnavailable => "Registration not available for that domain",
            Code::CertificateRequired => "Certificate required",
            Code::CertificateUnauthorised => "Certificate unauthorised",
            Code::Proceed => "Recipient recognised; proceed",
            Code::MessageAccepted => "Message accepted",
            Code::SignatureRequired => "Signature required",
            Code::NoMoreMessages => "No more messages available",
            Code::NoMailbox => "Mailbox does not exist",
            Code::MailboxMoved => "Mailbox moved",
            Code::MailboxFull => "Mailbox full",
            Code::SlowDown => "Slow down",
            Code::MailboxGone => "Mailbox gone",
            Code::MessageTooLong => "Message too long",
            Code::MessageFollows => "Message follows",
            Code::SyntaxError => "Syntax error",
            Code::SequencingError => "Sequencing error",
            Code::MessageRefused => "Message refused",
            Code::InternalError => "Internal server error",
            Code::Timeout => "Timeout",
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}", self.as_u8())
    }
}

/// A status line: a code and its human text (printable ASCII, fits one line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    code: Code,
    text: String,
}

impl Status {
    /// Longest text a status line can carry.
    pub const MAX_TEXT: usize = MAX_CONTENT - 3;

    /// A status with the table's text.
    pub fn of(code: Code) -> Self {
        Self { code, text: code.text().to_owned() }
    }

    /// A status with custom text.
    ///
    /// # Errors
    /// [`WireError::BadText`] if the text is longer than [`Status::MAX_TEXT`]
    /// or not printable US-ASCII.
    pub fn new(code: Code, text: impl Into<String>) -> Result<Self, WireError> {
        let text = text.into();
        if text.len() > Self::MAX_TEXT || !text.bytes().all(is_printable) {
            return Err(WireError::BadText);
        }
        Ok(Self { code, text })
    }

    /// A status with custom text, or with the code's own text if `text`
    /// cannot be sent (too long, or not printable US-ASCII).
    pub fn with_text(code: Code, text: impl Into<String>) -> Self {
        Self::new(code, text).unwrap_or_else(|_| Self::of(code))
    }

    /// `35 Mailbox moved <host>`.
    ///
    /// # Errors
    /// [`WireError::BadText`] if the host does not fit on the line.
    pub fn moved(host: &str) -> Result<Self, WireError> {
        if host.is_empty() || host.contains(' ') {
            return Err(WireError::BadText);
        }
        Self::new(Code::MailboxMoved, format!("Mailbox moved {host}"))
    }

    /// The code.
    pub fn code(&self) -> Code {
        self.code
    }

    /// The human text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// For a `35`, the new host: the last word of the text.
    pub fn moved_to(&self) -> Option<&str> {
        (self.code == Code::MailboxMoved).then(|| self.text.rsplit(' ').next()).flatten().filter(|h| !h.is_empty())
    }

    fn parse(line: &[u8]) -> Result<Self, WireError> {
        if line.len() < 3 || !line[0].is_ascii_digit() || !line[1].is_ascii_digit() || line[2] != b' ' {
            return Err(WireError::BadStatus);
        }
        let n = (line[0] - b'0') * 10 + (line[1] - b'0');
        let code = Code::from_u8(n).ok_or(WireError::UnknownCode(n))?;
        // The line was checked printable ASCII, so this is valid UTF-8.
        let text = String::from_utf8_lossy(&line[3..]).into_owned();
        Ok(Self { code, text })
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

/// The pre-shared registration password: 1 to 54 printable ASCII characters,
/// not starting with a space. Its `Debug` form hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// Checks and wraps a password.
    ///
    /// # Errors
    /// [`WireError::BadArgument`] if it is empty, too long, starts with a space
    /// or holds anything but printable US-ASCII.
    pub fn new(s: impl Into<String>) -> Result<Self, WireError> {
        let s = s.into();
        Self::check(s.as_bytes())?;
        Ok(Self(s))
    }

    fn check(s: &[u8]) -> Result<(), WireError> {
        if s.is_empty() || s.len() > MAX_PASSWORD || s[0] == b' ' || !s.iter().copied().all(is_printable) {
            return Err(WireError::BadArgument("password"));
        }
        Ok(())
    }

    /// The password text.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(..)")
    }
}

/// The five verbs, with typed arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `SEND <recipient-fingerprint>`
    Send(Fingerprint),
    /// `ACCEPT <deadline-seconds>`; sub-second parts are not sent.
    Accept(Duration),
    /// `MAILBOX REGISTER <password>`
    Register(Password),
    /// `MAILBOX DEREGISTER`
    Deregister,
    /// `VERIFY <recipient-fingerprint>`
    Verify(Fingerprint),
    /// `QUIT`
    Quit,
}

impl Command {
    fn parse(line: &[u8]) -> Result<Self, WireError> {
        let (verb, arg) = match line.iter().position(|&b| b == b' ') {
            Some(i) => (&line[..i], Some(&line[i + 1..])),
            None => (line, None),
        };
        match (verb, arg) {
            (b"SEND", Some(a)) => Ok(Command::Send(fingerprint_arg(a)?)),
            (b"VERIFY", Some(a)) => Ok(Command::Verify(fingerprint_arg(a)?)),
            (b"ACCEPT", Some(a)) => Ok(Command::Accept(Duration::from_secs(seconds_arg(a)?))),
            (b"MAILBOX", Some(b"DEREGISTER")) => Ok(Command::Deregister),
            (b"MAILBOX", Some(a)) => match a.strip_prefix(b"REGISTER ") {
                Some(pw) => {
                    Password::check(pw)?;
                    Ok(Command::Register(Password(String::from_utf8_lossy(pw).into_owned())))
                }
                None => Err(WireError::BadArgument("MAILBOX takes REGISTER <password> or DEREGISTER")),
            },
            (b"QUIT", None) => Ok(Command::Quit),
            (b"SEND" | b"VERIFY" | b"ACCEPT" | b"MAILBOX", None) => Err(WireError::BadArgument("missing argument")),
            (b"QUIT", Some(_)) => Err(WireError::BadArgument("QUIT takes no argument")),
            _ => Err(WireError::UnknownVerb),
        }
    }

    fn encode(&self, dst: &mut BytesMut) -> Result<(), WireError> {
        use std::fmt::Write as _;
        let start = dst.len();
        let mut w = WriteBytes(dst);
        // Writing into a BytesMut cannot fail.
        let _ = match self {
            Command::Send(fp) => write!(w, "SEND {fp}"),
            Command::Accept(d) => write!(w, "ACCEPT {}", d.as_secs()),
            Command::Register(pw) => write!(w, "MAILBOX REGISTER {}", pw.0),
            Command::Deregister => w.write_str("MAILBOX DEREGISTER"),
            Command::Verify(fp) => write!(w, "VERIFY {fp}"),
            Command::Quit => w.write_str("QUIT"),
        };
        if dst.len() - start > MAX_CONTENT {
            dst.truncate(start);
            return Err(WireError::BadText);
        }
        dst.put_slice(b"\r\n");
        Ok(())
    }
}

fn fingerprint_arg(a: &[u8]) -> Result<Fingerprint, WireError> {
    Fingerprint::parse_bytes(a).map_err(|_| WireError::BadArgument("fingerprint"))
}

fn seconds_arg(a: &[u8]) -> Result<u64, WireError> {
    if a.is_empty() || !a.iter().all(u8::is_ascii_digit) {
        return Err(WireError::BadArgument("deadline"));
    }
    a.iter()
        .try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
        .ok_or(WireError::BadArgument("deadline"))
}

struct WriteBytes<'a>(&'a mut BytesMut);

impl fmt::Write for WriteBytes<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.put_slice(s.as_bytes());
        Ok(())
    }
}

/// The label of an armoured block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Label {
    /// `ENCRYPTED MESSAGE`: a CMS ContentInfo.
    EncryptedMessage,
    /// `SIGNATURE`: a detached CMS SignedData.
    Signature,
    /// `CERTIFICATE`: an X.509 certificate.
    Certificate,
    /// `CERTIFICATE REQUEST`: a PKCS#10 request.
    CertificateRequest,
}

impl Label {
    const ALL: [Label; 4] = [Label::EncryptedMessage, Label::Signature, Label::Certificate, Label::CertificateRequest];

    /// The label text.
    pub const fn as_str(self) -> &'static str {
        match self {
            Label::EncryptedMessage => "ENCRYPTED MESSAGE",
            Label::Signature => "SIGNATURE",
            Label::Certificate => "CERTIFICATE",
            Label::CertificateRequest => "CERTIFICATE REQUEST",
        }
    }

    fn from_bytes(s: &[u8]) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.as_str().as_bytes() == s)
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An armoured block, decoded to its DER octets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// What the block holds.
    pub label: Label,
    /// The DER octets (one SEQUENCE).
    pub der: Vec<u8>,
}

impl Block {
    /// A block of `der` under `label`.
    pub fn new(label: Label, der: impl Into<Vec<u8>>) -> Self {
        Self { label, der: der.into() }
    }

    fn encode(&self, dst: &mut BytesMut) -> Result<(), WireError> {
        if self.der.len() > MAX_BLOCK_DER {
            return Err(WireError::BlockTooLong(self.label));
        }
        check_der_sequence(&self.der)?;
        let b64 = B64.encode(&self.der);
        let label = self.label.as_str().as_bytes();
        dst.reserve(b64.len() + b64.len() / MAX_BASE64_LINE * 2 + 2 * label.len() + 40);
        dst.put_slice(b"-----BEGIN ");
        dst.put_slice(label);
        dst.put_slice(b"-----\r\n");
        for chunk in b64.as_bytes().chunks(MAX_BASE64_LINE) {
            dst.put_slice(chunk);
            dst.put_slice(b"\r\n");
        }
        dst.put_slice(b"-----END ");
        dst.put_slice(label);
        dst.put_slice(b"-----\r\n");
        Ok(())
    }
}

/// One unit of the conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A verb line.
    Command(Command),
    /// A status line.
    Status(Status),
    /// A whole armoured block.
    Block(Block),
}

impl From<Command> for Frame {
    fn from(c: Command) -> Self {
        Frame::Command(c)
    }
}
impl From<Status> for Frame {
    fn from(s: Status) -> Self {
        Frame::Status(s)
    }
}
impl From<Code> for Frame {
    fn from(c: Code) -> Self {
        Frame::Status(Status::of(c))
    }
}
impl From<Block> for Frame {
    fn from(b: Block) -> Self {
        Frame::Block(b)
    }
}

/// A violation of the wire rules, or an I/O failure underneath.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// A line longer than 73 octets, CRLF included.
    #[error("line longer than 73 octets")]
    LineTooLong,
    /// An LF not preceded by CR.
    #[error("bare LF in line")]
    BareLf,
    /// A CR not followed by LF.
    #[error("bare CR in line")]
    BareCr,
    /// A NUL octet.
    #[error("NUL in line")]
    Nul,
    /// Any other octet outside 0x20-0x7E.
    #[error("non-printable octet 0x{0:02x} in line")]
    NonPrintable(u8),
    /// Not one of the five verbs (they are upper case).
    #[error("unknown verb")]
    UnknownVerb,
    /// A verb with a missing or malformed argument.
    #[error("bad argument: {0}")]
    BadArgument(&'static str),
    /// A line starting with a digit that is not `NN text`.
    #[error("malformed status line")]
    BadStatus,
    /// Two digits that are not in the table.
    #[error("unknown status code {0:02}")]
    UnknownCode(u8),
    /// `-----BEGIN` with a label the profile does not define, or a stray `-----` line.
    #[error("unknown block label")]
    UnknownLabel,
    /// `-----END` naming another label than its BEGIN.
    #[error("END label does not match BEGIN {0}")]
    LabelMismatch(Label),
    /// A base64 line over 64 characters.
    #[error("base64 line longer than 64 characters")]
    Base64LineTooLong,
    /// Characters or padding that are not standard base64.
    #[error("invalid base64")]
    BadBase64,
    /// More than 400 base64 lines.
    #[error("{0} block longer than 400 lines")]
    BlockTooLong(Label),
    /// Block content that is not one DER SEQUENCE.
    #[error("block content is not a DER SEQUENCE")]
    BadDer,
    /// The peer closed the stream inside a line.
    #[error("connection closed in the middle of a line")]
    EofInLine,
    /// The peer closed the stream inside a block.
    #[error("connection closed inside a {0} block")]
    EofInBlock(Label),
    /// Text that cannot be put on the wire (encoder side).
    #[error("text does not fit a LATSSIAM line")]
    BadText,
    /// The transport failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl WireError {
    /// The status code to send before hanging up, if the stream is still
    /// writable: `39` for an over-long message block, `50` for every other
    /// violation, none for I/O failures and end of stream.
    pub fn code(&self) -> Option<Code> {
        match self {
            WireError::Io(_) | WireError::EofInLine | WireError::EofInBlock(_) => None,
            WireError::BlockTooLong(Label::EncryptedMessage) => Some(Code::MessageTooLong),
            _ => Some(Code::SyntaxError),
        }
    }

    /// Whether the session must end. PROFILE.md section 1 hangs up on every
    /// violation, so this is true for every decoding error; it exists so that
    /// callers state the rule once, here.
    pub fn hang_up(&self) -> bool {
        !matches!(self, WireError::BadText)
    }
}

const fn is_printable(b: u8) -> bool {
    matches!(b, 0x20..=0x7e)
}

struct PartialBlock {
    label: Label,
    base64: Vec<u8>,
    lines: usize,
}

/// Decoder and encoder of [`Frame`]s.
#[derive(Default)]
pub struct FrameCodec {
    block: Option<PartialBlock>,
}

impl FrameCodec {
    /// A codec in its initial state.
    pub fn new() -> Self {
        Self::default()
    }

    /// The length of the first whole line in `buf`, without its CRLF, after
    /// checking it; `None` while no line is whole and nothing seen so far is
    /// wrong.
    fn line_end(buf: &[u8]) -> Result<Option<usize>, WireError> {
        let window = &buf[..buf.len().min(MAX_LINE)];
        let Some(lf) = memchr::memchr(b'\n', window) else {
            if buf.len() >= MAX_LINE {
                // What a 72-octet partial line would have been checked for
                // (all but a last CR), so that the error does not depend on
                // where the input was cut.
                let settled = MAX_LINE - 1 - usize::from(window[MAX_LINE - 2] == b'\r');
                return Err(first_fault(&window[..settled]).unwrap_or(WireError::LineTooLong));
            }
            // Fail early on what no later octet can repair.
            let settled = window.len() - usize::from(window.last() == Some(&b'\r'));
            return match first_fault(&window[..settled]) {
                Some(e) => Err(e),
                None => Ok(None),
            };
        };
        if lf == 0 || window[lf - 1] != b'\r' {
            return Err(first_fault(&window[..lf]).unwrap_or(WireError::BareLf));
        }
        if let Some(e) = first_fault(&window[..lf - 1]) {
            return Err(e);
        }
        Ok(Some(lf - 1))
    }

    fn block_line(&mut self, line: &[u8]) -> Result<Option<Frame>, WireError> {
        let Some(block) = self.block.as_mut() else {
            return Ok(None);
        };
        if let Some(rest) = line.strip_prefix(b"-----END ") {
            let label = block.label;
            if rest.strip_suffix(b"-----") != Some(label.as_str().as_bytes()) {
                return Err(WireError::LabelMismatch(label));
            }
            let base64 = std::mem::take(&mut block.base64);
            self.block = None;
            let der = B64.decode(&base64).map_err(|_| WireError::BadBase64)?;
            check_der_sequence(&der)?;
            return Ok(Some(Frame::Block(Block { label, der })));
        }
        if line.len() > MAX_BASE64_LINE {
            return Err(WireError::Base64LineTooLong);
        }
        // Every octet looked at, without an early exit, so that the check is
        // a few vector instructions rather than a branch per octet.
        let base64 =
            line.iter().fold(true, |ok, &b| ok & (b.is_ascii_alphanumeric() | matches!(b, b'+' | b'/' | b'=')));
        if line.is_empty() || !base64 {
            return Err(WireError::BadBase64);
        }
        block.lines += 1;
        if block.lines > MAX_BLOCK_LINES {
            return Err(WireError::BlockTooLong(block.label));
        }
        block.base64.extend_from_slice(line);
        Ok(None)
    }

    fn single_line(&mut self, line: &[u8]) -> Result<Option<Frame>, WireError> {
        match line.first() {
            Some(b'0'..=b'9') => Ok(Some(Frame::Status(Status::parse(line)?))),
            Some(b'-') => {
                let label = line
                    .strip_prefix(b"-----BEGIN ")
                    .and_then(|r| r.strip_suffix(b"-----"))
                    .and_then(Label::from_bytes)
                    .ok_or(WireError::UnknownLabel)?;
                self.block = Some(PartialBlock { label, base64: Vec::with_capacity(4096), lines: 0 });
                Ok(None)
            }
            _ => Ok(Some(Frame::Command(Command::parse(line)?))),
        }
    }
}

/// The first octet in `s` that no line may hold, as its error.
fn first_fault(s: &[u8]) -> Option<WireError> {
    // The common case, all printable, in one pass without an early exit
    // (which the compiler turns into vector instructions).
    if s.iter().fold(true, |ok, &b| ok & is_printable(b)) {
        return None;
    }
    s.iter().find(|&&b| !is_printable(b)).map(|&b| match b {
        b'\r' => WireError::BareCr,
        b'\n' => WireError::BareLf,
        0 => WireError::Nul,
        other => WireError::NonPrintable(other),
    })
}

/// Checks that `der` is exactly one DER SEQUENCE with a minimal length.
fn check_der_sequence(der: &[u8]) -> Result<(), WireError> {
    let (&tag, rest) = der.split_first().ok_or(WireError::BadDer)?;
    let (&first, rest) = rest.split_first().ok_or(WireError::BadDer)?;
    if tag != 0x30 {
        return Err(WireError::BadDer);
    }
    let (len, rest) = match first {
        0..=0x7f => (usize::from(first), rest),
        0x81..=0x83 => {
            let n = usize::from(first & 0x7f);
            if rest.len() < n || rest[0] == 0 {
                return Err(WireError::BadDer);
            }
            let len = rest[..n].iter().fold(0usize, |l, &b| (l << 8) | usize::from(b));
            if len < 0x80 {
                return Err(WireError::BadDer);
            }
            (len, &rest[n..])
        }
        _ => return Err(WireError::BadDer),
    };
    if len != rest.len() {
        return Err(WireError::BadDer);
    }
    Ok(())
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = WireError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        // Each line is read where it lies and then dropped from the buffer
        // (no split-off buffer per line).
        while let Some(end) = Self::line_end(buf)? {
            let line = &buf[..end];
            let frame = if self.block.is_some() { self.block_line(line) } else { self.single_line(line) };
            // The line is consumed whether or not it makes sense.
            buf.advance(end + 2);
            let frame = frame?;
            if frame.is_some() {
                return Ok(frame);
            }
        }
        Ok(None)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        if let Some(frame) = self.decode(buf)? {
            return Ok(Some(frame));
        }
        if !buf.is_empty() {
            return Err(WireError::EofInLine);
        }
        match &self.block {
            Some(b) => Err(WireError::EofInBlock(b.label)),
            None => Ok(None),
        }
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = WireError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), WireError> {
        match frame {
            Frame::Command(c) => c.encode(dst),
            Frame::Status(s) => {
                dst.reserve(s.text.len() + 5);
                dst.put_slice(&[b'0' + s.code.as_u8() / 10, b'0' + s.code.as_u8() % 10, b' ']);
                dst.put_slice(s.text.as_bytes());
                dst.put_slice(b"\r\n");
                Ok(())
            }
            Frame::Block(b) => b.encode(dst),
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = WireError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), WireError> {
        <Self as Encoder<&Frame>>::encode(self, &frame, dst)
    }
}

/// Decodes every frame in `input`, for fuzzing and tests: the frames, and the
/// error that stopped decoding, if any.
pub fn decode_all(input: &[u8]) -> (Vec<Frame>, Option<WireError>) {
    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::from(input);
    let mut frames = Vec::new();
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => return (frames, None),
            Err(e) => return (frames, Some(e)),
        }
    }
}

/// Encodes `frame` into a fresh buffer.
///
/// # Errors
/// [`WireError::BadText`] or [`WireError::BlockTooLong`] for a frame that
/// cannot be put on the wire.
pub fn encode_frame(frame: &Frame) -> Result<BytesMut, WireError> {
    let mut buf = BytesMut::new();
    FrameCodec::new().encode(frame, &mut buf)?;
    Ok(buf)
}
