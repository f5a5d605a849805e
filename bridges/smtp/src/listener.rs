//! The SMTP listener: ESMTP with SIZE, 8BITMIME, PIPELINING, SMTPUTF8,
//! ENHANCEDSTATUSCODES and STARTTLS, commands parsed by `smtp-proto`.
//!
//! Limits (RFC 5321 section 4.5.3): command and text lines of at most 1000
//! octets including CRLF (`500 5.5.2`, and a text line over it spoils the
//! whole message), at most `max_recipients` recipients (`452 4.5.3`), a
//! message of at most `read_limit` octets (`552 5.3.4`), and timeouts while
//! waiting for a command or for data (`421 4.4.2`). Replies to pipelined
//! commands are written together when the client's input runs dry.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use smtp_proto::{Error as ParseError, Request};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::{Envelope, Reply, Sink};

/// The longest command or text line, CRLF included (RFC 5321 4.5.3.1.4 and .6;
/// the command limit is raised from 512 to 1000 to leave room for extension
/// parameters).
pub const MAX_LINE: usize = 1000;

/// After this many errors in one session the client is disconnected (as
/// Postfix's `smtpd_hard_error_limit`).
const MAX_ERRORS: u32 = 20;

/// Listener settings.
#[derive(Clone)]
pub struct ListenerConfig {
    /// The name in the greeting and the EHLO reply.
    pub hostname: String,
    /// The SIZE advertised: the largest message the sink can take.
    pub size_limit: usize,
    /// The most octets read in `DATA`; more is refused with `552 5.3.4`.
    /// Equal to `size_limit` unless the sink can shrink messages.
    pub read_limit: usize,
    /// Most recipients per transaction.
    pub max_recipients: usize,
    /// Wait for a command.
    pub command_timeout: Duration,
    /// Wait for each chunk of message data.
    pub data_timeout: Duration,
    /// Most simultaneous sessions.
    pub max_connections: usize,
    /// STARTTLS, if configured.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl ListenerConfig {
    /// Settings with RFC 5321 defaults and no TLS.
    pub fn new(hostname: impl Into<String>, size_limit: usize) -> Self {
        Self {
            hostname: hostname.into(),
            size_limit,
            read_limit: size_limit,
            max_recipients: 100,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            max_connections: 200,
            tls: None,
        }
    }
}

/// Accepts sessions until `shutdown`, then waits for the open ones to end
/// (each is told `421` at its next command).
pub async fn serve<S: Sink>(
    listener: TcpListener,
    config: Arc<ListenerConfig>,
    sink: Arc<S>,
    shutdown: CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let tracker = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&limit).acquire_owned() => p,
            () = shutdown.cancelled() => break,
        };
        let Ok(permit) = permit else { break };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shutdown.cancelled() => break,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "SMTP accept failed; backing off.");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (config, sink, shutdown) = (Arc::clone(&config), Arc::clone(&sink), shutdown.clone());
        tracker.spawn(async move {
            if let Err(e) = session(tcp, peer, &config, &*sink, &shutdown).await {
                debug!(%peer, error = %e, "SMTP session ended with an error.");
            }
            drop(permit);
        });
    }
    tracker.close();
    tracker.wait().await;
}

async fn session<S: Sink>(
    tcp: TcpStream,
    peer: SocketAddr,
    config: &ListenerConfig,
    sink: &S,
    shutdown: &CancellationToken,
) -> io::Result<()> {
    let mut state = Session::new(peer, config, sink);
    let greeting = format!("220 {} ESMTP latssiam-bridge\r\n", config.hostname);
    let tcp = match state.run(BufReader::new(tcp), Some(greeting), shutdown).await? {
        Outcome::Closed => return Ok(()),
        Outcome::StartTls(tcp) => tcp,
    };
    let Some(tls) = config.tls.clone() else { return Ok(()) };
    let stream =
        match tokio::time::timeout(config.command_timeout, tokio_rustls::TlsAcceptor::from(tls).accept(tcp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "STARTTLS handshake failed.");
                return Ok(());
            }
            Err(_) => return Ok(()),
        };
    state.tls = true;
    // RFC 3207: the client starts over with EHLO; whatever it pipelined before is gone.
    state.helo = None;
    state.reset();
    match state.run(BufReader::new(stream), None, shutdown).await? {
        Outcome::Closed | Outcome::StartTls(_) => Ok(()),
    }
}

enum Outcome<IO> {
    Closed,
    StartTls(IO),
}

/// What reading one line found.
enum Line {
    /// A line (without its line end).
    Ok(Vec<u8>),
    /// The line was longer than the limit; it has been consumed.
    TooLong,
    /// The client closed the connection.
    Eof,
}

/// Reads one line of at most `max` octets including the line end, consuming
/// (and discarding) the rest of a longer one. Never holds more than `max` octets.
async fn read_line<R: AsyncRead + Unpin>(reader: &mut BufReader<R>, max: usize) -> io::Result<Line> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(Line::Eof);
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..=i], true),
            None => (buf, false),
        };
        let n = chunk.len();
        if !too_long {
            if line.len() + n > max {
                too_long = true;
                line = Vec::new();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        reader.consume(n);
        if done {
            if too_long {
                return Ok(Line::TooLong);
            }
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(Line::Ok(line));
        }
    }
}

struct Session<'a, S> {
    peer: SocketAddr,
    config: &'a ListenerConfig,
    sink: &'a S,
    helo: Option<String>,
    tls: bool,
    from: Option<String>,
    recipients: Vec<String>,
    errors: u32,
    out: Vec<u8>,
}

fn reply(code: u16, status: [u8; 3], text: &str) -> Reply {
    Reply::new(code, status, text)
}

impl<'a, S: Sink> Session<'a, S> {
    fn new(peer: SocketAddr, config: &'a ListenerConfig, sink: &'a S) -> Self {
        Self {
            peer,
            config,
            sink,
            helo: None,
            tls: false,
            from: None,
            recipients: Vec::new(),
            errors: 0,
            out: Vec::new(),
        }
    }

    fn reset(&mut self) {
        self.from = None;
        self.recipients.clear();
    }

    fn push(&mut self, r: &Reply) {
        if !r.is_positive() && r.code != 354 {
            self.errors += 1;
        }
        self.out.extend_from_slice(format!("{r}\r\n").as_bytes());
    }

    async fn flush<IO: AsyncWrite + Unpin>(&mut self, io: &mut IO) -> io::Result<()> {
        if !self.out.is_empty() {
            io.write_all(&self.out).await?;
            io.flush().await?;
            self.out.clear();
        }
        Ok(())
    }

    async fn run<IO: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        mut io: BufReader<IO>,
        greeting: Option<String>,
        shutdown: &CancellationToken,
    ) -> io::Result<Outcome<IO>> {
        if let Some(g) = greeting {
            self.out.extend_from_slice(g.as_bytes());
        }
        loop {
            // Pipelining: answer once everything the client sent is handled.
            if io.buffer().is_empty() {
                self.flush(io.get_mut()).await?;
            }
            if self.errors >= MAX_ERRORS {
                self.push(&reply(421, [4, 7, 0], "Too many errors; closing"));
                self.flush(io.get_mut()).await?;
                return Ok(Outcome::Closed);
            }
            let line = tokio::select! {
                l = tokio::time::timeout(self.config.command_timeout, read_line(&mut io, MAX_LINE)) => l,
                () = shutdown.cancelled() => {
                    self.push(&reply(421, [4, 3, 2], "Shutting down; try again later"));
                    self.flush(io.get_mut()).await?;
                    return Ok(Outcome::Closed);
                }
            };
            let line = match line {
                Err(_) => {
                    self.push(&reply(421, [4, 4, 2], "Timeout; closing"));
                    self.flush(io.get_mut()).await?;
                    return Ok(Outcome::Closed);
                }
                Ok(r) => r?,
            };
            let mut line = match line {
                Line::Eof => return Ok(Outcome::Closed),
                Line::TooLong => {
                    self.push(&reply(500, [5, 5, 2], "Line too long"));
                    continue;
                }
                Line::Ok(l) => l,
            };
            line.extend_from_slice(b"\r\n");
            let request = match Request::parse(&mut line.iter()) {
                Ok(r) => r.into_owned(),
                Err(e) => {
                    let r = parse_error(&e);
                    self.push(&r);
                    continue;
                }
            };
            match request {
                Request::Ehlo { host } => {
                    self.reset();
                    self.helo = Some(host);
                    self.ehlo();
                }
                Request::Helo { host } => {
                    self.reset();
                    self.helo = Some(host);
                    let r = reply(250, [2, 0, 0], &self.config.hostname);
                    self.push(&r);
                }
                Request::Lhlo { .. } => self.push(&reply(500, [5, 5, 1], "This is SMTP, not LMTP")),
                Request::Mail { from } => {
                    let r = if self.helo.is_none() {
                        reply(503, [5, 5, 1], "Send EHLO or HELO first")
                    } else if self.from.is_some() {
                        reply(503, [5, 5, 1], "Nested MAIL command")
                    } else if from.size > self.config.size_limit {
                        reply(552, [5, 3, 4], &format!("Message too large; at most {} octets", self.config.size_limit))
                    } else {
                        self.from = Some(from.address);
                        reply(250, [2, 1, 0], "Ok")
                    };
                    self.push(&r);
                }
                Request::Rcpt { to } => {
                    let r = match &self.from {
                        None => reply(503, [5, 5, 1], "Need MAIL before RCPT"),
                        Some(_) if self.recipients.len() >= self.config.max_recipients => {
                            reply(452, [4, 5, 3], "Too many recipients; send the rest in another transaction")
                        }
                        Some(from) => match self.sink.recipient(from, &to.address).await {
                            Ok(()) => {
                                self.recipients.push(to.address);
                                reply(250, [2, 1, 5], "Ok")
                            }
                            Err(r) => r,
                        },
                    };
                    self.push(&r);
                }
                Request::Data => {
                    if self.from.is_none() {
                        self.push(&reply(503, [5, 5, 1], "Need MAIL before DATA"));
                    } else if self.recipients.is_empty() {
                        self.push(&reply(554, [5, 5, 1], "No valid recipients"));
                    } else {
                        self.push(&reply(354, [2, 0, 0], "End data with <CR><LF>.<CR><LF>"));
                        self.flush(io.get_mut()).await?;
                        let r = self.data(&mut io).await?;
                        self.push(&r);
                        self.reset();
                    }
                }
                Request::Bdat { .. } => self.push(&reply(502, [5, 5, 1], "BDAT is not offered; use DATA")),
                Request::Rset => {
                    self.reset();
                    self.push(&reply(250, [2, 0, 0], "Ok"));
                }
                Request::Noop { .. } => self.push(&reply(250, [2, 0, 0], "Ok")),
                Request::Vrfy { .. } => self.push(&reply(252, [2, 5, 0], "Send some mail and see")),
                Request::Help { .. } => self.push(&reply(214, [2, 0, 0], "See RFC 5321")),
                Request::Quit => {
                    self.push(&reply(221, [2, 0, 0], "Bye"));
                    self.flush(io.get_mut()).await?;
                    let _ = io.get_mut().shutdown().await;
                    return Ok(Outcome::Closed);
                }
                Request::StartTls => {
                    if self.tls {
                        self.push(&reply(503, [5, 5, 1], "Already under TLS"));
                    } else if self.config.tls.is_none() {
                        self.push(&reply(454, [4, 7, 0], "TLS not available"));
                    } else {
                        self.push(&reply(220, [2, 0, 0], "Ready to start TLS"));
                        self.flush(io.get_mut()).await?;
                        // Dropping the reader drops whatever was pipelined after STARTTLS.
                        return Ok(Outcome::StartTls(io.into_inner()));
                    }
                }
                Request::Auth { .. }
                | Request::Expn { .. }
                | Request::Etrn { .. }
                | Request::Atrn { .. }
                | Request::Burl { .. } => self.push(&reply(502, [5, 5, 1], "Command not implemented")),
            }
        }
    }

    fn ehlo(&mut self) {
        let mut lines = vec![self.config.hostname.clone(), format!("SIZE {}", self.config.size_limit)];
        lines.extend(["8BITMIME", "PIPELINING", "SMTPUTF8", "ENHANCEDSTATUSCODES"].map(String::from));
        if self.config.tls.is_some() && !self.tls {
            lines.push("STARTTLS".into());
        }
        let last = lines.len() - 1;
        for (i, l) in lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            self.out.extend_from_slice(format!("250{sep}{l}\r\n").as_bytes());
        }
    }

    /// Reads message data up to the lone dot, then hands it to the sink.
    async fn data<IO: AsyncRead + Unpin>(&mut self, io: &mut BufReader<IO>) -> io::Result<Reply> {
        let mut message = Vec::new();
        let (mut too_long, mut too_big) = (false, false);
        loop {
            let line = tokio::time::timeout(self.config.data_timeout, read_line(io, MAX_LINE))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "timeout in DATA"))??;
            match line {
                Line::Eof => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed in DATA")),
                Line::TooLong => too_long = true,
                Line::Ok(l) if l == b"." => break,
                Line::Ok(l) => {
                    let l = l.strip_prefix(b".").unwrap_or(&l);
                    if message.len() + l.len() + 2 > self.config.read_limit {
                        too_big = true;
                    }
                    if !too_big && !too_long {
                        message.extend_from_slice(l);
                        message.extend_from_slice(b"\r\n");
                    }
                }
            }
        }
        if too_long {
            return Ok(reply(500, [5, 5, 2], "Line too long; message refused"));
        }
        if too_big {
            return Ok(reply(552, [5, 3, 4], &format!("Message too large; at most {} octets", self.config.size_limit)));
        }
        let envelope = Envelope {
            peer: self.peer,
            helo: self.helo.clone().unwrap_or_default(),
            tls: self.tls,
            from: self.from.clone().unwrap_or_default(),
            recipients: self.recipients.clone(),
        };
        let r = self.sink.message(envelope, message).await;
        info!(peer = %self.peer, code = r.code, "SMTP message handled.");
        Ok(r)
    }
}

fn parse_error(e: &ParseError) -> Reply {
    match e {
        ParseError::UnknownCommand => reply(500, [5, 5, 1], "Command not recognized"),
        ParseError::InvalidSenderAddress => reply(501, [5, 1, 7], "Bad sender address syntax"),
        ParseError::InvalidRecipientAddress => reply(501, [5, 1, 3], "Bad recipient address syntax"),
        ParseError::SyntaxError { syntax } => reply(501, [5, 5, 4], &format!("Syntax: {syntax}")),
        ParseError::InvalidParameter { param } => reply(501, [5, 5, 4], &format!("Invalid parameter {param}")),
        ParseError::UnsupportedParameter { param } => {
            reply(555, [5, 5, 4], &format!("Unsupported parameter {}", param.chars().take(64).collect::<String>()))
        }
        ParseError::ResponseTooLong => reply(500, [5, 5, 2], "Line too long"),
        ParseError::NeedsMoreData { .. } | ParseError::InvalidResponse { .. } => reply(501, [5, 5, 4], "Syntax error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn read_line_caps_and_recovers() {
        let input: &[u8] = b"short\r\nxxxxxxxxxxxxxxxxxxxx\r\nbare lf\nend";
        let mut r = BufReader::with_capacity(4, input);
        assert!(matches!(read_line(&mut r, 10).await.unwrap(), Line::Ok(l) if l == b"short"));
        assert!(matches!(read_line(&mut r, 10).await.unwrap(), Line::TooLong));
        assert!(matches!(read_line(&mut r, 10).await.unwrap(), Line::Ok(l) if l == b"bare lf"));
        assert!(matches!(read_line(&mut r, 10).await.unwrap(), Line::Eof));
    }
}
