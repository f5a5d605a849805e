//! The reference server against real TLS clients on loopback: every status
//! code it can send, every bad-input case with its code and hang-up, and the
//! server going on serving others with nothing stored from a bad session.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use latssiam::client::{Accepted, Client, ClientError};
use latssiam::conn::{Connection, ReadError};
use latssiam::server::store::{MailboxState, Store};
use latssiam::server::{LocalDelivery, Rate, Server, ServerConfig};
use latssiam::tls::{self, ClientStream, MemoryPins};
use latssiam::wire::{Block, Code, Command, Frame, Label, Password, Status};
use latssiam::{attest, crypto, Address, Identity};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const HOST: &str = "localhost";
const PASSWORD: &str = "open sesame";
const T: Duration = Duration::from_secs(10);

fn id(addr: &str) -> Arc<Identity> {
    Arc::new(Identity::generate(&addr.parse::<Address>().unwrap(), None, false).unwrap())
}

struct TestServer {
    addr: SocketAddr,
    identity: Arc<Identity>,
    store: Arc<Store>,
    local: LocalDelivery,
    token: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
    pins: MemoryPins,
}

impl TestServer {
    async fn start(configure: impl FnOnce(&mut ServerConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, configure).await
    }

    async fn start_in(dir: tempfile::TempDir, configure: impl FnOnce(&mut ServerConfig)) -> Self {
        let mut config = ServerConfig::new(HOST, dir.path().join("db"));
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.register_password = Some(Password::new(PASSWORD).unwrap());
        configure(&mut config);
        let identity = id("server@localhost");
        let server = Server::new(config, identity.clone()).unwrap();
        let store = server.store().clone();
        let local = server.local_delivery();
        let token = server.shutdown_token();
        let listener = server.bind().await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(server.serve(listener));
        Self { addr, identity, store, local, token, task, _dir: dir, pins: MemoryPins::default() }
    }

    async fn client(&self, who: &Arc<Identity>) -> Client {
        Client::connect(self.addr, HOST, Some(who.clone()), &self.pins).await.unwrap()
    }

    /// A raw framed TLS connection, for sending what a well-behaved client would not.
    async fn raw(&self, who: Option<&Identity>) -> Connection<ClientStream> {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        Connection::new(tls::connect(tcp, HOST, self.addr.port(), who, &self.pins).await.unwrap())
    }

    async fn registered(&self, addr: &str) -> Arc<Identity> {
        let who = id(addr);
        let mut c = self.client(&who).await;
        assert_eq!(c.register(&Password::new(PASSWORD).unwrap()).await.unwrap().code(), Code::RegistrationComplete);
        c.quit().await;
        who
    }

    async fn stop(self) {
        self.token.cancel();
        self.task.await.unwrap();
    }
}

async fn status(conn: &mut Connection<ClientStream>) -> Code {
    match conn.read(T).await.unwrap() {
        Frame::Status(s) => s.code(),
        other => panic!("expected a status, got {other:?}"),
    }
}

/// The server has hung up: the next read ends the stream.
async fn hung_up(conn: &mut Connection<ClientStream>) {
    match conn.read(T).await {
        Err(ReadError::Closed) | Err(ReadError::Wire(latssiam::wire::WireError::Io(_))) => {}
        other => panic!("expected a hang-up, got {other:?}"),
    }
}

fn sealed_for(to: &Identity, text: &str) -> Vec<u8> {
    crypto::seal(text.as_bytes(), to.cert_der()).unwrap()
}

#[tokio::test]
async fn conversation_register_send_accept_ack_then_33() {
    let s = TestServer::start(|_| {}).await;
    let alice = s.registered("alice@localhost").await;
    let bob = s.registered("bob@localhost").await;
    let msg = sealed_for(&alice, "Subject: hi\r\n\r\nHello Alice");
    let sig = crypto::sign(&msg, &bob).unwrap();
    let mut b = s.client(&bob).await;
    assert_eq!(b.send(alice.fingerprint(), &msg, Some(&sig)).await.unwrap().code(), Code::MessageAccepted);
    let mut a = s.client(&alice).await;
    let Accepted::Message(d) = a.accept(Duration::ZERO).await.unwrap() else { panic!("no message") };
    assert_eq!(d.signature.as_deref(), Some(sig.as_slice()), "the server prepends the sender's signature");
    assert_eq!(crypto::open(&d.message, &alice).unwrap(), b"Subject: hi\r\n\r\nHello Alice");
    a.ack().await.unwrap();
    assert_eq!(a.accept(Duration::ZERO).await.unwrap(), Accepted::Nothing(Status::of(Code::NoMoreMessages)));
    // VERIFY gives Alice's certificate and her attestation of this server's key.
    let v = b.verify(alice.fingerprint()).await.unwrap().unwrap();
    assert_eq!(v.owner_cert, alice.cert_der().to_vec());
    attest::check(&v.attestation, alice.cert_der(), s.identity.cert_der(), Some(HOST)).unwrap();
    s.stop().await;
}

/// A delivery from inside the process (the gateway's to its embedded home
/// server) is signed by the server as its sender, so that the reader gets a
/// signature that verifies to the sender, and goes through `SEND`'s own
/// checks (`may_send`, `may_keep`), four of which are tried here: a message
/// that is not CMS, one over the size limit, one to a mailbox that is not
/// there, and one over the sender's quota get what `SEND` answers (`50`,
/// `39`, `34`, `36`), and nothing of them is stored.
#[tokio::test]
async fn a_local_delivery_is_signed_here_as_its_sender_and_checked_as_a_send_is() {
    let s = TestServer::start(|c| {
        c.max_message_octets = 4000;
        c.max_unread_per_sender = 1;
    })
    .await;
    let alice = s.registered("alice@localhost").await;
    let gateway = id("gateway@localhost");
    let refused = |r: Result<latssiam::server::Prepared, Status>| r.err().map(|status| status.code());
    assert_eq!(refused(s.local.prepare(&gateway, &alice.fingerprint(), b"not CMS")), Some(Code::SyntaxError));
    let long = crypto::seal(&[b'x'; 5000], alice.cert_der()).unwrap();
    assert_eq!(refused(s.local.prepare(&gateway, &alice.fingerprint(), &long)), Some(Code::MessageTooLong));
    let nobody = id("nobody@localhost");
    let to_nobody = sealed_for(&nobody, "Subject: lost\r\n\r\nx");
    assert_eq!(refused(s.local.prepare(&gateway, &nobody.fingerprint(), &to_nobody)), Some(Code::NoMailbox));

    let text = "Subject: local\r\n\r\nHello from inside";
    let prepared = s.local.prepare(&gateway, &alice.fingerprint(), &sealed_for(&alice, text)).unwrap();
    s.local.durable().await.unwrap();
    s.local.commit(prepared);
    let second = sealed_for(&alice, "Subject: again\r\n\r\nover the quota");
    assert_eq!(refused(s.local.prepare(&gateway, &alice.fingerprint(), &second)), Some(Code::MailboxFull));
    let mut a = s.client(&alice).await;
    let Accepted::Message(d) = a.accept(Duration::ZERO).await.unwrap() else { panic!("no message") };
    let signature = d.signature.expect("a local delivery is signed");
    let signer = crypto::verify(&signature, &d.message).unwrap();
    assert_eq!(signer, gateway.cert_der().to_vec(), "signed as the sender");
    assert_eq!(crypto::open(&d.message, &alice).unwrap(), text.as_bytes());
    a.ack().await.unwrap();
    assert_eq!(a.accept(Duration::ZERO).await.unwrap(), Accepted::Nothing(Status::of(Code::NoMoreMessages)));
    s.stop().await;
}

#[tokio::test]
async fn verbs_without_a_certificate_get_20_and_quit_closes() {
    let s = TestServer::start(|_| {}).await;
    let alice = s.registered("alice@localhost").await;
    let mut c = s.raw(None).await;
    for cmd in [
        Command::Send(alice.fingerprint()),
        Command::Accept(Duration::ZERO),
        Command::Register(Password::new(PASSWORD).unwrap()),
        Command::Deregister,
        Command::Verify(alice.fingerprint()),
    ] {
        c.send(cmd).await.unwrap();
        assert_eq!(status(&mut c).await, Code::CertificateRequired);
    }
    c.send(Command::Quit).await.unwrap();
    assert!(matches!(c.read(T).await, Err(ReadError::Closed)), "QUIT: close_notify, no status line");
    s.stop().await;
}

#[tokio::test]
async fn registration_answers_10_11_12_13_15() {
    let s = TestServer::start(|c| c.require_approval = true).await;
    let carol = id("carol@localhost");
    // 11: wrong password.
    let mut c = s.client(&carol).await;
    let st = c.register(&Password::new("wrong").unwrap()).await.unwrap();
    assert_eq!(st.code(), Code::RegistrationRefused);
    // 13 then 12: pending approval; then 11: already registered.
    let mut raw = s.raw(Some(&carol)).await;
    raw.send(Command::Register(Password::new(PASSWORD).unwrap())).await.unwrap();
    assert_eq!(status(&mut raw).await, Code::AttestationRequested);
    let Frame::Block(csr) = raw.read(T).await.unwrap() else { panic!() };
    assert_eq!(csr.label, Label::CertificateRequest);
    let att = attest::attest(&csr.der, &carol).unwrap();
    raw.feed(Code::AttestationFollows).await.unwrap();
    raw.send(Block::new(Label::Certificate, att)).await.unwrap();
    assert_eq!(status(&mut raw).await, Code::RegistrationPending);
    assert_eq!(s.store.mailbox(&carol.fingerprint()).unwrap().unwrap().state, MailboxState::Pending);
    assert_eq!(c.register(&Password::new(PASSWORD).unwrap()).await.unwrap().code(), Code::RegistrationRefused);
    // Pending mailboxes do not receive: 34.
    let dave = id("dave@localhost");
    let mut d = s.client(&dave).await;
    assert_eq!(d.send(carol.fingerprint(), &sealed_for(&carol, "x"), None).await.unwrap().code(), Code::NoMailbox);
    // After approval, 30/31.
    s.store.set_state(&carol.fingerprint(), MailboxState::Active).await.unwrap();
    assert_eq!(
        d.send(carol.fingerprint(), &sealed_for(&carol, "x"), None).await.unwrap().code(),
        Code::MessageAccepted
    );
    // 15: a domain this server does not serve.
    let eve = id("eve@elsewhere.example");
    let mut e = s.client(&eve).await;
    assert_eq!(e.register(&Password::new(PASSWORD).unwrap()).await.unwrap().code(), Code::RegistrationUnavailable);
    s.stop().await;
}

/// Guessing the registration password costs time: a wrong one is answered
/// `11` after 1 s, doubled for each wrong one in the last minute, and the
/// third on one connection closes it. A client address that gave three
/// wrong ones in the last minute is refused `11` without its password
/// being compared, the right one too, so that more connections do not
/// buy more guesses.
#[tokio::test]
async fn wrong_registration_passwords_are_answered_ever_later_and_limited_per_client() {
    let s = TestServer::start(|_| {}).await;
    let mallory = id("mallory@localhost");
    let mut raw = s.raw(Some(&mallory)).await;
    for (i, at_least) in [1, 2, 4].into_iter().enumerate() {
        let asked = Instant::now();
        raw.send(Command::Register(Password::new(format!("guess {i}")).unwrap())).await.unwrap();
        assert_eq!(status(&mut raw).await, Code::RegistrationRefused);
        let waited = asked.elapsed();
        assert!(waited >= Duration::from_secs(at_least), "wrong password {i} answered after {waited:?}");
    }
    hung_up(&mut raw).await;
    // Another connection from the same address, with the right password.
    let mut c = s.client(&id("alice@localhost")).await;
    let st = c.register(&Password::new(PASSWORD).unwrap()).await.unwrap();
    assert_eq!(st.code(), Code::RegistrationRefused, "{st:?}");
    assert!(st.text().contains("Too many wrong passwords"), "{st:?}");
    s.stop().await;
}

/// Each registration with the right password may write and flush a
/// mailbox record, and a mailbox can be registered and deregistered over
/// and over: one client address gets ten a minute, then `11` with nothing
/// written.
#[tokio::test]
async fn registrations_with_the_right_password_are_limited_per_client() {
    let s = TestServer::start(|_| {}).await;
    let alice = id("alice@localhost");
    let mut c = s.client(&alice).await;
    let password = Password::new(PASSWORD).unwrap();
    for i in 0..10 {
        assert_eq!(c.register(&password).await.unwrap().code(), Code::RegistrationComplete, "registration {i}");
        assert_eq!(c.deregister().await.unwrap().code(), Code::RegistrationComplete);
    }
    let st = c.register(&password).await.unwrap();
    assert_eq!(st.code(), Code::RegistrationRefused, "{st:?}");
    assert!(st.text().contains("Too many registrations"), "{st:?}");
    assert_eq!(s.store.mailbox(&alice.fingerprint()).unwrap().unwrap().state, MailboxState::Gone, "nothing written");
    s.stop().await;
}

/// A session out of step (here a server made in the test that answers
/// `31` at once, before any message) is an error to the client, never a
/// delivery: the gateway answers SMTP `250` on a `31`.
#[tokio::test]
async fn a_31_before_the_message_is_not_taken_for_a_delivery() {
    let server = id("server@localhost");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(&server).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut conn = Connection::new(acceptor.accept(tcp).await.unwrap());
        assert!(matches!(conn.read(T).await.unwrap(), Frame::Command(Command::Send(_))));
        conn.send(Code::MessageAccepted).await.unwrap();
        // The message the client should not have sent after that, if it did.
        conn.read(T).await
    });
    let alice = id("alice@localhost");
    let mut c = Client::connect(addr, HOST, Some(alice.clone()), &MemoryPins::default()).await.unwrap();
    let got = c.send(alice.fingerprint(), &sealed_for(&alice, "x"), None).await;
    assert!(matches!(got, Err(ClientError::Unexpected(_))), "{got:?}");
    drop(c);
    assert!(task.await.unwrap().is_err(), "no message followed the early 31");
}

#[tokio::test]
async fn registration_without_a_password_configured_is_15() {
    let s = TestServer::start(|c| c.register_password = None).await;
    let mut c = s.client(&id("alice@localhost")).await;
    assert_eq!(c.register(&Password::new(PASSWORD).unwrap()).await.unwrap().code(), Code::RegistrationUnavailable);
    s.stop().await;
}

#[tokio::test]
async fn a_forged_attestation_is_refused_with_11() {
    let s = TestServer::start(|_| {}).await;
    let alice = id("alice@localhost");
    let mallory = id("alice@localhost");
    let mut raw = s.raw(Some(&alice)).await;
    raw.send(Command::Register(Password::new(PASSWORD).unwrap())).await.unwrap();
    assert_eq!(status(&mut raw).await, Code::AttestationRequested);
    let Frame::Block(csr) = raw.read(T).await.unwrap() else { panic!() };
    // Signed by another key with the same name: not Alice's attestation.
    let forged = attest::attest(&csr.der, &mallory).unwrap();
    raw.feed(Code::AttestationFollows).await.unwrap();
    raw.send(Block::new(Label::Certificate, forged)).await.unwrap();
    assert_eq!(status(&mut raw).await, Code::RegistrationRefused);
    assert!(s.store.mailbox(&alice.fingerprint()).unwrap().is_none(), "nothing stored");
    // An attestation for another server's key is refused too.
    let other = id("server@localhost");
    let other_csr = attest::server_csr(&other, HOST).unwrap();
    raw.send(Command::Register(Password::new(PASSWORD).unwrap())).await.unwrap();
    assert_eq!(status(&mut raw).await, Code::AttestationRequested);
    let _ = raw.read(T).await.unwrap();
    raw.feed(Code::AttestationFollows).await.unwrap();
    raw.send(Block::new(Label::Certificate, attest::attest(&other_csr, &alice).unwrap())).await.unwrap();
    assert_eq!(status(&mut raw).await, Code::RegistrationRefused);
    assert!(s.store.mailbox(&alice.fingerprint()).unwrap().is_none());
    s.stop().await;
}

#[tokio::test]
async fn send_answers_30_31_32_34_35_36_38_21_39_52() {
    let s = TestServer::start(|c| {
        c.max_unread_per_sender = 2;
        c.max_unread_per_mailbox = 3;
        c.max_message_octets = 2000;
    })
    .await;
    let alice = s.registered("alice@localhost").await;
    let bob = id("bob@localhost");
    let carol = id("carol@localhost");
    let mut b = s.client(&bob).await;
    let small = sealed_for(&alice, "small");
    // 34: nobody.
    assert_eq!(b.send(bob.fingerprint(), &small, None).await.unwrap().code(), Code::NoMailbox);
    // 39: over the configured size (the session goes on).
    let big = sealed_for(&alice, &"x".repeat(3000));
    let dan = id("dan@localhost");
    let mut d = s.client(&dan).await;
    assert_eq!(d.send(alice.fingerprint(), &big, None).await.unwrap().code(), Code::MessageTooLong);
    // 52: a signature by someone other than the TLS client.
    let sig_by_carol = crypto::sign(&small, &carol).unwrap();
    assert_eq!(d.send(alice.fingerprint(), &small, Some(&sig_by_carol)).await.unwrap().code(), Code::MessageRefused);
    // 52: a signature over other bytes.
    let sig_other = crypto::sign(b"other bytes", &dan).unwrap();
    assert_eq!(d.send(alice.fingerprint(), &small, Some(&sig_other)).await.unwrap().code(), Code::MessageRefused);
    assert_eq!(s.store.unread(&alice.fingerprint(), &dan.fingerprint()), (0, 0), "nothing stored from refused sends");
    // 30 then 31, twice; then 36 for Bob (per sender), 31 for Carol, then 36 for Carol (per mailbox).
    for _ in 0..2 {
        assert_eq!(b.send(alice.fingerprint(), &small, None).await.unwrap().code(), Code::MessageAccepted);
    }
    assert_eq!(b.send(alice.fingerprint(), &small, None).await.unwrap().code(), Code::MailboxFull);
    let mut c = s.client(&carol).await;
    assert_eq!(c.send(alice.fingerprint(), &small, None).await.unwrap().code(), Code::MessageAccepted);
    assert_eq!(c.send(alice.fingerprint(), &small, None).await.unwrap().code(), Code::MailboxFull);
    // 35: moved.
    s.store.set_state(&alice.fingerprint(), MailboxState::Moved("new.example".into())).await.unwrap();
    let st = d.send(alice.fingerprint(), &small, None).await.unwrap();
    assert_eq!((st.code(), st.moved_to()), (Code::MailboxMoved, Some("new.example")));
    // 38: gone after deregistration; stored messages deleted.
    s.store.set_state(&alice.fingerprint(), MailboxState::Active).await.unwrap();
    let mut a = s.client(&alice).await;
    assert_eq!(a.deregister().await.unwrap().code(), Code::RegistrationComplete);
    assert_eq!(s.store.unread(&alice.fingerprint(), &bob.fingerprint()), (0, 0));
    assert_eq!(d.send(alice.fingerprint(), &small, None).await.unwrap().code(), Code::MailboxGone);
    assert_eq!(a.accept(Duration::ZERO).await.unwrap(), Accepted::Nothing(Status::of(Code::MailboxGone)));
    assert_eq!(a.deregister().await.unwrap().code(), Code::MailboxGone);
    assert_eq!(d.verify(alice.fingerprint()).await.unwrap().unwrap_err().code(), Code::MailboxGone);
    s.stop().await;

    // 21 and 32 under other policies.
    let allowed = id("friend@localhost");
    let friend_fp = allowed.fingerprint();
    let s = TestServer::start(move |c| {
        c.allowed_senders = Some([friend_fp].into_iter().collect());
        c.require_signature = true;
    })
    .await;
    let alice = s.registered("alice@localhost").await;
    let msg = sealed_for(&alice, "hi");
    let mut stranger = s.client(&id("stranger@localhost")).await;
    assert_eq!(stranger.send(alice.fingerprint(), &msg, None).await.unwrap().code(), Code::CertificateUnauthorised);
    let mut f = s.client(&allowed).await;
    let sig = crypto::sign(&msg, &allowed).unwrap();
    assert_eq!(f.send(alice.fingerprint(), &msg, Some(&sig)).await.unwrap().code(), Code::MessageAccepted);
    assert!(matches!(f.send(alice.fingerprint(), &msg, None).await, Err(ClientError::SignatureRequired)));
    // On the wire: 32, and a message without its signature is out of sequence.
    let mut raw = s.raw(Some(&allowed)).await;
    raw.send(Command::Send(alice.fingerprint())).await.unwrap();
    assert_eq!(status(&mut raw).await, Code::SignatureRequired);
    raw.send(Block::new(Label::EncryptedMessage, msg.clone())).await.unwrap();
    assert_eq!(status(&mut raw).await, Code::SequencingError);
    hung_up(&mut raw).await;
    s.stop().await;
}

/// A mailbox deregistered between a `SEND`'s `30` and its message keeps
/// nothing: the sender hears `38`, and no message outlives the mailbox.
#[tokio::test]
async fn a_mailbox_deregistered_while_a_send_is_under_way_keeps_no_message() {
    let s = TestServer::start(|_| {}).await;
    let alice = s.registered("alice@localhost").await;
    let bob = id("bob@localhost");
    let mut raw = s.raw(Some(&bob)).await;
    raw.send(Command::Send(alice.fingerprint())).await.unwrap();
    assert_eq!(status(&mut raw).await, Code::Proceed);
    let mut a = s.client(&alice).await;
    assert_eq!(a.deregister().await.unwrap().code(), Code::RegistrationComplete);
    raw.send(Block::new(Label::EncryptedMessage, sealed_for(&alice, "late"))).await.unwrap();
    assert_eq!(status(&mut raw).await, Code::MailboxGone);
    assert_eq!(s.store.unread(&alice.fingerprint(), &bob.fingerprint()), (0, 0));
    assert_eq!(s.store.oldest(&alice.fingerprint()).unwrap(), None, "a message kept in a gone mailbox");
    // The session goes on.
    raw.send(Command::Quit).await.unwrap();
    s.stop().await;
}

#[tokio::test]
async fn rates_answer_37() {
    let s = TestServer::start(|c| {
        c.send_rate = Rate { per_second: 0.001, burst: 2.0 };
        c.empty_accept_rate = Rate { per_second: 0.001, burst: 2.0 };
    })
    .await;
    let alice = s.registered("alice@localhost").await;
    let mut a = s.client(&alice).await;
    let msg = sealed_for(&alice, "x");
    assert_eq!(a.send(alice.fingerprint(), &msg, None).await.unwrap().code(), Code::MessageAccepted);
    assert_eq!(a.send(alice.fingerprint(), &msg, None).await.unwrap().code(), Code::MessageAccepted);
    assert_eq!(a.send(alice.fingerprint(), &msg, None).await.unwrap().code(), Code::SlowDown);
    for _ in 0..2 {
        let Accepted::Message(_) = a.accept(Duration::ZERO).await.unwrap() else { panic!() };
        a.ack().await.unwrap();
    }
    // Draining is not eager polling; empty polls are.
    for _ in 0..2 {
        assert_eq!(a.accept(Duration::ZERO).await.unwrap(), Accepted::Nothing(Status::of(Code::NoMoreMessages)));
    }
    assert_eq!(a.accept(Duration::ZERO).await.unwrap(), Accepted::Nothing(Status::of(Code::SlowDown)));
    s.stop().await;
}

#[tokio::test]
async fn bad_input_gets_its_code_and_a_hang_up_and_others_are_still_served() {
    let s = TestServer::start(|_| {}).await;
    let alice = s.registered("alice@localhost").await;
    let bob = id("bob@localhost");
    let msg = sealed_for(&alice, "x");

    async fn raw_bytes(s: &TestServer, who: &Identity, bytes: &[u8]) -> Connection<ClientStream> {
        let tcp = TcpStream::connect(s.addr).await.unwrap();
        let mut stream = tls::connect(tcp, HOST, s.addr.port(), Some(who), &s.pins).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        stream.flush().await.unwrap();
        Connection::new(stream)
    }
    let fp = alice.fingerprint();
    let line64 = "QUFB".repeat(16);
    let cases: Vec<(&str, Vec<u8>, Code)> = vec![
        ("line over 73 octets", format!("SEND {fp}{}\r\n", "a".repeat(10)).into_bytes(), Code::SyntaxError),
        ("bare LF", b"QUIT\n".to_vec(), Code::SyntaxError),
        ("NUL", b"QU\0IT\r\n".to_vec(), Code::SyntaxError),
        ("unknown verb", b"HELO there\r\n".to_vec(), Code::SyntaxError),
        ("lower-case verb", b"quit\r\n".to_vec(), Code::SyntaxError),
        (
            "a block where a verb is due",
            {
                let mut v = b"-----BEGIN ENCRYPTED MESSAGE-----\r\n".to_vec();
                v.extend_from_slice(format!("{line64}\r\n").as_bytes());
                v.extend_from_slice(b"-----END ENCRYPTED MESSAGE-----\r\n");
                v
            },
            Code::SyntaxError,
        ),
        ("a status where a verb is due", b"31 Message accepted\r\n".to_vec(), Code::SequencingError),
        (
            "401-line message block",
            {
                let mut v = format!("SEND {fp}\r\n-----BEGIN ENCRYPTED MESSAGE-----\r\n").into_bytes();
                for _ in 0..401 {
                    v.extend_from_slice(format!("{line64}\r\n").as_bytes());
                }
                v
            },
            Code::MessageTooLong,
        ),
        (
            "bad base64 in a message",
            format!("SEND {fp}\r\n-----BEGIN ENCRYPTED MESSAGE-----\r\n!!!!\r\n").into_bytes(),
            Code::SyntaxError,
        ),
        (
            "a message that is not CMS",
            {
                let der = [0x30, 0x03, 0x02, 0x01, 0x00];
                format!(
                    "SEND {fp}\r\n-----BEGIN ENCRYPTED MESSAGE-----\r\n{}\r\n-----END ENCRYPTED MESSAGE-----\r\n",
                    base64_std(&der)
                )
                .into_bytes()
            },
            Code::SyntaxError,
        ),
    ];
    for (name, bytes, code) in cases {
        let mut c = raw_bytes(&s, &bob, &bytes).await;
        // A SEND first gets its 30.
        let mut got = status(&mut c).await;
        if got == Code::Proceed && bytes.starts_with(b"SEND") {
            got = status(&mut c).await;
        }
        assert_eq!(got, code, "{name}");
        hung_up(&mut c).await;
    }
    // A 51 for a block where a verb is due, when it arrives whole and valid.
    let mut c = s.raw(Some(&bob)).await;
    c.send(Block::new(Label::EncryptedMessage, msg.clone())).await.unwrap();
    assert_eq!(status(&mut c).await, Code::SequencingError);
    hung_up(&mut c).await;
    // Nothing from the bad sessions was stored, and a good client is served.
    assert_eq!(s.store.unread(&alice.fingerprint(), &bob.fingerprint()), (0, 0));
    let mut good = s.client(&bob).await;
    assert_eq!(good.send(alice.fingerprint(), &msg, None).await.unwrap().code(), Code::MessageAccepted);
    assert_eq!(s.store.unread(&alice.fingerprint(), &bob.fingerprint()), (1, 1));
    s.stop().await;
}

fn base64_std(der: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(der)
}

#[tokio::test]
async fn an_idle_session_gets_54_and_a_hang_up() {
    let s = TestServer::start(|c| c.idle_timeout = Duration::from_millis(300)).await;
    let mut c = s.raw(Some(&id("bob@localhost"))).await;
    assert_eq!(status(&mut c).await, Code::Timeout);
    hung_up(&mut c).await;
    s.stop().await;
}

#[tokio::test]
async fn an_accept_deadline_above_the_maximum_is_hung_up_on() {
    let s = TestServer::start(|c| c.max_accept_deadline = Duration::from_secs(60)).await;
    let alice = s.registered("alice@localhost").await;
    let mut c = s.raw(Some(&alice)).await;
    c.send(Command::Accept(Duration::from_secs(61))).await.unwrap();
    assert_eq!(status(&mut c).await, Code::SyntaxError);
    hung_up(&mut c).await;
    s.stop().await;
}

#[tokio::test]
async fn a_corrupt_store_record_is_answered_53() {
    // A real fault: a mailbox record that does not decode (as after disk corruption).
    let dir = tempfile::tempdir().unwrap();
    let victim = id("victim@localhost");
    {
        let db = latssiam::group_commit::open_db(&dir.path().join("db")).unwrap();
        db.open_tree("mailboxes").unwrap().insert(victim.fingerprint().as_bytes(), &[0xff, 0, 1][..]).unwrap();
        db.flush().unwrap();
    }
    let s = TestServer::start_in(dir, |_| {}).await;
    let mut c = s.client(&id("bob@localhost")).await;
    let st = c.send(victim.fingerprint(), &sealed_for(&victim, "x"), None).await.unwrap();
    assert_eq!(st.code(), Code::InternalError);
    // The session goes on.
    assert_eq!(c.verify(victim.fingerprint()).await.unwrap().unwrap_err().code(), Code::InternalError);
    s.stop().await;
}

#[tokio::test]
async fn a_client_that_vanishes_after_40_gets_the_message_again() {
    let s = TestServer::start(|_| {}).await;
    let alice = s.registered("alice@localhost").await;
    let bob = id("bob@localhost");
    let mut b = s.client(&bob).await;
    for text in ["one", "two"] {
        assert_eq!(
            b.send(alice.fingerprint(), &sealed_for(&alice, text), None).await.unwrap().code(),
            Code::MessageAccepted
        );
    }
    let mut a = s.client(&alice).await;
    let Accepted::Message(first) = a.accept(Duration::ZERO).await.unwrap() else { panic!() };
    drop(a); // gone without answering
    let mut a = s.client(&alice).await;
    let Accepted::Message(again) = a.accept(Duration::ZERO).await.unwrap() else { panic!() };
    assert_eq!(again, first);
    assert_eq!(crypto::open(&again.message, &alice).unwrap(), b"one", "oldest first");
    // 52 and 32 from the client also delete.
    a.refuse(Status::of(Code::MessageRefused)).await.unwrap();
    let Accepted::Message(second) = a.accept(Duration::ZERO).await.unwrap() else { panic!() };
    assert_eq!(crypto::open(&second.message, &alice).unwrap(), b"two");
    a.refuse(Status::of(Code::SignatureRequired)).await.unwrap();
    assert_eq!(a.accept(Duration::ZERO).await.unwrap(), Accepted::Nothing(Status::of(Code::NoMoreMessages)));
    s.stop().await;
}

#[tokio::test]
async fn a_waiting_accept_is_woken_by_the_arrival() {
    let s = TestServer::start(|_| {}).await;
    let alice = s.registered("alice@localhost").await;
    let bob = id("bob@localhost");
    let mut a = s.client(&alice).await;
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        let got = a.accept(Duration::from_secs(30)).await.unwrap();
        (got, Instant::now(), started)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut b = s.client(&bob).await;
    let msg = sealed_for(&alice, "wake up");
    assert_eq!(b.send(alice.fingerprint(), &msg, None).await.unwrap().code(), Code::MessageAccepted);
    let accepted_at = Instant::now();
    let (got, answered_at, started) = waiting.await.unwrap();
    let Accepted::Message(d) = got else { panic!("expected 40") };
    assert_eq!(d.message, msg);
    assert!(answered_at.duration_since(started) >= Duration::from_millis(300), "it waited for the arrival");
    let latency = answered_at.saturating_duration_since(accepted_at);
    eprintln!("arrival (31 to the sender) -> 40 to the waiting receiver: {latency:?}");
    assert!(latency < Duration::from_millis(100), "ACCEPT 30 answered {latency:?} after the arrival");
    s.stop().await;
}

#[tokio::test]
async fn shutdown_answers_a_waiting_accept_and_refuses_new_connections() {
    let s = TestServer::start(|_| {}).await;
    let alice = s.registered("alice@localhost").await;
    let mut a = s.client(&alice).await;
    let waiting = tokio::spawn(async move { a.accept(Duration::from_secs(30)).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let addr = s.addr;
    s.stop().await;
    assert_eq!(waiting.await.unwrap(), Accepted::Nothing(Status::of(Code::NoMoreMessages)));
    assert!(TcpStream::connect(addr).await.is_err(), "the listener is closed");
}

/// Regression: the server waited for the client's next line with a timeout equal
/// to the ACCEPT deadline, racing the deadline timer, so an ACCEPT that found
/// nothing was sometimes answered `54` and hung up on instead of `33`.
#[tokio::test]
async fn an_accept_that_finds_nothing_is_answered_33_not_54() {
    let s = TestServer::start(|c| c.empty_accept_rate = Rate { per_second: 100.0, burst: 100.0 }).await;
    let alice = s.registered("alice@localhost").await;
    let mut a = s.client(&alice).await;
    for _ in 0..6 {
        let answer = a.accept(Duration::from_secs(1)).await.unwrap();
        assert_eq!(answer, Accepted::Nothing(Status::of(Code::NoMoreMessages)));
    }
}

#[tokio::test]
async fn one_address_holds_at_most_its_share_of_connections() {
    let server = TestServer::start(|c| c.max_connections_per_client = 2).await;
    let alice = server.registered("alice@localhost").await;
    // Let the registration's session end first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _first = server.client(&alice).await;
    let _second = server.client(&alice).await;
    // The third from the same address is closed before the TLS handshake.
    let third = tokio::time::timeout(T, Client::connect(server.addr, HOST, Some(alice.clone()), &server.pins)).await;
    assert!(matches!(third, Ok(Err(_))), "a third connection got through");
    drop(_first);
    // Once one is gone, the address may connect again.
    let again = tokio::time::timeout(T, async {
        loop {
            if let Ok(c) = Client::connect(server.addr, HOST, Some(alice.clone()), &server.pins).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(again.is_ok());
    server.stop().await;
}

#[test]
fn ipv6_clients_are_counted_by_their_64() {
    use latssiam::server::client_key;
    let a = client_key("2001:db8:1:2:aaaa::1".parse().unwrap());
    assert_eq!(a, client_key("2001:db8:1:2:ffff::9".parse().unwrap()));
    assert_ne!(a, client_key("2001:db8:1:3::1".parse().unwrap()));
    assert_eq!(client_key("::ffff:192.0.2.1".parse().unwrap()), "192.0.2.1".parse::<std::net::IpAddr>().unwrap());
}

/// Stores `n` messages for `to` ("message 0", "message 1", ..., oldest
/// first), straight into the server's store.
async fn fill(s: &TestServer, to: &Identity, n: usize) {
    let sender = latssiam::Fingerprint::of(b"some sender");
    for i in 0..n {
        let msg = sealed_for(to, &format!("message {i}"));
        s.store.store_message(&to.fingerprint(), &sender, None, &msg).await.unwrap();
    }
}

fn text(d: &latssiam::client::Delivered, to: &Identity) -> String {
    String::from_utf8(crypto::open(&d.message, to).unwrap()).unwrap()
}

#[tokio::test]
async fn two_sessions_accepting_at_once_get_different_messages() {
    let s = TestServer::start(|_| {}).await;
    let alice = s.registered("alice@localhost").await;
    fill(&s, &alice, 2).await;
    let (mut a1, mut a2) = (s.client(&alice).await, s.client(&alice).await);
    let (r1, r2) = tokio::join!(a1.accept(Duration::ZERO), a2.accept(Duration::ZERO));
    let (Accepted::Message(d1), Accepted::Message(d2)) = (r1.unwrap(), r2.unwrap()) else {
        panic!("each session gets a message")
    };
    let mut got = [text(&d1, &alice), text(&d2, &alice)];
    got.sort();
    assert_eq!(got, ["message 0", "message 1"], "different messages");
    a1.ack().await.unwrap();
    a2.ack().await.unwrap();
    // The next ACCEPT on each session is read after its ack was handled.
    for c in [&mut a1, &mut a2] {
        assert_eq!(c.accept(Duration::ZERO).await.unwrap(), Accepted::Nothing(Status::of(Code::NoMoreMessages)));
    }
    assert_eq!(s.store.unread(&alice.fingerprint(), &alice.fingerprint()).0, 0, "the mailbox is empty");
    assert_eq!(s.store.offered(), 0);
    s.stop().await;
}

#[tokio::test]
async fn two_pollers_drain_a_mailbox_with_every_message_delivered_once() {
    const N: usize = 200;
    let s = TestServer::start(|_| {}).await;
    let alice = s.registered("alice@localhost").await;
    fill(&s, &alice, N).await;
    let start = Arc::new(tokio::sync::Barrier::new(2));
    let mut pollers = Vec::new();
    for _ in 0..2 {
        let mut c = s.client(&alice).await;
        let (start, alice) = (start.clone(), alice.clone());
        pollers.push(tokio::spawn(async move {
            start.wait().await;
            let mut got = Vec::new();
            loop {
                match c.accept(Duration::ZERO).await.unwrap() {
                    Accepted::Message(d) => {
                        got.push(text(&d, &alice));
                        c.ack().await.unwrap();
                    }
                    Accepted::Nothing(st) => {
                        assert_eq!(st.code(), Code::NoMoreMessages);
                        return got;
                    }
                }
            }
        }));
    }
    let mut all = Vec::new();
    for p in pollers {
        let got = tokio::time::timeout(Duration::from_secs(60), p).await.unwrap().unwrap();
        eprintln!("one poller got {} messages", got.len());
        assert!(!got.is_empty(), "both pollers took part");
        all.extend(got);
    }
    assert_eq!(all.len(), N, "no message delivered twice");
    all.sort();
    all.dedup();
    let mut expected: Vec<String> = (0..N).map(|i| format!("message {i}")).collect();
    expected.sort();
    assert_eq!(all, expected, "every message delivered");
    assert_eq!(s.store.unread(&alice.fingerprint(), &alice.fingerprint()).0, 0);
    assert_eq!(s.store.offered(), 0);
    s.stop().await;
}

#[tokio::test]
async fn a_message_offered_to_a_session_that_vanishes_wakes_a_waiting_accept() {
    let s = TestServer::start(|_| {}).await;
    let alice = s.registered("alice@localhost").await;
    fill(&s, &alice, 1).await;
    let mut first = s.client(&alice).await;
    let Accepted::Message(offered) = first.accept(Duration::ZERO).await.unwrap() else { panic!("no message") };
    let mut second = s.client(&alice).await;
    let waiting = tokio::spawn(async move {
        let got = second.accept(Duration::from_secs(30)).await.unwrap();
        (got, Instant::now(), second)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the message is not offered to a second session meanwhile");
    assert_eq!(s.store.offered(), 1);
    let dropped_at = Instant::now();
    drop(first); // gone without answering
    let (got, answered_at, mut second) = tokio::time::timeout(T, waiting).await.unwrap().unwrap();
    assert_eq!(got, Accepted::Message(offered), "offered again");
    let latency = answered_at.duration_since(dropped_at);
    eprintln!("hang-up of the first session -> 40 to the waiting one: {latency:?}");
    assert!(latency < Duration::from_secs(1), "woken {latency:?} after the release");
    second.ack().await.unwrap();
    assert_eq!(second.accept(Duration::ZERO).await.unwrap(), Accepted::Nothing(Status::of(Code::NoMoreMessages)));
    assert_eq!(s.store.offered(), 0);
    s.stop().await;
}

#[tokio::test]
async fn a_message_offered_to_a_session_that_times_out_is_offered_again() {
    let idle = Duration::from_millis(600);
    let s = TestServer::start(|c| c.idle_timeout = idle).await;
    let alice = s.registered("alice@localhost").await;
    fill(&s, &alice, 1).await;
    let mut silent = s.raw(Some(&alice)).await;
    silent.send(Command::Accept(Duration::ZERO)).await.unwrap();
    assert_eq!(status(&mut silent).await, Code::MessageFollows);
    let Frame::Block(offered) = silent.read(T).await.unwrap() else { panic!("expected the message") };
    let offered_at = Instant::now();
    assert_eq!(offered.label, Label::EncryptedMessage);
    let mut second = s.client(&alice).await;
    let waiting = tokio::spawn(async move {
        let got = second.accept(Duration::from_secs(5)).await.unwrap();
        (got, Instant::now(), second)
    });
    tokio::time::sleep(idle / 2).await;
    assert!(!waiting.is_finished(), "still offered to the silent session");
    // The silent session answers nothing: the server ends it with 54.
    assert_eq!(status(&mut silent).await, Code::Timeout);
    hung_up(&mut silent).await;
    let (got, answered_at, mut second) = tokio::time::timeout(T, waiting).await.unwrap().unwrap();
    let Accepted::Message(again) = got else { panic!("expected 40") };
    assert_eq!(again.message, offered.der, "offered again");
    assert!(answered_at.duration_since(offered_at) >= idle - Duration::from_millis(50), "not before the timeout");
    second.ack().await.unwrap();
    assert_eq!(second.accept(Duration::ZERO).await.unwrap(), Accepted::Nothing(Status::of(Code::NoMoreMessages)));
    s.stop().await;
}

/// Regression (review): a second certificate naming a registered address
/// took the address over in the capsule and WebFinger.
#[tokio::test]
async fn an_address_held_by_one_certificate_cannot_be_registered_by_another() {
    let s = TestServer::start(|_| {}).await;
    let alice = s.registered("alice@localhost").await;
    let impostor = id("alice@localhost");
    let mut c = s.client(&impostor).await;
    let st = c.register(&Password::new(PASSWORD).unwrap()).await.unwrap();
    assert_eq!(st.code(), Code::RegistrationRefused, "{st}");
    assert_eq!(s.store.active_certificate("ALICE@localhost").unwrap().as_deref(), Some(alice.cert_der().as_ref()));
    // Once she has left, a new key may take her address.
    let mut a = s.client(&alice).await;
    assert_eq!(a.deregister().await.unwrap().code(), Code::RegistrationComplete);
    let st = c.register(&Password::new(PASSWORD).unwrap()).await.unwrap();
    assert_eq!(st.code(), Code::RegistrationComplete, "{st}");
    assert_eq!(s.store.active_certificate("alice@localhost").unwrap().as_deref(), Some(impostor.cert_der().as_ref()));
    s.stop().await;
}

/// A message written for local delivery is not handed out before its fsync.
#[tokio::test]
async fn a_written_message_is_hidden_until_published() {
    let s = TestServer::start(|_| {}).await;
    let bob = s.registered("bob@localhost").await;
    let (owner, sender) = (bob.fingerprint(), s.identity.fingerprint());
    let id = s.store.insert_message(&owner, &sender, None, b"m").unwrap();
    assert!(s.store.offer_oldest(&owner).unwrap().is_none(), "not yet durable");
    s.store.publish_message(&owner, id);
    assert!(s.store.offer_oldest(&owner).unwrap().is_some());
    // One taken back is never handed out.
    let other = s.store.insert_message(&owner, &sender, None, b"n").unwrap();
    s.store.discard_message(&owner, other);
    assert_eq!(s.store.offered(), 0, "nothing left marked");
    s.stop().await;
}

/// The last word before a hang-up arrives even while the client is still
/// writing: the server drains what keeps coming (a lingering close) instead of
/// closing on unread input, which makes the kernel answer with a reset that
/// destroys the status line and the TLS close_notify in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_still_writing_after_an_oversized_block_reads_its_39() {
    use tokio::io::AsyncBufReadExt as _;
    let s = TestServer::start(|_| {}).await;
    let alice = s.registered("alice@localhost").await;
    let bob = id("bob@localhost");
    for round in 0..8 {
        let tcp = TcpStream::connect(s.addr).await.unwrap();
        let stream = tls::connect(tcp, HOST, s.addr.port(), Some(&bob), &s.pins).await.unwrap();
        let (reader, mut writer) = tokio::io::split(stream);
        let fp = alice.fingerprint();
        let writing = tokio::spawn(async move {
            let line = format!("{}\r\n", "QUFB".repeat(16));
            writer.write_all(format!("SEND {fp}\r\n-----BEGIN ENCRYPTED MESSAGE-----\r\n").as_bytes()).await?;
            // The 401 lines of the oversized block and 8,000 more (about 530 KB)
            // written as fast as the connection takes them.
            for _ in 0..8401 {
                writer.write_all(line.as_bytes()).await?;
            }
            writer.flush().await?;
            Ok::<_, std::io::Error>(writer)
        });
        // The client reads only once it has written everything it meant to,
        // and what it wrote was taken (drained), not answered with a reset.
        let writer = writing.await.unwrap();
        assert!(writer.is_ok(), "round {round}: {writer:?}");
        let mut lines = tokio::io::BufReader::new(reader).lines();
        let first = lines.next_line().await;
        let second = lines.next_line().await;
        let got = (first.as_ref().ok().cloned().flatten(), second.as_ref().ok().cloned().flatten());
        assert!(got.0.as_deref().is_some_and(|l| l.starts_with("30 ")), "round {round}: {first:?} {writer:?}");
        assert!(got.1.as_deref().is_some_and(|l| l.starts_with("39 ")), "round {round}: {second:?} {writer:?}");
        // Then a clean end: the server's close_notify, not a reset.
        assert!(matches!(lines.next_line().await, Ok(None)), "round {round}");
    }
    s.stop().await;
}

#[tokio::test]
async fn a_server_at_max_connections_closes_a_new_client_at_once() {
    use tokio::io::AsyncReadExt as _;
    let s = TestServer::start(|c| c.max_connections = 2).await;
    let bob = id("bob@localhost");
    let _held = (s.raw(Some(&bob)).await, s.raw(Some(&bob)).await);
    // Not left in the backlog until a slot frees: closed, unanswered, at once.
    let mut third = TcpStream::connect(s.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(2), third.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    drop(_held);
    // A slot given back serves the next client.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c = s.client(&bob).await;
    c.quit().await;
    s.stop().await;
}
