//! Load test of the IRC bridge: a real ngircd on loopback, one channel with
//! 100 subscribers (mailboxes on the gateway's embedded home server), and a
//! person posting 20 lines/s for DURATION seconds (default 60), run once with
//! `digest_window = 0` and once with `digest_window = 5`.
//!
//! Reports LATSSIAM messages delivered per second and p50/p99 from a line's
//! arrival at the gateway's queue to each subscriber's `31` (the gateway's
//! own histogram, interpolated as Prometheus' histogram_quantile does); with
//! a window, a line also waits in memory up to the window before it is
//! queued. Checks that every line was delivered to every subscriber and that
//! the bot never reconnected.
//!
//! `cargo bench --bench irc_load` (needs /usr/sbin/ngircd; env: DURATION, WINDOWS=0,5).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, get_metrics, histogram_quantile, metric, person, wait_for_gateway};
use latssiam_bridge::gateway::config::Settings;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const SUBSCRIBERS: usize = 100;
const LINES_PER_SECOND: u64 = 20;

async fn run_once(window: u64, duration: u64) {
    let dir = tempfile::tempdir().unwrap();
    let irc_port = free_port();
    let conf = dir.path().join("ngircd.conf");
    std::fs::write(
        &conf,
        format!(
            "[Global]\nName = irc.test\nInfo = bench\nListen = 127.0.0.1\nPorts = {irc_port}\n\
             [Limits]\nMaxConnectionsIP = 0\n[Options]\nDNS = no\nIdent = no\nPAM = no\nRequireAuthPing = no\n"
        ),
    )
    .unwrap();
    let mut ngircd = std::process::Command::new("/usr/sbin/ngircd")
        .args(["-n", "-f", conf.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("ngircd");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (smtp, http, home) = (free_port(), free_port(), free_port());
    let subscribers: Vec<String> = (0..SUBSCRIBERS).map(|i| format!("\"sub{i}@localhost\"")).collect();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\ndata_dir = \"{}\"\ndomains = [\"example.org\"]\n[home]\nhost = \"localhost\"\nlisten = \"127.0.0.1:{home}\"\n\
             register_password = \"sesame\"\nmax_unread_per_sender = 100000\n[smtp]\nlisten = \"127.0.0.1:{smtp}\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n[gemini]\nlisten = \"\"\n\
             [irc]\nserver = \"127.0.0.1\"\nport = {irc_port}\nnick = \"gwbot\"\n\
             [[irc.channels]]\nname = \"#load\"\nnetwork = \"irc.test\"\ndigest_window = {window}\nsubscribers = [{}]\n",
            dir.path().join("gw").display(),
            subscribers.join(", ")
        ),
    )
    .unwrap();
    let settings = Settings::load(Some(&config)).unwrap();
    let socket = settings.admin_socket();
    let shutdown = CancellationToken::new();
    let gateway = tokio::spawn(latssiam_bridge::gateway::run(settings, shutdown.clone()));
    wait_for_gateway(&socket).await;
    let home_addr = format!("127.0.0.1:{home}").parse().unwrap();
    for i in 0..SUBSCRIBERS {
        person(home_addr, &socket, &format!("sub{i}"), None, false).await;
    }

    // The bot must be in the channel before anyone speaks.
    while metric(&get_metrics(http).await, "latssiam_bridge_irc_joins_total") == 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A bystander in the channel counts what ngircd relays, to tell a line
    // lost before the bot from one lost by it.
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let stream = TcpStream::connect(("127.0.0.1", irc_port)).await.unwrap();
        let (read, mut write) = stream.into_split();
        write.write_all(b"NICK watcher\r\nUSER watcher 0 * :watcher\r\nJOIN #load\r\n").await.unwrap();
        let mut lines = BufReader::new(read).lines();
        let seen = Arc::clone(&seen);
        tokio::spawn(async move {
            let _keep = write;
            while let Ok(Some(l)) = lines.next_line().await {
                if l.contains(" PRIVMSG #load :line ") {
                    seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
    }
    // ngircd holds any one client to about one line a second (its PENALTY), so
    // the 20 lines/s come from 20 people each posting one line a second,
    // staggered by 50 ms: the channel (and the bot) sees 20 lines/s.
    for p in 0..LINES_PER_SECOND {
        let stream = TcpStream::connect(("127.0.0.1", irc_port)).await.unwrap();
        let (read, mut write) = stream.into_split();
        write
            .write_all(format!("NICK poster{p}\r\nUSER poster 0 * :poster\r\nJOIN #load\r\n").as_bytes())
            .await
            .unwrap();
        let mut lines = BufReader::new(read).lines();
        // Post only once in the channel (end of NAMES), then keep draining.
        while let Ok(Some(l)) = lines.next_line().await {
            if l.contains(" 366 ") {
                break;
            }
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50 * p)).await;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            for i in 0..duration {
                tick.tick().await;
                let line = format!("PRIVMSG #load :line {i} from poster {p}\r\n");
                if write.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
    }

    let sent = duration * LINES_PER_SECOND;
    let start = Instant::now();
    let mut delivered;
    let mut heard_all = None;
    let mut last_change = Instant::now();
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let m = get_metrics(http).await;
        delivered = metric(&m, "latssiam_bridge_deliveries_total{channel=\"latssiam\",result=\"ok\"}");
        if delivered != last {
            last = delivered;
            last_change = Instant::now();
        }
        let queued = metric(&m, "latssiam_bridge_irc_lines_queued_total");
        if heard_all.is_none() && metric(&m, "latssiam_bridge_irc_lines_heard_total") >= sent {
            heard_all = Some(start.elapsed());
        }
        let expected = metric(&m, "latssiam_bridge_irc_digests_queued_total") * SUBSCRIBERS as u64;
        if queued >= sent && delivered >= expected {
            break;
        }
        let all_heard = metric(&m, "latssiam_bridge_irc_lines_heard_total") >= sent;
        let late = start.elapsed() > Duration::from_secs(duration + 30 + window);
        if (all_heard || late) && last_change.elapsed() > Duration::from_secs(10) {
            println!("  (stopped waiting: no progress for 10 s)");
            break;
        }
    }
    let elapsed = last_change.duration_since(start).as_secs_f64();
    let m = get_metrics(http).await;
    let (heard, queued) =
        (metric(&m, "latssiam_bridge_irc_lines_heard_total"), metric(&m, "latssiam_bridge_irc_lines_queued_total"));
    let digests = metric(&m, "latssiam_bridge_irc_digests_queued_total");
    println!("digest_window = {window}: {sent} IRC lines at {LINES_PER_SECOND}/s to {SUBSCRIBERS} subscribers");
    println!("  a bystander in the channel saw {} lines", seen.load(std::sync::atomic::Ordering::Relaxed));
    println!(
        "  lines heard {heard}, queued {queued} in {digests} digests; {} of {} deliveries done; bot joined {} time(s)",
        delivered,
        digests * SUBSCRIBERS as u64,
        metric(&m, "latssiam_bridge_irc_joins_total")
    );
    println!(
        "  {delivered} LATSSIAM messages delivered with 31 ({:.0}/s over {elapsed:.1} s); queue->31 p50 {:.1} ms, p99 {:.1} ms",
        delivered as f64 / elapsed,
        histogram_quantile(&m, "latssiam_bridge_end_to_end_seconds", 0.5) * 1e3,
        histogram_quantile(&m, "latssiam_bridge_end_to_end_seconds", 0.99) * 1e3
    );
    let deferred = metric(&m, "latssiam_bridge_deliveries_total{channel=\"latssiam\",result=\"deferred\"}");
    let failed = metric(&m, "latssiam_bridge_deliveries_total{channel=\"latssiam\",result=\"failed\"}");
    println!(
        "  deferred {deferred}, failed {failed}; the bot heard the last line {:.1} s after posting began ({duration} s of posting)",
        heard_all.map_or(f64::NAN, |d| d.as_secs_f64())
    );
    shutdown.cancel();
    let _ = gateway.await;
    let _ = ngircd.kill();
    let _ = ngircd.wait();
}

fn main() {
    let duration: u64 = std::env::var("DURATION").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let windows = std::env::var("WINDOWS").unwrap_or_else(|_| "0,5".into());
        for w in windows.split(',').filter_map(|w| w.trim().parse().ok()) {
            run_once(w, duration).await;
        }
    });
}
