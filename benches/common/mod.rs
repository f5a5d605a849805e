//! Helpers shared by the gateway benchmarks.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Prometheus-style quantile from cumulative buckets.
pub fn histogram_quantile(metrics: &str, name: &str, q: f64) -> f64 {
    let mut buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{name}_bucket{{le=\"")))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map_or(0.0, |b| b.1);
    let rank = q * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return lo;
            }
            return lo + (le - lo) * ((rank - below) / (count - below).max(1.0));
        }
        (lo, below) = (le, count);
    }
    lo
}

pub async fn get_metrics(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
    let mut out = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut s, &mut out).await.unwrap();
    out
}

pub fn metric(metrics: &str, name: &str) -> u64 {
    metrics.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or(0)
}

/// Waits until the gateway answers on its admin socket.
pub async fn wait_for_gateway(socket: &std::path::Path) {
    use latssiam_bridge::gateway::admin::{self, Request};
    for _ in 0..400 {
        if admin::call(socket, &Request::ContactList).await.ok().flatten().is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the gateway did not start");
}

/// A person `mailbox@localhost` with a mailbox on the home server (password
/// `sesame`) who is a contact of the gateway.
pub async fn person(
    home: std::net::SocketAddr,
    socket: &std::path::Path,
    mailbox: &str,
    email: Option<String>,
    allow_send: bool,
) -> std::sync::Arc<latssiam::Identity> {
    use latssiam::wire::{Code, Password};
    use latssiam_bridge::gateway::admin::{self, Request};
    let address = latssiam::Address::new(mailbox, "localhost").unwrap();
    let id = std::sync::Arc::new(latssiam::Identity::generate(&address, None, false).unwrap());
    let pins = latssiam::tls::MemoryPins::default();
    let mut c =
        latssiam::client::Client::connect(home, "localhost", Some(std::sync::Arc::clone(&id)), &pins).await.unwrap();
    assert_eq!(c.register(&Password::new("sesame").unwrap()).await.unwrap().code(), Code::RegistrationComplete);
    c.quit().await;
    let contact = latssiam_bridge::gateway::contacts::Contact {
        address: address.to_string(),
        cert: id.cert_der().to_vec(),
        email,
        allow_send,
        server: None,
        gone: false,
        discoverable: false,
    };
    let r = admin::call(socket, &Request::ContactAdd { contact }).await.unwrap().unwrap();
    assert!(r.ok, "{}", r.text);
    id
}
