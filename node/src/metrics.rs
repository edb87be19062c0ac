//! Prometheus counters and histograms for the gateway, rendered as text.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use swarm_actors::tasks::{TaskApi, TaskStats};

const BUCKETS_MS: [f64; 10] = [
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0, 5000.0,
];

/// Most distinct route labels kept; later ones are counted as `other`. Routes come from the
/// router's own patterns, so this only guards against a mistake that would make them unbounded.
const MAX_ROUTES: usize = 128;

/// The method label: a standard method, else `other` (a method is any token the client likes).
pub fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

/// Gateway metrics. Every label comes from a fixed set, so the exposition stays bounded whatever
/// clients send.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    auth_failures: Mutex<BTreeMap<&'static str, u64>>,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    /// Requests refused by the per-source rate limit (429 before authentication).
    pub rate_limited: AtomicU64,
    /// Shared with the audit writer, which counts what it appends (and what it loses, below).
    pub audit_entries: std::sync::Arc<AtomicU64>,
    pub audit_failures: std::sync::Arc<AtomicU64>,
    pub in_flight: AtomicU64,
    /// The task service's queue and counters, read when the metrics are rendered.
    pub tasks: TaskGauges,
}

/// Where `/metrics` reads the task gauges from: the task service, when the node runs tasks.
#[derive(Clone, Default)]
pub struct TaskGauges(Option<Arc<dyn TaskApi>>);

impl TaskGauges {
    pub fn new(api: Option<Arc<dyn TaskApi>>) -> Self {
        Self(api)
    }
}

impl std::fmt::Debug for TaskGauges {
    // By hand: the task service is a trait object without `Debug`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("TaskGauges")
            .field(&self.0.is_some())
            .finish()
    }
}

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS_MS.len()],
    count: u64,
    sum_ms: f64,
}

impl Metrics {
    /// Count a request. `route` must be a pattern of the router (or `other`); the method is
    /// reduced to [`method_label`] here.
    pub fn observe_request(&self, method: &str, route: &str, status: u16, ms: f64) {
        let method = method_label(method);
        if let Ok(mut m) = self.requests.lock() {
            let mut key = (method, route.to_string(), status);
            if m.len() >= MAX_ROUTES * 16 && !m.contains_key(&key) {
                key.1 = "other".into();
            }
            *m.entry(key).or_default() += 1;
        }
        if let Ok(mut l) = self.latency.lock() {
            let route = if l.len() < MAX_ROUTES || l.contains_key(route) {
                route
            } else {
                "other"
            };
            let h = l.entry(route.to_string()).or_default();
            h.count += 1;
            h.sum_ms += ms;
            for (i, b) in BUCKETS_MS.iter().enumerate() {
                if ms <= *b {
                    h.counts[i] += 1;
                }
            }
        }
    }

    pub fn auth_failure(&self, code: &'static str) {
        if let Ok(mut m) = self.auth_failures.lock() {
            *m.entry(code).or_default() += 1;
        }
    }

    pub fn rejected(&self, class: &'static str) {
        if let Ok(mut m) = self.rejected.lock() {
            *m.entry(class).or_default() += 1;
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self, node: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP swarm_http_requests_total HTTP requests by route and status."
        );
        let _ = writeln!(out, "# TYPE swarm_http_requests_total counter");
        if let Ok(m) = self.requests.lock() {
            for ((method, route, status), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "swarm_http_requests_total{{node=\"{node}\",method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP swarm_http_request_duration_ms Request latency in milliseconds."
        );
        let _ = writeln!(out, "# TYPE swarm_http_request_duration_ms histogram");
        if let Ok(l) = self.latency.lock() {
            for (route, h) in l.iter() {
                for (i, b) in BUCKETS_MS.iter().enumerate() {
                    let _ = writeln!(
                        out,
                        "swarm_http_request_duration_ms_bucket{{node=\"{node}\",route=\"{route}\",le=\"{b}\"}} {}",
                        h.counts[i]
                    );
                }
                let _ = writeln!(
                    out,
                    "swarm_http_request_duration_ms_bucket{{node=\"{node}\",route=\"{route}\",le=\"+Inf\"}} {}",
                    h.count
                );
                let _ = writeln!(
                    out,
                    "swarm_http_request_duration_ms_sum{{node=\"{node}\",route=\"{route}\"}} {}",
                    h.sum_ms
                );
                let _ = writeln!(
                    out,
                    "swarm_http_request_duration_ms_count{{node=\"{node}\",route=\"{route}\"}} {}",
                    h.count
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP swarm_auth_failures_total Refused credentials by reason."
        );
        let _ = writeln!(out, "# TYPE swarm_auth_failures_total counter");
        if let Ok(m) = self.auth_failures.lock() {
            for (code, n) in m.iter() {
                let _ = writeln!(
                    out,
                    "swarm_auth_failures_total{{node=\"{node}\",code=\"{code}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP swarm_bulkhead_rejections_total Requests shed with 429 by class."
        );
        let _ = writeln!(out, "# TYPE swarm_bulkhead_rejections_total counter");
        if let Ok(m) = self.rejected.lock() {
            for (class, n) in m.iter() {
                let _ = writeln!(
                    out,
                    "swarm_bulkhead_rejections_total{{node=\"{node}\",class=\"{class}\"}} {n}"
                );
            }
        }
        for (name, help, v) in [
            (
                "swarm_audit_entries_total",
                "Audit entries appended.",
                &self.audit_entries,
            ),
            (
                "swarm_audit_failures_total",
                "Audit appends that failed.",
                &self.audit_failures,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(
                out,
                "{name}{{node=\"{node}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP swarm_http_rate_limited_total Requests refused by the per-source rate limit."
        );
        let _ = writeln!(out, "# TYPE swarm_http_rate_limited_total counter");
        let _ = writeln!(
            out,
            "swarm_http_rate_limited_total{{node=\"{node}\"}} {}",
            self.rate_limited.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# HELP swarm_http_in_flight Requests being served.");
        let _ = writeln!(out, "# TYPE swarm_http_in_flight gauge");
        let _ = writeln!(
            out,
            "swarm_http_in_flight{{node=\"{node}\"}} {}",
            self.in_flight.load(Ordering::Relaxed)
        );
        if let Some(api) = &self.tasks.0 {
            render_tasks(&mut out, node, &api.stats());
        }
        out
    }
}

/// The `swarm_tasks_*` series of one snapshot of the task service.
pub fn render_tasks(out: &mut String, node: &str, st: &TaskStats) {
    let header = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
    };
    header(
        out,
        "swarm_tasks_backlog",
        "gauge",
        "Tasks waiting (not running) on this node, by priority.",
    );
    for b in &st.backlog {
        let _ = writeln!(
            out,
            "swarm_tasks_backlog{{node=\"{node}\",priority=\"{}\"}} {}",
            b.priority, b.waiting
        );
    }
    header(
        out,
        "swarm_tasks_oldest_age_seconds",
        "gauge",
        "Age of the oldest waiting task, by priority (0 when none waits).",
    );
    for b in &st.backlog {
        let age = b.oldest_ms as f64 / 1000.0;
        let _ = writeln!(
            out,
            "swarm_tasks_oldest_age_seconds{{node=\"{node}\",priority=\"{}\"}} {age}",
            b.priority
        );
    }
    let series: [(&str, &str, &str, u64); 9] = [
        (
            "swarm_tasks_running",
            "gauge",
            "Workflows running on this node.",
            st.running,
        ),
        (
            "swarm_tasks_dead_letter",
            "gauge",
            "Tasks parked in the dead-letter queue, waiting for an admin.",
            st.dead_letter,
        ),
        (
            "swarm_tasks_completed_total",
            "counter",
            "Tasks completed.",
            st.completed,
        ),
        (
            "swarm_tasks_failed_total",
            "counter",
            "Tasks failed (deadline, budget, a stage that cannot be retried).",
            st.failed,
        ),
        (
            "swarm_tasks_deduplicated_total",
            "counter",
            "Submissions answered with a pending or running task of the same hash.",
            st.deduplicated,
        ),
        (
            "swarm_tasks_stale_results_total",
            "counter",
            "Stage results refused because a newer owner's epoch superseded them.",
            st.stale_results,
        ),
        (
            "swarm_tasks_adopted_total",
            "counter",
            "Tasks adopted from owners that died or left.",
            st.adopted,
        ),
        (
            "swarm_tasks_redispatched_total",
            "counter",
            "Stages sent to another agent because theirs could not take them (not failures).",
            st.redispatched,
        ),
        (
            "swarm_tasks_events_not_relayed_total",
            "counter",
            "Events of this node not relayed to its peers (past 512 per 100 ms, or the relay fell behind).",
            st.events_not_relayed,
        ),
    ];
    for (name, kind, help, v) in series {
        header(out, name, kind, help);
        let _ = writeln!(out, "{name}{{node=\"{node}\"}} {v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.observe_request("GET", "/v1/me", 200, 3.0);
        m.auth_failure("token_expired");
        m.rejected("memory_ops");
        let t = m.render("n1");
        assert!(t.contains("swarm_http_requests_total{node=\"n1\",method=\"GET\",route=\"/v1/me\",status=\"200\"} 1"));
        assert!(t.contains("le=\"5\"} 1"));
        assert!(t.contains("le=\"2.5\"} 0"));
        assert!(t.contains("swarm_auth_failures_total{node=\"n1\",code=\"token_expired\"} 1"));
        assert!(t.contains("swarm_bulkhead_rejections_total{node=\"n1\",class=\"memory_ops\"} 1"));
    }

    #[test]
    fn labels_come_from_a_fixed_set() {
        let m = Metrics::default();
        m.observe_request("GET", "/v1/me", 200, 1.0);
        let base = m.render("n1").len();
        for i in 0..300 {
            let junk = format!("X{i}{}", "A".repeat(2000));
            m.observe_request(&junk, "other", 400, 1.0);
        }
        let t = m.render("n1");
        assert!(!t.contains("AAAA"), "a client's method is never a label");
        assert!(t.contains("method=\"other\",route=\"other\",status=\"400\"} 300"));
        assert!(t.len() < base + 4096, "{} bytes", t.len());
        // Routes are the router's patterns; even so, their number is capped.
        for i in 0..1000 {
            m.observe_request("GET", &format!("/r{i}"), 200, 1.0);
        }
        let t = m.render("n1");
        let series = t.matches("swarm_http_request_duration_ms_count{").count();
        assert!(series <= MAX_ROUTES + 1, "{series}");
        assert!(t.matches("swarm_http_requests_total{").count() <= MAX_ROUTES * 16 + 2);
    }

    #[test]
    fn task_series_show_the_backlog_by_priority() {
        let st = TaskStats {
            backlog: vec![
                swarm_actors::tasks::Backlog {
                    priority: "high".into(),
                    waiting: 3,
                    oldest_ms: 1500,
                },
                swarm_actors::tasks::Backlog {
                    priority: "low".into(),
                    waiting: 0,
                    oldest_ms: 0,
                },
            ],
            running: 2,
            dead_letter: 1,
            completed: 7,
            adopted: 4,
            ..TaskStats::default()
        };
        let mut t = String::new();
        render_tasks(&mut t, "n1", &st);
        for line in [
            "swarm_tasks_backlog{node=\"n1\",priority=\"high\"} 3",
            "swarm_tasks_backlog{node=\"n1\",priority=\"low\"} 0",
            "swarm_tasks_oldest_age_seconds{node=\"n1\",priority=\"high\"} 1.5",
            "swarm_tasks_running{node=\"n1\"} 2",
            "swarm_tasks_dead_letter{node=\"n1\"} 1",
            "swarm_tasks_completed_total{node=\"n1\"} 7",
            "swarm_tasks_failed_total{node=\"n1\"} 0",
            "swarm_tasks_deduplicated_total{node=\"n1\"} 0",
            "swarm_tasks_stale_results_total{node=\"n1\"} 0",
            "swarm_tasks_adopted_total{node=\"n1\"} 4",
            "# TYPE swarm_tasks_adopted_total counter",
            "# TYPE swarm_tasks_backlog gauge",
        ] {
            assert!(t.lines().any(|l| l == line), "no `{line}` in:\n{t}");
        }
        // Without a task service there is no task series at all.
        assert!(!Metrics::default().render("n1").contains("swarm_tasks_"));
    }
}
