//! One suite, every backend: the job queue's contract (`JobQueue`), run
//! against the sled queue in a node's own database and against JetStream on
//! a real `nats-server`. Everything above the trait (the SMTP sink, the
//! worker, the poller, the IRC bot) relies on exactly these answers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use latssiam_bridge::gateway::config::Settings;
use latssiam_bridge::gateway::db::Store;
use latssiam_bridge::gateway::outbox::IrcPost;
use latssiam_bridge::gateway::queue::{
    jetstream, now_ms, sled::SledQueue, Claimed, DigestJob, Job, JobId, JobQueue, Origin, Target,
};

const LIMIT: Duration = Duration::from_secs(30);

fn smtp(rcpt: &str) -> Target {
    Target::Smtp { rcpt: rcpt.into() }
}

fn post(text: &str) -> IrcPost {
    IrcPost {
        target: "#chat".into(),
        lines: vec![text.into()],
        more: None,
        parents: Vec::new(),
        quoted: Vec::new(),
        message_id: None,
        name: "alice".into(),
    }
}

/// Claims until some job comes (the queue's own `wait` between claims).
async fn claim_some(q: &dyn JobQueue) -> Vec<(JobId, Job)> {
    let start = Instant::now();
    loop {
        let (jobs, next): Claimed = q.claim(16).await.unwrap();
        if !jobs.is_empty() {
            return jobs;
        }
        assert!(start.elapsed() < LIMIT, "no job came within {LIMIT:?}");
        tokio::time::timeout(Duration::from_secs(5), q.wait(next)).await.ok();
    }
}

/// Takes the next IRC post, waiting for one.
async fn next_post(q: &dyn JobQueue) -> (Box<dyn latssiam_bridge::gateway::queue::PostTicket>, IrcPost) {
    let start = Instant::now();
    loop {
        if let Some(p) = q.next_post().await.unwrap() {
            return p;
        }
        assert!(start.elapsed() < LIMIT, "no post came within {LIMIT:?}");
    }
}

/// The contract. `store` is the node's own database (the IRC window lives there).
async fn contract(q: Arc<dyn JobQueue>, store: &Store, shared: bool) {
    assert_eq!(q.shared(), shared);

    // Ids are fresh and non-zero.
    let id = q.new_message_id().unwrap();
    assert_ne!(id, 0);
    assert_ne!(q.new_message_id().unwrap(), id);

    // One message, two recipients, one IRC post: enqueued together.
    let body = b"From: a@client.test\r\nSubject: contract\r\n\r\nhello\r\n".to_vec();
    let origin = Origin::Smtp { from: "a@client.test".into() };
    q.enqueue_with_posts(id, &body, vec![smtp("x@mail.test"), smtp("y@mail.test")], &origin, &[post("first")])
        .await
        .unwrap();

    // A claim hands out both jobs, fresh, with their message.
    let mut jobs = claim_some(&*q).await;
    if jobs.len() < 2 {
        jobs.extend(claim_some(&*q).await);
    }
    jobs.sort_by_key(|(jid, _)| *jid);
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    let (x, y) = (jobs[0].clone(), jobs[1].clone());
    assert_eq!((x.0.message, x.0.index, y.0.message, y.0.index), (id, 0, id, 1));
    assert_eq!((x.1.target.clone(), y.1.target.clone()), (smtp("x@mail.test"), smtp("y@mail.test")));
    assert_eq!((x.1.origin.clone(), x.1.attempts, x.1.message), (origin.clone(), 0, id));
    assert_eq!(q.body(x.0).unwrap().as_deref(), Some(&body[..]));
    assert_eq!(q.body_size(x.0), Some(body.len()));
    assert!(q.pending(x.0) && q.pending(y.0));

    // Done: no longer pending, and the other job still has its message.
    q.complete(x.0).await.unwrap();
    assert!(!q.pending(x.0));
    assert_eq!(q.body(y.0).unwrap().as_deref(), Some(&body[..]));

    // Deferred: not handed out before it is due, then again with what the worker recorded.
    let mut later = y.1.clone();
    later.attempts = 1;
    later.due_ms = now_ms() + 1500;
    later.last_error = Some("451 try later".into());
    let deferred_at = Instant::now();
    q.defer(y.0, &later).await.unwrap();
    let (early, next) = q.claim(16).await.unwrap();
    assert!(early.iter().all(|(jid, _)| *jid != y.0), "handed out before it was due: {early:?}");
    // When to look again: when it falls due (sled), or at once, as the claim itself waits (JetStream).
    assert_eq!(next, Some(if shared { 0 } else { later.due_ms }));
    let again = claim_some(&*q).await;
    assert!(deferred_at.elapsed() >= Duration::from_millis(1000), "came back after {:?}", deferred_at.elapsed());
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0].0, y.0);
    assert_eq!((again[0].1.attempts, again[0].1.last_error.as_deref()), (1, Some("451 try later")));

    // Dead: the job goes, and the failure report is queued under a new id, from the gateway.
    let report = b"Subject: Undelivered Mail\r\n\r\nsorry\r\n".to_vec();
    let rid = q.kill(y.0, &again[0].1, Some((report.clone(), smtp("a@client.test")))).await.unwrap().unwrap();
    assert_ne!(rid, id);
    assert!(!q.pending(y.0));
    let bounce = claim_some(&*q).await;
    assert_eq!(bounce.len(), 1, "{bounce:?}");
    assert_eq!(
        (bounce[0].0.message, &bounce[0].1.target, &bounce[0].1.origin),
        (rid, &smtp("a@client.test"), &Origin::Gateway)
    );
    assert_eq!(q.body(bounce[0].0).unwrap().as_deref(), Some(&report[..]));
    q.complete(bounce[0].0).await.unwrap();

    // A digest is queued like a message from the gateway.
    let did = q.new_message_id().unwrap();
    let digest =
        DigestJob { id: did, body: b"Subject: digest\r\n\r\n3 lines\r\n".to_vec(), targets: vec![smtp("z@mail.test")] };
    q.enqueue_digests(store, &[], std::slice::from_ref(&digest)).await.unwrap();
    let got = claim_some(&*q).await;
    assert_eq!((got.len(), got[0].0.message, &got[0].1.origin), (1, did, &Origin::Gateway));
    q.complete(got[0].0).await.unwrap();

    // The IRC post: one not posted comes again; one posted does not.
    let (ticket, first) = next_post(&*q).await;
    assert_eq!(first.lines, vec!["first".to_owned()]);
    ticket.alive().await;
    ticket.done(false).await.unwrap();
    let (ticket, again) = next_post(&*q).await;
    assert_eq!(again, first);
    ticket.done(true).await.unwrap();
    assert!(q.next_post().await.unwrap().is_none(), "a posted post came again");

    // Nothing else is left to claim.
    let (rest, _) = q.claim(16).await.unwrap();
    assert!(rest.is_empty(), "{rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sled_queue_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("queue")).unwrap();
    let q: Arc<dyn JobQueue> = Arc::new(SledQueue::new(Arc::clone(&store)));
    contract(q, &store, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jetstream_queue_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let nats = common::nats::Nats::start(dir.path());
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\ndata_dir = \"{}\"\ndomains = [\"example.org\"]\n[queue]\nbackend = \"jetstream\"\nnats_url = \"{}\"\n",
            dir.path().join("node").display(),
            nats.url()
        ),
    )
    .unwrap();
    let settings = Settings::load(Some(&config)).unwrap();
    let store = Store::open(&dir.path().join("queue")).unwrap();
    let q: Arc<dyn JobQueue> = Arc::new(jetstream::connect(&settings).await.unwrap());
    contract(q, &store, true).await;
}
