//! Counters, and what `http.listen` serves: `/metrics` (Prometheus text
//! format) and `/healthz` (`200 ok`, or `503` and what is wrong).

use std::sync::Arc;
use std::time::Duration;

use std::net::SocketAddr;

use hyper::StatusCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::db::Store;
use super::http::{Answer, Handler};

/// Latency histogram bucket bounds, seconds.
const BUCKETS: [f64; 20] = [
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
    600.0, 3600.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Delivery {
    channel: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuthOutcome {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueState {
    state: &'static str,
}

/// A latency histogram.
pub struct Histogram(prometheus_client::metrics::histogram::Histogram);

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        self.0.observe(d.as_secs_f64());
    }
}

/// Delivery results, by channel.
pub struct Results {
    /// Delivered.
    pub ok: Counter,
    /// Temporary failure (retried).
    pub deferred: Counter,
    /// Permanent failure (dead-lettered and bounced).
    pub failed: Counter,
}

/// Everything counted, registered once (prometheus-client) under the names
/// the gateway has always exposed.
pub struct Metrics {
    /// Messages accepted over SMTP (`250`).
    pub smtp_accepted: Counter,
    /// Messages refused over SMTP at `DATA`.
    pub smtp_refused: Counter,
    /// Deliveries to LATSSIAM.
    pub to_latssiam: Results,
    /// Relays to the smarthost.
    pub to_smtp: Results,
    /// `ACCEPT` round trips on the home server.
    pub accept_round_trips: Counter,
    /// Messages taken from the home server (`31`).
    pub accept_taken: Counter,
    /// Messages refused on the home server (`32`/`52`).
    pub accept_refused: Counter,
    /// Fragment sets from contacts joined into one message (PROFILE section 8).
    pub fragments_joined: Counter,
    /// Fragments from contacts dropped (section 8's refusals).
    pub fragments_refused: Counter,
    /// Incomplete fragment sets discarded after their time limit.
    pub fragments_expired: Counter,
    /// Times the IRC bot (re)joined its channels.
    pub irc_joins: Counter,
    /// Lines heard in bridged IRC channels.
    pub irc_lines_heard: Counter,
    /// Lines queued for LATSSIAM subscribers (in digests).
    pub irc_lines_queued: Counter,
    /// Digests queued (each one job per subscriber).
    pub irc_digests_queued: Counter,
    /// From arrival at the gateway to delivery.
    pub end_to_end: Histogram,
    queue_jobs: Family<QueueState, Gauge>,
    auth: Family<AuthOutcome, Counter>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let mut counter = |name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let smtp_accepted = counter("latssiam_bridge_smtp_accepted", "Messages accepted over SMTP");
        let smtp_refused = counter("latssiam_bridge_smtp_refused", "Messages refused over SMTP after DATA");
        let accept_round_trips = counter("latssiam_bridge_accept_round_trips", "ACCEPT round trips on the home server");
        let accept_taken = counter("latssiam_bridge_accept_taken", "Messages taken from the home server");
        let accept_refused = counter("latssiam_bridge_accept_refused", "Messages refused on the home server");
        let fragments_joined = counter("latssiam_bridge_fragment_sets_joined", "Fragment sets joined into one message");
        let fragments_refused = counter("latssiam_bridge_fragments_refused", "Fragments dropped by section 8's rules");
        let fragments_expired =
            counter("latssiam_bridge_fragment_sets_expired", "Incomplete fragment sets discarded after 24 hours");
        let irc_joins = counter("latssiam_bridge_irc_joins", "Times the IRC bot joined its channels");
        let irc_lines_heard = counter("latssiam_bridge_irc_lines_heard", "Lines heard in bridged IRC channels");
        let irc_lines_queued = counter("latssiam_bridge_irc_lines_queued", "IRC lines queued for subscribers");
        let irc_digests_queued = counter("latssiam_bridge_irc_digests_queued", "IRC digests queued");
        let deliveries = Family::<Delivery, Counter>::default();
        registry.register("latssiam_bridge_deliveries", "Delivery attempts by channel and result", deliveries.clone());
        let results = |channel| {
            let one = |result| deliveries.get_or_create(&Delivery { channel, result }).clone();
            Results { ok: one("ok"), deferred: one("deferred"), failed: one("failed") }
        };
        let (to_latssiam, to_smtp) = (results("latssiam"), results("smtp"));
        let end_to_end = prometheus_client::metrics::histogram::Histogram::new(BUCKETS);
        registry.register(
            "latssiam_bridge_end_to_end_seconds",
            "From arrival at the gateway to delivery",
            end_to_end.clone(),
        );
        let auth = Family::<AuthOutcome, Counter>::default();
        registry.register(
            "latssiam_bridge_inbound_auth",
            "Inbound SMTP messages by authentication outcome (SPF, DKIM, DMARC)",
            auth.clone(),
        );
        let queue_jobs = Family::<QueueState, Gauge>::default();
        registry.register("latssiam_bridge_queue_jobs", "Jobs in the queue by state", queue_jobs.clone());
        Self {
            smtp_accepted,
            smtp_refused,
            to_latssiam,
            to_smtp,
            accept_round_trips,
            accept_taken,
            accept_refused,
            fragments_joined,
            fragments_refused,
            fragments_expired,
            irc_joins,
            irc_lines_heard,
            irc_lines_queued,
            irc_digests_queued,
            end_to_end: Histogram(end_to_end),
            queue_jobs,
            auth,
            registry,
        }
    }
}

impl Metrics {
    /// The counter of one inbound authentication outcome.
    pub fn auth(&self, outcome: &'static str) -> Counter {
        self.auth.get_or_create(&AuthOutcome { outcome }).clone()
    }

    /// The exposition (OpenMetrics text, which Prometheus reads), with the
    /// queue's depth as it is now.
    pub fn render(&self, store: &Store) -> String {
        let depth = store.depth();
        for (state, n) in [("active", depth.active), ("deferred", depth.deferred), ("dead", depth.dead)] {
            self.queue_jobs.get_or_create(&QueueState { state }).set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "Cannot encode the metrics.");
        }
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
        // Within 3 s in all, so that a runtime's 5 s health timeout holds.
        match tokio::time::timeout(Duration::from_secs(2), self.store.probe()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("queue not writable: {e}")),
            Err(_) => return Err("queue not writable: no fsync within 2 s".into()),
        }
        match tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(self.home)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("home server {} unreachable: {e}", self.home)),
            Err(_) => Err(format!("home server {} unreachable: no answer within 1 s", self.home)),
        }
    }
}

impl Handler for Monitor {
    async fn get(&self, path: &str, _query: Option<&str>) -> Answer {
        match path {
            "/metrics" => Answer {
                status: StatusCode::OK,
                content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
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
