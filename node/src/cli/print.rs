//! What the task and agent commands print: a task, its stage results, a task list and the
//! agent table, from the gateway's JSON (lenient: a missing field prints as `-`).

use std::io::Write;

use serde_json::Value;

/// `code: message` of an error object (or of one under `error`).
pub(super) fn reason(v: &Value) -> String {
    let e = if v["error"].is_object() {
        &v["error"]
    } else {
        v
    };
    match (e["code"].as_str(), e["message"].as_str()) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c.to_string(),
        (None, Some(m)) => m.to_string(),
        (None, None) => "no reason given".into(),
    }
}

/// A JSON string's text, or `-`.
pub(super) fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("-")
}

pub(crate) fn now_ms() -> u64 {
    crate::gateway::now_ms()
}

/// How long ago `ms` was, roughly: `12s ago`, `3m ago`, `5h ago`, `2d ago`.
pub(crate) fn ago(ms: u64, now_ms: u64) -> String {
    let s = now_ms.saturating_sub(ms) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86_400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

/// `swarm task status`.
pub(crate) fn print_task(out: &mut impl Write, t: &Value, now: u64) -> std::io::Result<()> {
    writeln!(
        out,
        "task {}  {}  ({} workflow, {} priority)",
        text(&t["task_id"]),
        text(&t["status"]),
        text(&t["workflow"]),
        text(&t["priority"])
    )?;
    writeln!(out, "objective: {}", text(&t["objective"]))?;
    let done = t["stages_completed"].as_u64().unwrap_or(0);
    let total = t["stages_total"].as_u64().unwrap_or(0);
    let pct = t["progress"].as_f64().unwrap_or(0.0) * 100.0;
    write!(out, "progress:  {done}/{total} stages ({pct:.0}%)")?;
    if let Some(stage) = t["current_stage"].as_str() {
        write!(out, ", current: {stage}")?;
    }
    writeln!(out)?;
    let r = &t["running"];
    if r.is_object() {
        writeln!(
            out,
            "running:   {} on {}, attempt {}, since {}",
            text(&r["agent"]),
            text(&r["node"]),
            r["attempt"],
            ago(r["started_at"].as_u64().unwrap_or(now), now)
        )?;
    }
    let agents: Vec<&str> = t["agents_involved"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if !agents.is_empty() {
        writeln!(out, "agents:    {}", agents.join(", "))?;
    }
    writeln!(
        out,
        "tokens:    {} of {}",
        t["tokens_used"], t["token_budget"]
    )?;
    let when = |k: &str| t[k].as_u64().map(|ms| ago(ms, now));
    writeln!(
        out,
        "created:   {} by {}",
        when("created_at").unwrap_or_else(|| "-".into()),
        text(&t["submitter"])
    )?;
    if let Some(f) = when("finished_at") {
        writeln!(out, "finished:  {f}")?;
    } else if let Some(d) = t["deadline_at"].as_u64() {
        let left = d.saturating_sub(now) / 1000;
        writeln!(out, "deadline:  in {left}s")?;
    }
    writeln!(
        out,
        "owner:     {} (epoch {})",
        text(&t["owner"]),
        t["epoch"]
    )?;
    if t["error"].is_object() {
        writeln!(out, "error:     {}", reason(&t["error"]))?;
    }
    Ok(())
}

/// `swarm task review`: each stage's agent and text.
pub(crate) fn print_review(out: &mut impl Write, r: &Value) -> std::io::Result<()> {
    let results = r["results"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if results.is_empty() {
        writeln!(
            out,
            "no stage of task {} has completed",
            text(&r["task_id"])
        )?;
    }
    for s in results {
        writeln!(
            out,
            "== {} ({} on {}, attempt {}, {} tokens, {} ms) ==",
            text(&s["stage"]),
            text(&s["agent"]),
            text(&s["node"]),
            s["attempt"],
            s["completion_tokens"],
            s["duration_ms"]
        )?;
        let body = text(&s["text"]);
        writeln!(out, "{}", body.trim_end())?;
    }
    Ok(())
}

/// Cut `s` to `max` characters, marking the cut.
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut c: String = s.chars().take(max.saturating_sub(1)).collect();
    c.push('…');
    c
}

/// `swarm task list`.
pub(crate) fn print_list(out: &mut impl Write, l: &Value, now: u64) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<24} {:<12} {:<10} {:<10} {:>8} {:>9}  OBJECTIVE",
        "ID", "STATUS", "PRIORITY", "WORKFLOW", "PROGRESS", "CREATED"
    )?;
    for t in l["tasks"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let progress = format!(
            "{}/{}",
            t["stages_completed"].as_u64().unwrap_or(0),
            t["stages_total"].as_u64().unwrap_or(0)
        );
        writeln!(
            out,
            "{:<24} {:<12} {:<10} {:<10} {:>8} {:>9}  {}",
            text(&t["task_id"]),
            text(&t["status"]),
            text(&t["priority"]),
            text(&t["workflow"]),
            progress,
            t["created_at"]
                .as_u64()
                .map(|ms| ago(ms, now))
                .unwrap_or_else(|| "-".into()),
            clip(text(&t["objective"]), 60)
        )?;
    }
    Ok(())
}

/// `swarm agents`.
pub(crate) fn print_agents(out: &mut impl Write, a: &Value) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<26} {:<10} {:<8} {:<24} {:>5} {:>11} {:>7} {:>10} {:>8}",
        "ID", "NODE", "STATE", "TASK", "LOAD", "DONE/FAILED", "SUCCESS", "MEAN STAGE", "RESTARTS"
    )?;
    for g in a["agents"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let load = format!("{}/{}", g["load"], g["max_load"]);
        let done = format!("{}/{}", g["completed"], g["failed"]);
        let success = format!("{:.0}%", g["success_rate"].as_f64().unwrap_or(0.0) * 100.0);
        let mean = format!(
            "{:.1}s",
            g["mean_stage_ms"].as_f64().unwrap_or(0.0) / 1000.0
        );
        writeln!(
            out,
            "{:<26} {:<10} {:<8} {:<24} {:>5} {:>11} {:>7} {:>10} {:>8}",
            text(&g["id"]),
            text(&g["node"]),
            text(&g["state"]),
            clip(text(&g["current_task"]), 24),
            load,
            done,
            success,
            mean,
            g["restarts"]
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn tables_and_ages_read_well() {
        assert_eq!(ago(1_000, 13_000), "12s ago");
        assert_eq!(ago(0, 3_600_000 * 5), "5h ago");
        assert_eq!(clip("abcdef", 4), "abc…");
        let mut out = Vec::new();
        let agents = json!({"agents": [{
            "id": "vllm-specialist", "node": "node-2", "state": "busy", "current_task": "t1",
            "load": 1, "max_load": 4, "completed": 9, "failed": 1, "success_rate": 0.9,
            "mean_stage_ms": 2500.0, "restarts": 0
        }]});
        print_agents(&mut out, &agents).expect("write");
        let text = String::from_utf8_lossy(&out);
        let row = text.lines().nth(1).expect("a row");
        for cell in [
            "vllm-specialist",
            "node-2",
            "busy",
            "t1",
            "1/4",
            "9/1",
            "90%",
            "2.5s",
        ] {
            assert!(row.contains(cell), "{cell} in {row}");
        }
        let mut out = Vec::new();
        let task = json!({
            "task_id": "t1", "status": "in_progress", "workflow": "sparc", "priority": "high",
            "objective": "build it", "stages_completed": 3, "stages_total": 7, "progress": 0.43,
            "current_stage": "implementation", "created_at": 1_000, "deadline_at": 100_000,
            "running": {"agent": "coder-1", "node": "node-2", "attempt": 1, "started_at": 5_000},
            "agents_involved": ["a", "b"], "tokens_used": 10, "token_budget": 100,
            "submitter": "alice", "owner": "node-1", "epoch": 2, "error": null
        });
        print_task(&mut out, &task, 11_000).expect("write");
        let text = String::from_utf8_lossy(&out);
        for part in [
            "task t1  in_progress",
            "3/7 stages (43%), current: implementation",
            "coder-1 on node-2, attempt 1, since 6s ago",
            "created:   10s ago by alice",
            "deadline:  in 89s",
        ] {
            assert!(text.contains(part), "{part} in:\n{text}");
        }
    }
}
