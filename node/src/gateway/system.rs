//! `/health` and `/metrics`.

use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header;
use axum::response::IntoResponse;
use serde_json::{Value, json};

use super::{AppState, AuditCtx};
use crate::auth::Principal;
use crate::error::AppError;

/// Node health: storage, membership and inference, and the status of each local model.
#[utoipa::path(
    get,
    path = "/health",
    tag = "system",
    responses((status = 200, description = "Health", body = super::openapi::schemas::Health)),
    extensions(("x-permission" = json!("public")))
)]
pub(super) async fn health(State(s): State<AppState>) -> Json<Value> {
    let storage = match s.storage.engine.get("meta", b"health") {
        Ok(_) => "ok",
        Err(_) => "error",
    };
    let (members_alive, membership) = match &s.membership {
        Some(m) => {
            let v = m.view();
            let me_left = v
                .members
                .first()
                .is_some_and(|me| me.state == swarm_membership::MemberState::Left);
            let state = if me_left {
                "left"
            } else if v.active {
                "joined"
            } else if v.members.len() > 1 {
                "isolated"
            } else {
                "alone"
            };
            (v.alive(), state)
        }
        None => (1, "standalone"),
    };
    let models: serde_json::Map<String, Value> = s
        .inference
        .local
        .served()
        .map(|m| (m.name().to_string(), json!(m.status().to_string())))
        .collect();
    let inference = if models.is_empty() {
        "disabled"
    } else if models.values().all(|v| v == "ready") {
        "ready"
    } else if models.values().any(|v| v == "loading") {
        "loading"
    } else {
        "unavailable"
    };
    let ok = storage == "ok" && inference != "unavailable";
    Json(json!({
        "status": if ok { "ok" } else { "degraded" },
        "node": s.node,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": s.started.elapsed().as_secs(),
        "members_alive": members_alive,
        "services": {
            "storage": storage,
            "membership": membership,
            "inference": inference,
        },
        "models": models,
    }))
}

/// Prometheus metrics (no credential needed on loopback).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "system",
    responses((status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain", body = String)),
    extensions(("x-permission" = json!("metrics.read")))
)]
pub(super) async fn metrics(
    State(s): State<AppState>,
    req: Request,
) -> Result<impl IntoResponse, AppError> {
    let ext = req.extensions();
    let loopback = ext
        .get::<ConnectInfo<SocketAddr>>()
        .is_some_and(|c| c.0.ip().is_loopback());
    if !loopback {
        match (ext.get::<Principal>(), ext.get::<AuditCtx>()) {
            (Some(p), Some(c)) => s.authorize(c, p, "metrics.read", "metrics", None)?,
            _ => return Err(AppError::Forbidden("metrics.read".into())),
        }
    }
    let mut text = s.metrics.render(&s.node);
    if let Some(m) = &s.membership {
        gossip_metrics(&mut text, &s.node, m);
    }
    if let Some(r) = &s.replicator {
        replication_metrics(&mut text, &s.node, r);
    }
    inference_metrics(&mut text, &s.node, &s.inference);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text))
}

fn gossip_metrics(out: &mut String, node: &str, m: &swarm_membership::Membership) {
    use std::fmt::Write;
    let st = m.stats();
    let view = m.view();
    let mut by_state = std::collections::BTreeMap::<&str, u64>::new();
    for mb in &view.members {
        let k = match mb.state {
            swarm_membership::MemberState::Alive => "alive",
            swarm_membership::MemberState::Suspect => "suspect",
            swarm_membership::MemberState::Down => "down",
            swarm_membership::MemberState::Left => "left",
        };
        *by_state.entry(k).or_default() += 1;
    }
    let _ = writeln!(
        out,
        "# HELP swarm_cluster_members Members by state, as this node sees them."
    );
    let _ = writeln!(out, "# TYPE swarm_cluster_members gauge");
    for (state, n) in by_state {
        let _ = writeln!(
            out,
            "swarm_cluster_members{{node=\"{node}\",state=\"{state}\"}} {n}"
        );
    }
    let counters = [
        (
            "swarm_gossip_frames_in_total",
            "Gossip frames received.",
            st.frames_in,
        ),
        (
            "swarm_gossip_frames_out_total",
            "Gossip frames sent.",
            st.frames_out,
        ),
        (
            "swarm_gossip_frames_dropped_total",
            "Gossip frames dropped (queue full).",
            st.frames_dropped,
        ),
        (
            "swarm_gossip_frames_refused_total",
            "Gossip frames refused (bad, or a false identity).",
            st.frames_refused,
        ),
        (
            "swarm_cluster_connections_refused_total",
            "Peer connections refused (other CA, no certificate, limit).",
            st.connections_refused,
        ),
        (
            "swarm_cluster_dials_failed_total",
            "Failed dials to peers.",
            st.dials_failed,
        ),
    ];
    write_counters(out, node, &counters);
}

fn inference_metrics(out: &mut String, node: &str, inf: &crate::inference::Inference) {
    use std::fmt::Write;
    use std::sync::atomic::Ordering::Relaxed;
    type Pick = fn(&swarm_gpu::EngineStats) -> u64;
    let series: [(&str, &str, &str, Pick); 14] = [
        (
            "swarm_inference_running",
            "gauge",
            "Sequences decoding now.",
            |s| s.running.load(Relaxed),
        ),
        (
            "swarm_inference_queue_depth",
            "gauge",
            "Requests waiting for admission.",
            |s| s.waiting.load(Relaxed),
        ),
        (
            "swarm_inference_kv_blocks_used",
            "gauge",
            "KV-cache blocks reserved.",
            |s| s.kv_used_blocks.load(Relaxed),
        ),
        (
            "swarm_inference_kv_blocks_total",
            "gauge",
            "KV-cache blocks in the budget.",
            |s| s.kv_total_blocks.load(Relaxed),
        ),
        (
            "swarm_inference_requests_total",
            "counter",
            "Requests admitted to the queue.",
            |s| s.requests.load(Relaxed),
        ),
        (
            "swarm_inference_refused_total",
            "counter",
            "Requests refused (queue full).",
            |s| s.refused.load(Relaxed),
        ),
        (
            "swarm_inference_cancelled_total",
            "counter",
            "Sequences cancelled by their client.",
            |s| s.cancelled.load(Relaxed),
        ),
        (
            "swarm_inference_failed_total",
            "counter",
            "Sequences ended by a failed batch.",
            |s| s.failed.load(Relaxed),
        ),
        (
            "swarm_inference_prompt_tokens_total",
            "counter",
            "Prompt tokens admitted.",
            |s| s.prompt_tokens.load(Relaxed),
        ),
        (
            "swarm_inference_prompt_tokens_cached_total",
            "counter",
            "Prompt tokens whose KV was copied from the prefix cache instead of computed.",
            |s| s.prompt_tokens_cached.load(Relaxed),
        ),
        (
            "swarm_inference_prefix_cache_tokens",
            "gauge",
            "Prompt tokens the prefix cache holds.",
            |s| s.prefix_cache_tokens.load(Relaxed),
        ),
        (
            "swarm_inference_generated_tokens_total",
            "counter",
            "Tokens generated (rate: tokens/s).",
            |s| s.generated_tokens.load(Relaxed),
        ),
        (
            "swarm_inference_steps_total",
            "counter",
            "Engine steps (batched forwards).",
            |s| s.steps.load(Relaxed),
        ),
        (
            "swarm_inference_engine_restarts_total",
            "counter",
            "Engine crashes followed by a restart.",
            |s| s.restarts.load(Relaxed),
        ),
    ];
    let engines: Vec<(String, swarm_gpu::EngineHandle)> = inf
        .local
        .served()
        .filter_map(|m| m.engine().map(|e| (m.name().to_string(), e)))
        .collect();
    if engines.is_empty() {
        return;
    }
    for (name, kind, help, pick) in series {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (model, e) in &engines {
            let _ = writeln!(
                out,
                "{name}{{node=\"{node}\",model=\"{model}\"}} {}",
                pick(e.stats())
            );
        }
    }
    type PickH = fn(&swarm_gpu::EngineStats) -> &swarm_gpu::Histogram;
    let hists: [(&str, &str, PickH); 4] = [
        (
            "swarm_inference_time_to_first_token_seconds",
            "Time from submission to the first token.",
            |s| &s.time_to_first_token,
        ),
        (
            "swarm_inference_inter_token_seconds",
            "Time between consecutive tokens of a sequence.",
            |s| &s.inter_token_latency,
        ),
        (
            "swarm_inference_batch_size",
            "Sequences per engine step.",
            |s| &s.batch_size,
        ),
        (
            "swarm_inference_step_seconds",
            "Duration of one engine step (a batched forward and its sampling).",
            |s| &s.step_seconds,
        ),
    ];
    for (name, help, pick) in hists {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (model, e) in &engines {
            let (buckets, sum, count) = pick(e.stats()).snapshot();
            let labels = format!("node=\"{node}\",model=\"{model}\"");
            for (le, n) in buckets {
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {n}");
            }
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
            let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
            let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
        }
    }
}

fn replication_metrics(out: &mut String, node: &str, r: &swarm_actors::Replicator) {
    use std::fmt::Write;
    use std::sync::atomic::Ordering::Relaxed;
    let st = r.stats();
    let applied = st.deltas_applied.load(Relaxed);
    let counters = [
        (
            "swarm_replication_deltas_sent_total",
            "Deltas queued to peers.",
            st.deltas_sent.load(Relaxed),
        ),
        (
            "swarm_replication_deltas_dropped_total",
            "Deltas dropped (peer queue full or stream lost); anti-entropy repairs them.",
            st.deltas_dropped.load(Relaxed),
        ),
        (
            "swarm_replication_deltas_applied_total",
            "Peer deltas applied here.",
            applied,
        ),
        (
            "swarm_replication_deltas_stale_total",
            "Peer deltas already known (or older).",
            st.deltas_stale.load(Relaxed),
        ),
        (
            "swarm_replication_deltas_refused_total",
            "Peer deltas refused (bad frame, clock skew, erased subject, full namespace).",
            st.deltas_refused.load(Relaxed),
        ),
        (
            "swarm_anti_entropy_rounds_total",
            "Anti-entropy rounds completed (as initiator).",
            st.ae_rounds.load(Relaxed),
        ),
        (
            "swarm_anti_entropy_failed_total",
            "Anti-entropy rounds that failed.",
            st.ae_failed.load(Relaxed),
        ),
        (
            "swarm_anti_entropy_bytes_sent_total",
            "Anti-entropy bytes sent.",
            st.ae_bytes_sent.load(Relaxed),
        ),
        (
            "swarm_anti_entropy_bytes_received_total",
            "Anti-entropy bytes received.",
            st.ae_bytes_received.load(Relaxed),
        ),
        (
            "swarm_anti_entropy_entries_total",
            "Entries exchanged by anti-entropy.",
            st.ae_entries.load(Relaxed),
        ),
        (
            "swarm_tombstones_dropped_total",
            "Tombstones garbage-collected.",
            st.tombstones_dropped.load(Relaxed),
        ),
    ];
    write_counters(out, node, &counters);
    if let Ok(codes) = st.refused_by_code.lock() {
        for (code, n) in codes.iter() {
            let _ = writeln!(
                out,
                "swarm_replication_refused_by_code_total{{node=\"{node}\",code=\"{code}\"}} {n}"
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP swarm_replication_pending Deltas queued to peers, not yet sent."
    );
    let _ = writeln!(out, "# TYPE swarm_replication_pending gauge");
    let _ = writeln!(
        out,
        "swarm_replication_pending{{node=\"{node}\"}} {}",
        r.pending()
    );
    let mean = st
        .lag_ms_sum
        .load(Relaxed)
        .checked_div(applied)
        .unwrap_or(0);
    let _ = writeln!(
        out,
        "# HELP swarm_replication_lag_ms Time from a write at its origin to its apply here (mean and max)."
    );
    let _ = writeln!(out, "# TYPE swarm_replication_lag_ms gauge");
    let _ = writeln!(
        out,
        "swarm_replication_lag_ms{{node=\"{node}\",stat=\"mean\"}} {mean}"
    );
    let _ = writeln!(
        out,
        "swarm_replication_lag_ms{{node=\"{node}\",stat=\"max\"}} {}",
        st.lag_ms_max.load(Relaxed)
    );
}

/// Prometheus counters, one `node` label each.
fn write_counters(out: &mut String, node: &str, counters: &[(&str, &str, u64)]) {
    use std::fmt::Write;
    for (name, help, v) in counters {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name}{{node=\"{node}\"}} {v}");
    }
}
