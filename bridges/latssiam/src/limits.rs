//! What one client may hold of a listener, shared by the LATSSIAM server,
//! the Gemini capsule and the gateway's HTTP listeners: connections at once
//! per client address (IPv4 as is, IPv6 by its /64, which one host usually
//! has whole), and per IPv6 /48 (a site: a home or an office gets a /48 or a
//! /56, so one site cannot fill a listener with many /64s); refusal logs
//! that a flood cannot turn into a flood of log lines; and the growing
//! delay before a wrong password is answered.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How many clients' worth one IPv6 /48 may hold: 4 times one address's.
pub const SITE_FACTOR: usize = 4;

/// The key a client address is counted under: IPv4 as is (also when mapped
/// into IPv6), IPv6 by its /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    prefix(ip, 64)
}

/// The site a client address belongs to: its IPv6 /48; `None` for IPv4.
pub fn site_key(ip: IpAddr) -> Option<IpAddr> {
    match prefix(ip, 48) {
        v6 @ IpAddr::V6(_) => Some(v6),
        IpAddr::V4(_) => None,
    }
}

fn prefix(ip: IpAddr, bits: u32) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << (128 - bits)) - 1))),
        },
        v4 => v4,
    }
}

/// A table key: a client's or a site's prefix, with its length, so that a
/// /64 whose last 16 bits are zero is not the same key as its /48.
type Key = (IpAddr, u8);

/// The keys `ip` is counted under, each with how many clients' worth it
/// holds: its client key, and for IPv6 its site.
fn counted_keys(ip: IpAddr) -> Vec<(Key, usize)> {
    let mut keys = vec![((client_key(ip), 64), 1)];
    if let Some(site) = site_key(ip) {
        keys.push(((site, 48), SITE_FACTOR));
    }
    keys
}

/// Connections at once, per client key and per site.
#[derive(Default)]
pub struct PerClient(Mutex<HashMap<Key, usize>>);

/// One connection counted against its client (and site), given back when dropped.
pub struct ClientSlot {
    table: Arc<PerClient>,
    keys: Vec<Key>,
}

impl PerClient {
    /// Counts a connection from `ip`, or `None` if its address already has
    /// `max` or its site `max * SITE_FACTOR` (`max` 0: no limit).
    pub fn admit(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<ClientSlot> {
        if max == 0 {
            return Some(ClientSlot { table: Arc::clone(self), keys: Vec::new() });
        }
        let keys = counted_keys(ip);
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if keys.iter().any(|(k, factor)| map.get(k).copied().unwrap_or(0) >= max.saturating_mul(*factor)) {
            return None;
        }
        for (k, _) in &keys {
            *map.entry(*k).or_insert(0) += 1;
        }
        Some(ClientSlot { table: Arc::clone(self), keys: keys.into_iter().map(|(k, _)| k).collect() })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut map = self.table.0.lock().unwrap_or_else(PoisonError::into_inner);
        for k in &self.keys {
            if let Some(n) = map.get_mut(k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(k);
                }
            }
        }
    }
}

/// A token-bucket rate: a sustained rate and a burst.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_second: f64,
    /// Most tokens held.
    pub burst: f64,
}

/// Token buckets by key (a client, a site, a certificate), bounded at
/// [`Buckets::MAX_KEYS`]: when it is reached, the full buckets are forgotten
/// (they hold nothing a new bucket would not), and if that leaves more than
/// three quarters of the bound, the least recently used down to that. A
/// client forgotten that way gets a new, full bucket: under a flood of new
/// keys the limit leaks for the oldest clients rather than the table
/// growing or everyone new being refused. Each pruning frees at least a
/// quarter of the table, so its cost is spread over as many new keys.
pub struct Buckets<K> {
    map: Mutex<HashMap<K, Bucket>>,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
    rate: Rate,
}

impl Bucket {
    fn level(&self, now: Instant) -> f64 {
        (self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * self.rate.per_second).min(self.rate.burst)
    }
}

impl<K> Default for Buckets<K> {
    fn default() -> Self {
        Self { map: Mutex::default() }
    }
}

impl<K: std::hash::Hash + Eq + Copy> Buckets<K> {
    /// The most keys the table holds.
    pub const MAX_KEYS: usize = 100_000;

    /// Takes a token from each of `keys`, each at its rate; false (taking
    /// none) when any of them has none left.
    pub fn take(&self, keys: &[(K, Rate)]) -> bool {
        self.level_at(keys, true, Instant::now())
    }

    /// Whether each of `keys` has a token left, taking nothing.
    pub fn available(&self, keys: &[(K, Rate)]) -> bool {
        self.level_at(keys, false, Instant::now())
    }

    fn level_at(&self, keys: &[(K, Rate)], take: bool, now: Instant) -> bool {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let mut level = Vec::with_capacity(keys.len());
        for &(key, rate) in keys {
            let bucket = map.get(&key).copied().unwrap_or(Bucket { tokens: rate.burst, at: now, rate });
            let tokens = Bucket { rate, ..bucket }.level(now);
            if tokens < 1.0 {
                return false;
            }
            level.push((key, Bucket { tokens: tokens - 1.0, at: now, rate }));
        }
        if take {
            if map.len() + level.len() > Self::MAX_KEYS {
                Self::prune(&mut map, now, &level);
            }
            map.extend(level);
        }
        true
    }

    /// Makes room in a full table, never forgetting one of `keep`.
    fn prune(map: &mut HashMap<K, Bucket>, now: Instant, keep: &[(K, Bucket)]) {
        let kept = |key: &K| keep.iter().any(|(k, _)| k == key);
        map.retain(|key, bucket| kept(key) || bucket.level(now) < bucket.rate.burst);
        let target = Self::MAX_KEYS / 4 * 3;
        if map.len() <= target {
            return;
        }
        let mut ages: Vec<(Instant, K)> = map.iter().filter(|(k, _)| !kept(k)).map(|(k, b)| (b.at, *k)).collect();
        let excess = (map.len() - target).min(ages.len());
        if excess < ages.len() {
            ages.select_nth_unstable_by_key(excess, |(at, _)| *at);
        }
        for (_, key) in &ages[..excess] {
            map.remove(key);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// Look-ups per client and minute (WebFinger, the Gemini capsule): a
/// token bucket per client key (IPv4 address, IPv6 /64) and per IPv6 /48
/// site ([`SITE_FACTOR`] times as many), so that answering "is there such a
/// person?" cannot be asked thousands of times a second by one client. The
/// table is bounded as [`Buckets`] are.
pub struct Lookups {
    per_minute: f64,
    buckets: Buckets<Key>,
}

impl Lookups {
    /// `per_minute` look-ups per client (0: no limit), that many at once.
    pub fn new(per_minute: u32) -> Self {
        Self { per_minute: f64::from(per_minute), buckets: Buckets::default() }
    }

    /// Takes a look-up for `ip`; false when its client or its site has none left.
    pub fn allow(&self, ip: IpAddr) -> bool {
        self.level_at(ip, true, Instant::now())
    }

    /// Whether `ip`'s client and site have one left, taking nothing (for a
    /// limit counted only on failures but checked before every try).
    pub fn available(&self, ip: IpAddr) -> bool {
        self.level_at(ip, false, Instant::now())
    }

    fn level_at(&self, ip: IpAddr, take: bool, now: Instant) -> bool {
        if self.per_minute <= 0.0 {
            return true;
        }
        let keys: Vec<(Key, Rate)> = counted_keys(ip)
            .into_iter()
            .map(|(key, factor)| {
                let burst = self.per_minute * factor as f64;
                (key, Rate { per_second: burst / 60.0, burst })
            })
            .collect();
        self.buckets.level_at(&keys, take, now)
    }
}

/// Lets one refusal log line through per second: a flood of refused
/// connections costs one line a second, which says how many it stands for.
#[derive(Default)]
pub struct LogThrottle {
    last_second: AtomicU64,
    suppressed: AtomicU64,
}

impl LogThrottle {
    /// `Some(n)` if this refusal is to be logged, `n` being how many were
    /// not logged since the last line; `None` to stay quiet.
    pub fn admit(&self) -> Option<u64> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let last = self.last_second.load(Ordering::Relaxed);
        if now != last && self.last_second.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Wrong passwords in the last minute, from everyone: each adds to the
/// delay before the next wrong one is answered (the IMAP bridge's and
/// submission's logins, the LATSSIAM server's `MAILBOX REGISTER`). The
/// delays of concurrent connections overlap, so this slows guessing on one
/// connection; a limit per client address has to bound the rest.
pub struct FailureDelay {
    failures: Mutex<(Instant, u32)>,
    /// Every failure since start (for tests and metrics).
    pub total: AtomicU32,
}

impl Default for FailureDelay {
    fn default() -> Self {
        FailureDelay { failures: Mutex::new((Instant::now(), 0)), total: AtomicU32::new(0) }
    }
}

impl FailureDelay {
    /// Counts a failure; the delay before answering it: 1 s doubled for
    /// each failure in the last minute, at most 16 s.
    pub fn failed(&self) -> Duration {
        self.total.fetch_add(1, Ordering::Relaxed);
        let mut g = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        if g.0.elapsed() > Duration::from_secs(60) {
            *g = (Instant::now(), 0);
        }
        g.1 = g.1.saturating_add(1);
        Duration::from_secs(1 << g.1.min(5).saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn look_ups_are_bounded_per_client_and_per_site() {
        let l = Lookups::new(5);
        assert!((0..5).all(|_| l.allow(ip("192.0.2.1"))));
        assert!(!l.allow(ip("192.0.2.1")));
        assert!(l.allow(ip("192.0.2.2")), "another address");
        // One /64 is one client; one /48 holds four clients' worth.
        assert!((0..5).all(|_| l.allow(ip("2001:db8:1:1::1"))));
        assert!(!l.allow(ip("2001:db8:1:1::2")));
        let site: usize = (2..10).map(|i| (0..5).filter(|_| l.allow(ip(&format!("2001:db8:1:{i}::1")))).count()).sum();
        assert_eq!(site, 15, "20 per site, 5 of them taken");
        assert!(Lookups::new(0).allow(ip("192.0.2.1")));
    }

    /// `n` distinct IPv4 clients, from 10.0.0.0 up.
    fn clients(n: u32) -> impl Iterator<Item = IpAddr> {
        (0..n).map(|i| IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)))
    }

    #[test]
    fn a_full_look_up_table_forgets_full_buckets_first_and_keeps_the_refusals() {
        let l = Lookups::new(2);
        let t0 = Instant::now();
        let max = u32::try_from(Buckets::<Key>::MAX_KEYS).unwrap_or(u32::MAX);
        assert!(clients(max - 1).all(|ip| l.level_at(ip, true, t0)));
        assert_eq!(l.buckets.len(), Buckets::<Key>::MAX_KEYS - 1);
        // A minute later every one of those buckets is full again. The
        // client that takes its two now fills the table and prunes it.
        let later = t0 + Duration::from_secs(61);
        let greedy = ip("192.0.2.1");
        assert!(l.level_at(greedy, true, later));
        assert!(l.level_at(greedy, true, later));
        assert_eq!(l.buckets.len(), 1, "the full buckets are gone, the one in use is kept");
        assert!(!l.level_at(greedy, true, later), "and it is still refused");
        assert!(!l.level_at(greedy, false, later));
    }

    #[test]
    fn a_look_up_table_of_busy_clients_forgets_the_least_recent_and_stays_bounded() {
        let l = Lookups::new(2);
        let t0 = Instant::now();
        let max = u32::try_from(Buckets::<Key>::MAX_KEYS).unwrap_or(u32::MAX);
        assert!(clients(max).all(|ip| l.level_at(ip, true, t0)));
        // Ten seconds on, none of them is full (1 + 2 * 10 / 60 < 2). A
        // client spends its two, then new clients keep coming.
        let t1 = t0 + Duration::from_secs(10);
        let greedy = ip("2001:db8:1::1");
        assert!(l.level_at(greedy, true, t1) && l.level_at(greedy, true, t1));
        assert_eq!(l.buckets.len(), Buckets::<Key>::MAX_KEYS / 4 * 3 + 2, "pruned to three quarters, the newest kept");
        // Two more prunings: they take the oldest, from the first hundred thousand.
        let newcomers = (0..60_000).map(|i| IpAddr::V4(std::net::Ipv4Addr::from(0x6400_0000 + i)));
        for ip in newcomers {
            assert!(l.level_at(ip, true, t1), "a new client is never turned away by the bound");
            assert!(l.buckets.len() <= Buckets::<Key>::MAX_KEYS);
        }
        assert!(!l.level_at(greedy, true, t1), "the most recent refusal outlived the pruning");
    }

    #[test]
    fn a_sites_zero_64_is_counted_apart_from_the_site() {
        // 2001:db8:1::/64 and 2001:db8:1::/48 have the same address; the
        // client still has its own share and the site its four.
        let t = Arc::new(PerClient::default());
        let held: Vec<_> = (0..2).filter_map(|_| t.admit(ip("2001:db8:1::1"), 2)).collect();
        assert_eq!(held.len(), 2);
        let others: Vec<_> = (1..10).filter_map(|i| t.admit(ip(&format!("2001:db8:1:{i}::1")), 2)).collect();
        assert_eq!(others.len(), 6, "8 per site, 2 of them held by the zero /64");
        let l = Lookups::new(1);
        assert!(l.allow(ip("2001:db8:1::1")));
        assert!(l.allow(ip("2001:db8:1:1::1")), "the zero /64's look-up is not the site's");
    }

    #[test]
    fn one_address_and_one_site_hold_their_share() {
        let t = Arc::new(PerClient::default());
        let held: Vec<_> = (0..2).filter_map(|_| t.admit(ip("192.0.2.1"), 2)).collect();
        assert_eq!(held.len(), 2);
        assert!(t.admit(ip("192.0.2.1"), 2).is_none());
        assert!(t.admit(ip("192.0.2.2"), 2).is_some(), "another address");
        // One /64 holds 2; one /48 holds 8, whatever /64s it uses.
        let site: Vec<_> = (0..20).filter_map(|i| t.admit(ip(&format!("2001:db8:1:{i:x}::1")), 2)).collect();
        assert_eq!(site.len(), 8);
        assert!(t.admit(ip("2001:db8:2::1"), 2).is_some(), "another site");
        drop(site);
        assert!(t.admit(ip("2001:db8:1:ff::1"), 2).is_some(), "given back");
        assert_eq!(client_key(ip("::ffff:192.0.2.9")), ip("192.0.2.9"));
    }

    #[test]
    fn refusal_logs_are_one_a_second() {
        let t = LogThrottle::default();
        assert_eq!(t.admit(), Some(0));
        assert!((0..100).all(|_| t.admit().is_none()));
    }
}
