//! Bounds on what one client can make the gateway do or store, before it is authenticated.
//!
//! - [`RateLimiter`]: a token bucket per [`Source`] (an IPv4 address, an IPv6 /64), checked
//!   before authentication. Its table is bounded: buckets that have refilled are forgotten, and
//!   when the table is still full a source it does not track yet is refused (fail closed).
//! - [`RefusalLog`]: anonymous refusals (no principal) per source and interval: the first is
//!   audited as it happens (so an attack shows at once, with its code), the rest are counted and
//!   reported as one [`RefusalSummary`] when the interval ends: at most two audit entries per
//!   source and interval. Its table is bounded too: past it, refusals count under
//!   [`Source::Other`].
//!
//! Both are plain state machines: the caller passes `now_ms` and does the IO.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

/// Where a request comes from, as far as the limits are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Source {
    /// An IPv4 address, or an IPv6 address with its last 64 bits cleared (one host usually
    /// holds a whole /64, so a finer key would let it take as many buckets as it likes).
    Ip(IpAddr),
    /// No connection information (in-process callers).
    Unknown,
    /// Sources the refusal table had no room for, counted together.
    Other,
}

impl Source {
    pub(super) fn from_ip(ip: IpAddr) -> Self {
        Source::Ip(source_ip(ip))
    }
}

/// The address that stands for `ip`'s source in every per-source limit: an IPv4 address, or an
/// IPv6 address with its last 64 bits cleared.
pub(crate) fn source_ip(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Source::Ip(IpAddr::V6(ip)) => write!(f, "{ip}/64"),
            Source::Unknown => f.write_str("unknown"),
            Source::Other => f.write_str("other"),
        }
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub(super) fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

/// Why a request was refused by the rate limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Limited {
    /// The source is over its rate; try again after this many seconds.
    OverRate { retry_after_s: u64 },
    /// The table of sources is full and this one is not in it.
    TableFull,
}

/// Per-source token buckets.
#[derive(Debug)]
pub(super) struct RateLimiter {
    per_ms: f64,
    burst: f64,
    max_sources: usize,
    buckets: HashMap<Source, Bucket>,
    last_prune_ms: Option<u64>,
}

/// A full table is scanned for refilled buckets at most this often.
const PRUNE_EVERY_MS: u64 = 250;

impl RateLimiter {
    pub(super) fn new(per_second: u32, burst: u32, max_sources: usize) -> Self {
        Self {
            per_ms: f64::from(per_second.max(1)) / 1000.0,
            burst: f64::from(burst.max(1)),
            max_sources: max_sources.max(1),
            buckets: HashMap::new(),
            last_prune_ms: None,
        }
    }

    /// Take one token of `source`'s bucket, or say why not.
    pub(super) fn check(&mut self, source: Source, now_ms: u64) -> Result<(), Limited> {
        let (per_ms, burst) = (self.per_ms, self.burst);
        if !self.buckets.contains_key(&source) && self.buckets.len() >= self.max_sources {
            self.prune(now_ms);
            if self.buckets.len() >= self.max_sources {
                return Err(Limited::TableFull);
            }
        }
        let b = self.buckets.entry(source).or_insert(Bucket {
            tokens: burst,
            at_ms: now_ms,
        });
        let elapsed = now_ms.saturating_sub(b.at_ms);
        b.tokens = (b.tokens + elapsed as f64 * per_ms).min(burst);
        b.at_ms = b.at_ms.max(now_ms);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            let wait_ms = (1.0 - b.tokens) / per_ms;
            Err(Limited::OverRate {
                retry_after_s: ((wait_ms / 1000.0).ceil() as u64).max(1),
            })
        }
    }

    /// Forget buckets that have refilled: a new bucket would be the same.
    fn prune(&mut self, now_ms: u64) {
        if self
            .last_prune_ms
            .is_some_and(|t| now_ms.saturating_sub(t) < PRUNE_EVERY_MS)
        {
            return;
        }
        self.last_prune_ms = Some(now_ms);
        let (per_ms, burst) = (self.per_ms, self.burst);
        self.buckets
            .retain(|_, b| b.tokens + now_ms.saturating_sub(b.at_ms) as f64 * per_ms < burst);
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

/// Anonymous refusals of one source over one interval, after the first (audited on its own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RefusalSummary {
    pub source: Source,
    pub since_ms: u64,
    /// Refusals after the interval's first.
    pub count: u64,
    /// Count per status.
    pub statuses: BTreeMap<u16, u64>,
    /// Status, code and resource (clipped) of the last refusal.
    pub last_status: u16,
    pub last_code: Option<&'static str>,
    pub last_resource: String,
}

/// Most distinct statuses counted per source (there are few; this only bounds the map).
const MAX_STATUSES: usize = 16;

/// Counts of anonymous refusals per source, reported once per interval.
#[derive(Debug)]
pub(super) struct RefusalLog {
    interval_ms: u64,
    max_sources: usize,
    resource_max: usize,
    pending: HashMap<Source, RefusalSummary>,
}

impl RefusalLog {
    pub(super) fn new(interval_ms: u64, max_sources: usize, resource_max: usize) -> Self {
        Self {
            interval_ms: interval_ms.max(1),
            max_sources: max_sources.max(1),
            resource_max,
            pending: HashMap::new(),
        }
    }

    /// Note one refusal. True when it opens its source's interval: the caller audits that one
    /// itself; the later ones are counted into the summary.
    pub(super) fn record(
        &mut self,
        source: Source,
        status: u16,
        code: Option<&'static str>,
        resource: &str,
        now_ms: u64,
    ) -> bool {
        let source = if self.pending.contains_key(&source) || self.pending.len() < self.max_sources
        {
            source
        } else {
            Source::Other
        };
        let Some(s) = self.pending.get_mut(&source) else {
            self.pending.insert(
                source,
                RefusalSummary {
                    source,
                    since_ms: now_ms,
                    count: 0,
                    statuses: BTreeMap::new(),
                    last_status: status,
                    last_code: code,
                    last_resource: String::new(),
                },
            );
            return true;
        };
        s.count = s.count.saturating_add(1);
        if s.statuses.contains_key(&status) || s.statuses.len() < MAX_STATUSES {
            let n = s.statuses.entry(status).or_default();
            *n = n.saturating_add(1);
        }
        s.last_status = status;
        s.last_code = code;
        s.last_resource.clear();
        s.last_resource.push_str(clip(resource, self.resource_max));
        false
    }

    /// Take the summaries whose interval is over and that counted refusals beyond the first.
    /// The interval of every due source ends: its next refusal is audited again.
    pub(super) fn due(&mut self, now_ms: u64) -> Vec<RefusalSummary> {
        let interval = self.interval_ms;
        let due: Vec<Source> = self
            .pending
            .iter()
            .filter(|(_, s)| now_ms.saturating_sub(s.since_ms) >= interval)
            .map(|(k, _)| *k)
            .collect();
        due.iter()
            .filter_map(|k| self.pending.remove(k))
            .filter(|s| s.count > 0)
            .collect()
    }

    /// Take every summary that counted refusals beyond the first (at shutdown, or when the
    /// audit is flushed); every interval ends.
    pub(super) fn drain(&mut self) -> Vec<RefusalSummary> {
        self.pending
            .drain()
            .map(|(_, s)| s)
            .filter(|s| s.count > 0)
            .collect()
    }
}

impl RefusalSummary {
    /// The audit entry's resource: source, count, counts per status and the last path, within
    /// `max` bytes.
    pub(super) fn resource(&self, max: usize) -> String {
        let statuses = self
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}:{n}"))
            .collect::<Vec<_>>()
            .join(",");
        let text = format!(
            "source={} count={} statuses={statuses} last={}",
            self.source, self.count, self.last_resource
        );
        clip(&text, max).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Source {
        Source::from_ip(s.parse().expect("ip"))
    }

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_slash_64s() {
        assert_eq!(ip("2001:db8::1"), ip("2001:db8::ffff:1"));
        assert_ne!(ip("2001:db8::1"), ip("2001:db8:0:1::1"));
        assert_eq!(ip("::ffff:10.0.0.1"), ip("10.0.0.1"));
        assert_eq!(ip("2001:db8::1").to_string(), "2001:db8::/64");
        assert_eq!(ip("127.0.0.1").to_string(), "127.0.0.1");
    }

    #[test]
    fn clip_keeps_char_boundaries() {
        assert_eq!(clip("abc", 10), "abc");
        assert_eq!(clip("abcdef", 3), "abc");
        assert_eq!(clip("aé", 2), "a");
        assert_eq!(clip("ééé", 5), "éé");
    }

    #[test]
    fn bucket_allows_burst_then_rate() {
        let mut r = RateLimiter::new(10, 5, 100);
        let a = ip("10.0.0.1");
        for _ in 0..5 {
            assert_eq!(r.check(a, 1000), Ok(()));
        }
        assert_eq!(
            r.check(a, 1000),
            Err(Limited::OverRate { retry_after_s: 1 })
        );
        // Another source has its own bucket.
        assert_eq!(r.check(ip("10.0.0.2"), 1000), Ok(()));
        // 100 ms at 10/s is one token.
        assert_eq!(r.check(a, 1100), Ok(()));
        assert!(r.check(a, 1100).is_err());
        // A clock that goes back neither panics nor refills.
        assert!(r.check(a, 500).is_err());
    }

    #[test]
    fn full_table_refuses_new_sources_until_buckets_refill() {
        let mut r = RateLimiter::new(10, 2, 3);
        for i in 0..3 {
            assert_eq!(r.check(ip(&format!("10.0.0.{i}")), 0), Ok(()));
        }
        assert_eq!(r.check(ip("10.0.1.1"), 0), Err(Limited::TableFull));
        // Known sources still get their rate.
        assert_eq!(r.check(ip("10.0.0.1"), 0), Ok(()));
        // After the buckets refilled (and the prune pause), they are forgotten.
        assert_eq!(r.check(ip("10.0.1.1"), 1000), Ok(()));
        assert!(r.tracked() <= 3);
        // Many distinct sources never grow the table past its bound.
        for i in 0..1000u32 {
            let _ = r.check(Source::from_ip(IpAddr::from(i.to_be_bytes())), 1000);
        }
        assert!(r.tracked() <= 3);
    }

    #[test]
    fn refusals_are_summed_per_source_and_interval() {
        let mut l = RefusalLog::new(1000, 2, 8);
        let path = "/v1/aaaaaaaaaaaa";
        let firsts = (0..51)
            .filter(|&i| l.record(ip("10.0.0.1"), 401, Some("unauthenticated"), path, i))
            .count();
        assert_eq!(firsts, 1, "only the first opens the interval");
        assert!(!l.record(ip("10.0.0.1"), 404, Some("not_found"), "/x", 60));
        for i in 0..101 {
            let src = ip(&format!("10.1.0.{}", i % 250));
            l.record(src, 401, Some("unauthenticated"), "/", 70);
        }
        assert!(l.due(999).is_empty(), "interval not over");
        let mut due = l.due(1000);
        assert_eq!(due.len(), 1);
        let s = due.remove(0);
        assert_eq!(
            (s.count, s.last_status, s.last_resource.as_str()),
            (51, 404, "/x")
        );
        assert_eq!(s.statuses.get(&401), Some(&50));
        assert_eq!(
            s.resource(200),
            "source=10.0.0.1 count=51 statuses=401:50,404:1 last=/x"
        );
        // The table holds two sources; the rest were counted under `other` (its first too).
        let rest = l.drain();
        assert_eq!(rest.len(), 1);
        assert_eq!((rest[0].source, rest[0].count), (Source::Other, 99));
        assert!(l.drain().is_empty());
        // A new interval: its first refusal is audited again.
        assert!(l.record(ip("10.0.0.1"), 401, None, "/", 2000));
    }
}
