//! Trust On First Use over real TLS on loopback (PROFILE.md section 1).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use latssiam::tls::{self, MemoryPins, PinStore, TlsError};
use latssiam::{Address, Fingerprint, Identity};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

fn identity(addr: &str) -> Identity {
    Identity::generate(&addr.parse::<Address>().unwrap(), None, false).unwrap()
}

/// Serves one TLS connection with `config` on `listener`; reports the client
/// certificate's fingerprint (None for "no certificate"), or the handshake error.
fn serve_once(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> oneshot::Receiver<Result<Option<Fingerprint>, String>> {
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        drop(listener); // free the port for the next server in the test
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        match acceptor.accept(tcp).await {
            Ok(mut stream) => {
                let peer = tls::peer_certificate(&stream).map(|c| Fingerprint::of(&c));
                let _ = tx.send(Ok(peer));
                let _ = stream.write_all(b"hello\r\n").await;
                let _ = stream.shutdown().await;
            }
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
            }
        }
    });
    rx
}

async fn client(port: u16, id: Option<&Identity>, pins: &dyn PinStore) -> Result<(), TlsError> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut stream = tls::connect(tcp, "localhost", port, id, pins).await?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.unwrap();
    assert_eq!(buf, b"hello\r\n");
    Ok(())
}

#[tokio::test]
async fn first_contact_pins_and_a_changed_certificate_is_refused() {
    let server_a = identity("server@localhost");
    let server_b = identity("server@localhost");
    let alice = identity("alice@example.org");
    let pins = MemoryPins::default();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = serve_once(listener, tls::server_config(&server_a).unwrap());
    client(port, Some(&alice), &pins).await.unwrap();
    assert_eq!(seen.await.unwrap().unwrap(), Some(alice.fingerprint()), "server sees the client's certificate");
    let key = format!("localhost:{port}");
    assert_eq!(pins.get(&key).unwrap(), Some(server_a.fingerprint()), "first contact pins");

    // Same certificate again: accepted, pin unchanged.
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let _seen = serve_once(listener, tls::server_config(&server_a).unwrap());
    client(port, Some(&alice), &pins).await.unwrap();

    // Same host:port, new certificate: refused, naming both fingerprints.
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let _seen = serve_once(listener, tls::server_config(&server_b).unwrap());
    let err = client(port, Some(&alice), &pins).await.unwrap_err();
    match &err {
        TlsError::PinMismatch { pinned, presented, .. } => {
            assert_eq!(*pinned, server_a.fingerprint());
            assert_eq!(*presented, server_b.fingerprint());
        }
        other => panic!("expected a pin mismatch, got {other}"),
    }
    let text = err.to_string();
    assert!(text.contains(&server_a.fingerprint().to_string()) && text.contains(&server_b.fingerprint().to_string()));
    assert_eq!(pins.get(&key).unwrap(), Some(server_a.fingerprint()), "a refused certificate is not pinned");

    // The operator accepts the new certificate explicitly.
    pins.set(&key, server_b.fingerprint()).unwrap();
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let _seen = serve_once(listener, tls::server_config(&server_b).unwrap());
    client(port, Some(&alice), &pins).await.unwrap();
}

#[tokio::test]
async fn a_client_without_certificate_is_seen_as_none() {
    let server = identity("server@localhost");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = serve_once(listener, tls::server_config(&server).unwrap());
    client(port, None, &MemoryPins::default()).await.unwrap();
    assert_eq!(seen.await.unwrap().unwrap(), None);
}

#[tokio::test]
async fn file_pins_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/pins");
    let fp = Fingerprint::of(b"cert");
    tls::FilePins::open(&path).unwrap().set("h.example:1977", fp).unwrap();
    assert_eq!(tls::FilePins::open(&path).unwrap().get("h.example:1977").unwrap(), Some(fp));
    std::fs::write(&path, "h.example:1977 NOTHEX\n").unwrap();
    assert!(matches!(tls::FilePins::open(&path), Err(TlsError::PinStore { .. })));
}

fn rcgen_cert(not_before: time::OffsetDateTime, not_after: time::OffsetDateTime) -> Identity {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params.self_signed(&key).unwrap();
    Identity::from_der(cert.der().clone(), PrivateKeyDer::Pkcs8(key.serialize_der().into())).unwrap()
}

#[tokio::test]
async fn expired_and_future_certificates_are_reported_as_such() {
    let now = time::OffsetDateTime::now_utc();
    let day = time::Duration::days(1);
    let expired = rcgen_cert(now - 10 * day, now - day);
    let future = rcgen_cert(now + day, now + 10 * day);

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let _seen = serve_once(listener, tls::server_config(&expired).unwrap());
    let err = client(port, None, &MemoryPins::default()).await.unwrap_err();
    assert!(matches!(err, TlsError::Expired { fingerprint, .. } if fingerprint == expired.fingerprint()), "{err}");

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let _seen = serve_once(listener, tls::server_config(&future).unwrap());
    let err = client(port, None, &MemoryPins::default()).await.unwrap_err();
    assert!(matches!(err, TlsError::NotYetValid { .. }), "{err}");

    // A server refuses an expired client certificate.
    let server = identity("server@localhost");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = serve_once(listener, tls::server_config(&server).unwrap());
    // Under TLS 1.3 the client finishes first and learns of the refusal on its first read.
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    if let Ok(mut stream) = tls::connect(tcp, "localhost", port, Some(&expired), &MemoryPins::default()).await {
        let mut buf = Vec::new();
        assert!(stream.read_to_end(&mut buf).await.is_err(), "the server must refuse the expired certificate");
    }
    let server_side = seen.await.unwrap().unwrap_err();
    assert!(server_side.to_lowercase().contains("expired"), "{server_side}");
}

/// Presents `cert` but signs the handshake with another key.
#[derive(Debug)]
struct Impostor(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Impostor {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[tokio::test]
async fn a_server_without_the_pinned_key_fails_the_handshake_and_is_not_pinned() {
    let real = identity("server@localhost");
    let thief = identity("thief@localhost");
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let signing_key = provider.key_provider.load_private_key(thief.key_der().clone_key()).unwrap();
    let stolen: Vec<CertificateDer<'static>> = vec![real.cert_der().clone()];
    let certified = Arc::new(rustls::sign::CertifiedKey::new(stolen, signing_key));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Impostor(certified)));
    let pins = MemoryPins::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let _seen = serve_once(listener, Arc::new(config));
    let err = client(port, None, &pins).await.unwrap_err();
    assert!(matches!(err, TlsError::Handshake { .. }), "{err}");
    assert_eq!(pins.get(&format!("localhost:{port}")).unwrap(), None, "nothing pinned");
}
