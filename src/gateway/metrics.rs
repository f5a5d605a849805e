//! Counters and the `/metrics` + `/healthz` HTTP endpoint (Prometheus text
//! format, HTTP/1.1 with `Connection: close`; nothing else is served).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::store::Store;

/// Latency histogram bucket bounds, seconds.
const BUCKETS: [f64; 20] = [
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
    600.0, 3600.0,
];

/// A Prometheus histogram.
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn render(&self, name: &str, labels: &str, out: &mut String) {
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{b}\"}} {}", self.counts[i].load(Ordering::Relaxed));
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{}}} {sum}", labels.trim_end_matches(','));
        let _ = writeln!(out, "{name}_count{{{}}} {count}", labels.trim_end_matches(','));
    }
}

/// Delivery results, by channel.
#[derive(Default)]
pub struct Results {
    /// Delivered.
    pub ok: AtomicU64,
    /// Temporary failure (retried).
    pub deferred: AtomicU64,
    /// Permanent failure (dead-lettered and bounced).
    pub failed: AtomicU64,
}

/// Everything counted.
#[derive(Default)]
pub struct Metrics {
    /// Messages accepted over SMTP (`250`).
    pub smtp_accepted: AtomicU64,
    /// Messages refused over SMTP at `DATA`.
    pub smtp_refused: AtomicU64,
    /// Deliveries to LATSSIAM.
    pub to_latssiam: Results,
    /// Relays to the smarthost.
    pub to_smtp: Results,
    /// `ACCEPT` round trips on the home server.
    pub accept_round_trips: AtomicU64,
    /// Messages taken from the home server (`31`).
    pub accept_taken: AtomicU64,
    /// Messages refused on the home server (`32`/`52`).
    pub accept_refused: AtomicU64,
    /// Times the IRC bot (re)joined its channels.
    pub irc_joins: AtomicU64,
    /// Lines heard in bridged IRC channels.
    pub irc_lines_heard: AtomicU64,
    /// Lines queued for LATSSIAM subscribers (in digests).
    pub irc_lines_queued: AtomicU64,
    /// Digests queued (each one job per subscriber).
    pub irc_digests_queued: AtomicU64,
    /// From arrival at the gateway to delivery.
    pub end_to_end: Histogram,
}

impl Metrics {
    /// Prometheus text.
    pub fn render(&self, store: &Store) -> String {
        let mut out = String::new();
        let depth = store.depth();
        out.push_str("# HELP latssiam_bridge_queue_jobs Jobs in the queue by state.\n");
        out.push_str("# TYPE latssiam_bridge_queue_jobs gauge\n");
        for (state, n) in [("active", depth.active), ("deferred", depth.deferred), ("dead", depth.dead)] {
            let _ = writeln!(out, "latssiam_bridge_queue_jobs{{state=\"{state}\"}} {n}");
        }
        out.push_str("# HELP latssiam_bridge_deliveries_total Delivery attempts by channel and result.\n");
        out.push_str("# TYPE latssiam_bridge_deliveries_total counter\n");
        for (channel, r) in [("latssiam", &self.to_latssiam), ("smtp", &self.to_smtp)] {
            for (result, n) in [("ok", &r.ok), ("deferred", &r.deferred), ("failed", &r.failed)] {
                let _ = writeln!(
                    out,
                    "latssiam_bridge_deliveries_total{{channel=\"{channel}\",result=\"{result}\"}} {}",
                    n.load(Ordering::Relaxed)
                );
            }
        }
        let counters = [
            ("latssiam_bridge_smtp_accepted_total", "Messages accepted over SMTP.", &self.smtp_accepted),
            ("latssiam_bridge_smtp_refused_total", "Messages refused over SMTP after DATA.", &self.smtp_refused),
            (
                "latssiam_bridge_accept_round_trips_total",
                "ACCEPT round trips on the home server.",
                &self.accept_round_trips,
            ),
            ("latssiam_bridge_accept_taken_total", "Messages taken from the home server.", &self.accept_taken),
            ("latssiam_bridge_accept_refused_total", "Messages refused on the home server.", &self.accept_refused),
            ("latssiam_bridge_irc_joins_total", "Times the IRC bot joined its channels.", &self.irc_joins),
            ("latssiam_bridge_irc_lines_heard_total", "Lines heard in bridged IRC channels.", &self.irc_lines_heard),
            ("latssiam_bridge_irc_lines_queued_total", "IRC lines queued for subscribers.", &self.irc_lines_queued),
            ("latssiam_bridge_irc_digests_queued_total", "IRC digests queued.", &self.irc_digests_queued),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Ordering::Relaxed));
        }
        out.push_str("# HELP latssiam_bridge_end_to_end_seconds From arrival at the gateway to delivery.\n");
        out.push_str("# TYPE latssiam_bridge_end_to_end_seconds histogram\n");
        self.end_to_end.render("latssiam_bridge_end_to_end_seconds", "", &mut out);
        out
    }
}

/// Serves `/metrics` and `/healthz` until `shutdown`.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, store: Arc<Store>, shutdown: CancellationToken) {
    loop {
        let (mut tcp, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let (metrics, store) = (Arc::clone(&metrics), Arc::clone(&store));
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut used = 0;
            let read = tokio::time::timeout(Duration::from_secs(10), async {
                while used < buf.len() {
                    let n = tcp.read(&mut buf[used..]).await?;
                    if n == 0 {
                        break;
                    }
                    used += n;
                    if buf[..used].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let request = String::from_utf8_lossy(&buf[..used]);
            let mut words = request.split_ascii_whitespace();
            let (status, body, ctype) = match (words.next(), words.next()) {
                (Some("GET"), Some("/metrics")) => {
                    ("200 OK", metrics.render(&store), "text/plain; version=0.0.4; charset=utf-8")
                }
                (Some("GET"), Some("/healthz")) => match store.broken() {
                    None => ("200 OK", "ok\n".to_owned(), "text/plain; charset=utf-8"),
                    Some(e) => {
                        ("503 Service Unavailable", format!("queue store failed: {e}\n"), "text/plain; charset=utf-8")
                    }
                },
                (Some("GET"), _) => ("404 Not Found", "not found\n".to_owned(), "text/plain; charset=utf-8"),
                _ => ("405 Method Not Allowed", "only GET\n".to_owned(), "text/plain; charset=utf-8"),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            if let Err(e) = tcp.write_all(response.as_bytes()).await {
                debug!(error = %e, "metrics response not sent");
            }
            let _ = tcp.shutdown().await;
        });
    }
}
