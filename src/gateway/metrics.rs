//! Counters, and what `http.listen` serves: `/metrics` (Prometheus text
//! format) and `/healthz` (`200 ok`, or `503` and what is wrong).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::net::SocketAddr;

use hyper::StatusCode;

use super::http::{Answer, Handler};
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

/// What `http.listen` serves: `/metrics` and `/healthz`.
pub struct Monitor {
    /// The counters.
    pub metrics: Arc<Metrics>,
    /// The queue, for its depth and the health check.
    pub store: Arc<Store>,
    /// The home server, for the health check.
    pub home: SocketAddr,
}

impl Monitor {
    /// Whether the gateway can do its work: the queue takes a durable write,
    /// and the home server accepts a connection.
    ///
    /// # Errors
    /// What is wrong, in one line.
    pub async fn health(&self) -> Result<(), String> {
        if let Some(e) = self.store.broken() {
            return Err(format!("queue store failed: {e}"));
        }
        if let Err(free) = self.store.room() {
            return Err(format!("queue not writable: {} MiB free, below queue.min_free_mb", free >> 20));
        }
        match tokio::time::timeout(Duration::from_secs(5), self.store.probe()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("queue not writable: {e}")),
            Err(_) => return Err("queue not writable: no fsync within 5 s".into()),
        }
        match tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(self.home)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("home server {} unreachable: {e}", self.home)),
            Err(_) => Err(format!("home server {} unreachable: no answer within 5 s", self.home)),
        }
    }
}

impl Handler for Monitor {
    async fn get(&self, path: &str, _query: Option<&str>) -> Answer {
        match path {
            "/metrics" => Answer {
                status: StatusCode::OK,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: self.metrics.render(&self.store).into(),
                headers: Vec::new(),
            },
            "/healthz" => match self.health().await {
                Ok(()) => Answer::text(StatusCode::OK, "ok\n"),
                Err(e) => Answer::text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
            },
            _ => Answer::text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}
