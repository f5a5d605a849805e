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

/// Connections at once, per client key and per site.
#[derive(Default)]
pub struct PerClient(Mutex<HashMap<IpAddr, usize>>);

/// One connection counted against its client (and site), given back when dropped.
pub struct ClientSlot {
    table: Arc<PerClient>,
    keys: Vec<IpAddr>,
}

impl PerClient {
    /// Counts a connection from `ip`, or `None` if its address already has
    /// `max` or its site `max * SITE_FACTOR` (`max` 0: no limit).
    pub fn admit(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<ClientSlot> {
        let mut keys = vec![client_key(ip)];
        if max == 0 {
            return Some(ClientSlot { table: Arc::clone(self), keys: Vec::new() });
        }
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if map.get(&keys[0]).copied().unwrap_or(0) >= max {
            return None;
        }
        if let Some(site) = site_key(ip).filter(|s| *s != keys[0]) {
            if map.get(&site).copied().unwrap_or(0) >= max.saturating_mul(SITE_FACTOR) {
                return None;
            }
            keys.push(site);
        }
        for k in &keys {
            *map.entry(*k).or_insert(0) += 1;
        }
        Some(ClientSlot { table: Arc::clone(self), keys })
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

/// Look-ups per client and minute (WebFinger, the Gemini capsule): a
/// token bucket per client key (IPv4 address, IPv6 /64) and per IPv6 /48
/// site ([`SITE_FACTOR`] times as many), so that answering "is there such a
/// person?" cannot be asked thousands of times a second by one client. The
/// table is bounded: past 100,000 keys the full buckets are forgotten.
pub struct Lookups {
    per_minute: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, std::time::Instant)>>,
}

impl Lookups {
    /// `per_minute` look-ups per client (0: no limit), that many at once.
    pub fn new(per_minute: u32) -> Self {
        Self { per_minute: f64::from(per_minute), buckets: Mutex::default() }
    }

    /// Takes a look-up for `ip`; false when its client or its site has none left.
    pub fn allow(&self, ip: IpAddr) -> bool {
        self.level(ip, true)
    }

    /// Whether `ip`'s client and site have one left, taking nothing (for a
    /// limit counted only on failures but checked before every try).
    pub fn available(&self, ip: IpAddr) -> bool {
        self.level(ip, false)
    }

    fn level(&self, ip: IpAddr, take: bool) -> bool {
        if self.per_minute <= 0.0 {
            return true;
        }
        let now = std::time::Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= 100_000 {
            let full = |tokens: f64, at: std::time::Instant, burst: f64| {
                tokens + now.duration_since(at).as_secs_f64() * burst / 60.0 >= burst
            };
            let per_minute = self.per_minute;
            buckets.retain(|_, (tokens, at)| !full(*tokens, *at, per_minute));
        }
        let mut keys = vec![(client_key(ip), self.per_minute)];
        if let Some(site) = site_key(ip).filter(|s| *s != keys[0].0) {
            keys.push((site, self.per_minute * SITE_FACTOR as f64));
        }
        let mut level = Vec::with_capacity(keys.len());
        for &(key, burst) in &keys {
            let (tokens, at) = buckets.get(&key).copied().unwrap_or((burst, now));
            let tokens = (tokens + now.duration_since(at).as_secs_f64() * burst / 60.0).min(burst);
            if tokens < 1.0 {
                return false;
            }
            level.push((key, tokens));
        }
        if take {
            for (key, tokens) in level {
                buckets.insert(key, (tokens - 1.0, now));
            }
        }
        true
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

    #[test]
    fn look_ups_are_bounded_per_client_and_per_site() {
        let l = Lookups::new(5);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
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

    #[test]
    fn one_address_and_one_site_hold_their_share() {
        let t = Arc::new(PerClient::default());
        let ip = |s: &str| s.parse::<IpAddr>().unwrap_or_else(|e| panic!("{e}"));
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
