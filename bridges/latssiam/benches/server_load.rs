//! `cargo bench -p latssiam --bench server_load`: a load generator against the
//! reference server on loopback, in one process (server and clients share
//! this machine's cores, so the figures are conservative).
//!
//! 1. Throughput: N senders on persistent TLS connections send signed 4 KiB
//!    messages as fast as the server answers, while one receiver long-polls
//!    and acknowledges. Reports messages/s stored durably and SEND->31 latency.
//! 2. Paced: the same at a fixed total rate; reports arrival->40 latency
//!    (arrival = the sender's 31, i.e. stored durably).
//! 3. 1,000 idle TLS connections, measured first in the fresh process: resident
//!    memory before and after (server and clients together).
//!
//! Flush policy: every 31 waits for an fsync; concurrent writers share one
//! (group commit in the store's flusher thread).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use latssiam::client::{Accepted, Client};
use latssiam::server::{Rate, Server, ServerConfig};
use latssiam::tls::MemoryPins;
use latssiam::wire::{Code, Password};
use latssiam::{crypto, Address, Fingerprint, Identity};

const HOST: &str = "localhost";

fn id(a: &str) -> Arc<Identity> {
    Arc::new(Identity::generate(&a.parse::<Address>().unwrap(), None, false).unwrap())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Seals and signs `count` distinct 4 KiB messages to `to`, spread over `senders`.
fn prepare(to: &Identity, senders: &[Arc<Identity>], count: usize) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut per_sender = vec![Vec::new(); senders.len()];
    for i in 0..count {
        let mut body =
            format!("From: s@localhost\r\nTo: alice@localhost\r\nMessage-ID: <{i}@localhost>\r\n\r\n").into_bytes();
        body.resize(4096, b'x');
        let msg = crypto::seal(&body, to.cert_der()).unwrap();
        let who = i % senders.len();
        let sig = crypto::sign(&msg, &senders[who]).unwrap();
        per_sender[who].push((msg, sig));
    }
    per_sender
}

type Arrivals = Arc<Mutex<HashMap<Fingerprint, Instant>>>;

/// Sends its messages (paced at `interval` if given); returns SEND->31 latencies.
async fn sender(
    addr: std::net::SocketAddr,
    who: Arc<Identity>,
    to: Fingerprint,
    messages: Vec<(Vec<u8>, Vec<u8>)>,
    interval: Option<Duration>,
    arrivals: Arrivals,
) -> Vec<Duration> {
    let pins = MemoryPins::default();
    let mut c = Client::connect(addr, HOST, Some(who), &pins).await.unwrap();
    let mut lat = Vec::with_capacity(messages.len());
    let mut next = tokio::time::Instant::now();
    for (msg, sig) in messages {
        if let Some(i) = interval {
            tokio::time::sleep_until(next).await;
            next += i;
        }
        let t0 = Instant::now();
        let st = c.send(to, &msg, Some(&sig)).await.unwrap();
        let t1 = Instant::now();
        assert_eq!(st.code(), Code::MessageAccepted, "{st}");
        arrivals.lock().unwrap().insert(Fingerprint::of(&msg), t1);
        lat.push(t1 - t0);
    }
    c.quit().await;
    lat
}

/// Accepts and acknowledges `count` messages; returns each message's fingerprint and 40 time.
async fn receiver(addr: std::net::SocketAddr, who: Arc<Identity>, count: usize) -> Vec<(Fingerprint, Instant)> {
    let pins = MemoryPins::default();
    let mut c = Client::connect(addr, HOST, Some(who), &pins).await.unwrap();
    let mut got = Vec::with_capacity(count);
    while got.len() < count {
        match c.accept(Duration::from_secs(30)).await.unwrap() {
            Accepted::Message(d) => {
                got.push((Fingerprint::of(&d.message), Instant::now()));
                c.ack().await.unwrap();
            }
            Accepted::Nothing(s) => panic!("receiver got {s}"),
        }
    }
    c.quit().await;
    got
}

async fn phase(
    addr: std::net::SocketAddr,
    alice: &Arc<Identity>,
    senders: &[Arc<Identity>],
    work: Vec<Vec<(Vec<u8>, Vec<u8>)>>,
    interval: Option<Duration>,
) -> (f64, Vec<Duration>, Vec<Duration>) {
    let total: usize = work.iter().map(Vec::len).sum();
    let arrivals: Arrivals = Arc::default();
    let rx = tokio::spawn(receiver(addr, alice.clone(), total));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (who, msgs) in senders.iter().zip(work) {
        tasks.push(tokio::spawn(sender(addr, who.clone(), alice.fingerprint(), msgs, interval, arrivals.clone())));
    }
    let mut send_lat = Vec::new();
    for t in tasks {
        send_lat.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed();
    let got = rx.await.unwrap();
    let arrivals = arrivals.lock().unwrap();
    let mut deliver_lat: Vec<Duration> =
        got.iter().map(|(fp, at)| at.saturating_duration_since(arrivals[fp])).collect();
    send_lat.sort();
    deliver_lat.sort();
    (total as f64 / elapsed.as_secs_f64(), send_lat, deliver_lat)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::new(HOST, dir.path().join("db"));
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.register_password = Some(Password::new("bench").unwrap());
        config.send_rate = Rate { per_second: 1e9, burst: 1e9 };
        config.max_unread_per_sender = u32::MAX;
        config.max_unread_per_mailbox = u32::MAX;
        // One host opens every connection here.
        config.max_connections_per_client = 0;
        let server = Server::new(config, id("server@localhost")).unwrap();
        let token = server.shutdown_token();
        let listener = server.bind().await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = tokio::spawn(server.serve(listener));

        let alice = id("alice@localhost");
        let pins = MemoryPins::default();
        let mut c = Client::connect(addr, HOST, Some(alice.clone()), &pins).await.unwrap();
        assert_eq!(c.register(&Password::new("bench").unwrap()).await.unwrap().code(), Code::RegistrationComplete);
        c.quit().await;

        let before = rss_mb();
        let bob = id("bob@localhost");
        let mut idle = Vec::with_capacity(1000);
        for _ in 0..1000 {
            idle.push(Client::connect(addr, HOST, Some(bob.clone()), &pins).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = rss_mb();
        println!(
            "1,000 idle TLS connections: process RSS {before:.1} MB -> {after:.1} MB \
             (server and the 1,000 clients together; +{:.1} MB, {:.1} KiB per connection pair)",
            after - before,
            (after - before) * 1024.0 / 1000.0
        );
        drop(idle);

        let n = 16;
        let senders: Vec<_> = (0..n).map(|i| id(&format!("s{i}@localhost"))).collect();
        let count = 12_000;
        let work = prepare(&alice, &senders, count);
        let (rate, send_lat, deliver_lat) = phase(addr, &alice, &senders, work, None).await;
        println!(
            "throughput: {n} senders, {count} signed 4 KiB messages: {rate:.0} msgs/s stored durably; \
             SEND->31 p50 {:.2?} p99 {:.2?}; arrival->40 p50 {:.2?} p99 {:.2?} (receiver draining a backlog)",
            percentile(&send_lat, 0.5),
            percentile(&send_lat, 0.99),
            percentile(&deliver_lat, 0.5),
            percentile(&deliver_lat, 0.99),
        );

        let paced_total = 5_000;
        let work = prepare(&alice, &senders, paced_total);
        let interval = Duration::from_secs_f64(n as f64 / 1000.0);
        let (rate, send_lat, deliver_lat) = phase(addr, &alice, &senders, work, Some(interval)).await;
        println!(
            "paced at 1,000 msgs/s ({rate:.0} achieved): SEND->31 p50 {:.2?} p99 {:.2?}; arrival->40 p50 {:.2?} p99 {:.2?}",
            percentile(&send_lat, 0.5),
            percentile(&send_lat, 0.99),
            percentile(&deliver_lat, 0.5),
            percentile(&deliver_lat, 0.99),
        );

        token.cancel();
        served.await.unwrap();
    });
}
