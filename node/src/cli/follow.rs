//! `swarm task new --follow`: server-sent events read a line at a time ([`SseParser`]) and
//! printed as a person reads them ([`Follower`]): each stage's start, its text as it streams,
//! its end, and the task's. Both are plain state machines, tested without a network.

use std::io::{BufRead, Write};

use anyhow::Result;
use serde_json::Value;

use super::print::reason;

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseMessage {
    pub(crate) id: Option<String>,
    pub(crate) event: String,
    pub(crate) data: String,
}

/// Server-sent events, a line at a time (the subset the gateway sends: `id`, `event`, `data`,
/// comments).
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
}

impl SseParser {
    /// Feed one line (with or without its line break); a blank line completes a message.
    pub(crate) fn line(&mut self, line: &str) -> Option<SseMessage> {
        let line = line.trim_end_matches(['\n', '\r']);
        if line.is_empty() {
            let data = self.data.take();
            let event = self.event.take();
            let id = self.id.take();
            return (data.is_some() || event.is_some()).then(|| SseMessage {
                id,
                event: event.unwrap_or_else(|| "message".into()),
                data: data.unwrap_or_default(),
            });
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "id" => self.id = Some(value.to_string()),
            "event" => self.event = Some(value.to_string()),
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            _ => {}
        }
        None
    }
}

/// What one event means to `--follow`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    Continue,
    /// The task ended with this status.
    Ended(String),
    /// The gateway dropped this subscriber: resume from the last id.
    Resume,
}

/// Prints a task's events as a person reads them.
#[derive(Debug, Default)]
pub(crate) struct Follower {
    /// The id of the last event seen (0: none yet).
    pub(crate) last_id: u64,
    /// Streamed text left the cursor mid-line.
    mid_line: bool,
}

impl Follower {
    /// Print the events of `stream` until the task ends (its status) or the stream does.
    pub(super) fn read(
        &mut self,
        stream: impl BufRead,
        out: &mut impl Write,
    ) -> Result<Option<String>> {
        let mut parser = SseParser::default();
        for line in stream.lines() {
            // A read that times out or breaks ends this stream; the caller resumes.
            let Ok(line) = line else { return Ok(None) };
            let Some(msg) = parser.line(&line) else {
                continue;
            };
            match self.on(&msg, out)? {
                Step::Continue => {}
                Step::Ended(status) => return Ok(Some(status)),
                Step::Resume => return Ok(None),
            }
        }
        Ok(None)
    }

    /// Print one event.
    pub(crate) fn on(&mut self, msg: &SseMessage, out: &mut impl Write) -> std::io::Result<Step> {
        if let Some(id) = msg.id.as_deref().and_then(|i| i.parse().ok()) {
            self.last_id = id;
        }
        if msg.event == "dropped" {
            return Ok(Step::Resume);
        }
        let ev: Value = serde_json::from_str(&msg.data).unwrap_or(Value::Null);
        let data = &ev["data"];
        let stage = data["stage"]
            .as_str()
            .or_else(|| data["name"].as_str())
            .unwrap_or("stage");
        match msg.event.as_str() {
            "stage.started" => {
                self.newline(out)?;
                let agent = ev["agent"].as_str().or_else(|| data["agent"].as_str());
                match agent {
                    Some(a) => writeln!(out, "== {stage} ({a}) ==")?,
                    None => writeln!(out, "== {stage} ==")?,
                }
            }
            "stage.delta" => {
                if let Some(t) = data["text"].as_str() {
                    write!(out, "{t}")?;
                    out.flush()?;
                    self.mid_line = !t.ends_with('\n');
                }
            }
            "stage.completed" => {
                self.newline(out)?;
                writeln!(out, "-- {stage} completed")?;
            }
            "stage.failed" => {
                self.newline(out)?;
                writeln!(out, "-- {stage} failed: {}", reason(data))?;
            }
            kind @ ("task.completed" | "task.failed" | "task.cancelled" | "task.dead_letter") => {
                let status = kind.trim_start_matches("task.").to_string();
                self.finish(out, &status, data)?;
                return Ok(Step::Ended(status));
            }
            _ => {}
        }
        Ok(Step::Continue)
    }

    /// The last line: the task's final status (and why, when it did not complete).
    pub(super) fn finish(
        &mut self,
        out: &mut impl Write,
        status: &str,
        why: &Value,
    ) -> std::io::Result<()> {
        self.newline(out)?;
        if status == "completed" {
            writeln!(out, "task completed")
        } else {
            writeln!(out, "task {status}: {}", reason(why))
        }
    }

    fn newline(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        if std::mem::take(&mut self.mid_line) {
            writeln!(out)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn messages(text: &str) -> Vec<SseMessage> {
        let mut p = SseParser::default();
        text.split_inclusive('\n')
            .filter_map(|l| p.line(l))
            .collect()
    }

    #[test]
    fn the_parser_reads_what_the_gateway_sends() {
        let got = messages(
            ": keep-alive\n\nid: 7\nevent: stage.delta\ndata: {\"a\":1}\n\n\
             event: dropped\ndata: x\ndata: y\n\nid: 9\ndata:z\n\n",
        );
        assert_eq!(
            got,
            [
                SseMessage {
                    id: Some("7".into()),
                    event: "stage.delta".into(),
                    data: "{\"a\":1}".into()
                },
                SseMessage {
                    id: None,
                    event: "dropped".into(),
                    data: "x\ny".into()
                },
                SseMessage {
                    id: Some("9".into()),
                    event: "message".into(),
                    data: "z".into()
                },
            ]
        );
    }

    fn msg(id: u64, kind: &str, data: Value) -> SseMessage {
        let ev = json!({"id": id, "kind": kind, "task": "t1", "agent": "coder-1", "data": data});
        SseMessage {
            id: Some(id.to_string()),
            event: kind.into(),
            data: ev.to_string(),
        }
    }

    #[test]
    fn following_prints_stages_and_streamed_text_and_ends_with_the_task() {
        let mut f = Follower::default();
        let mut out = Vec::new();
        let steps: Vec<Step> = [
            msg(1, "task.accepted", json!({})),
            msg(2, "stage.started", json!({"stage": "specification"})),
            msg(3, "stage.delta", json!({"text": "Hello, "})),
            msg(4, "stage.delta", json!({"text": "world"})),
            msg(5, "stage.completed", json!({"stage": "specification"})),
            msg(
                6,
                "stage.failed",
                json!({"stage": "testing", "code": "timeout", "message": "too slow"}),
            ),
            msg(
                7,
                "task.failed",
                json!({"error": {"code": "stage_failed", "message": "no luck"}}),
            ),
        ]
        .iter()
        .map(|m| f.on(m, &mut out).expect("write"))
        .collect();
        assert_eq!(steps.last(), Some(&Step::Ended("failed".into())));
        assert!(steps[..6].iter().all(|s| *s == Step::Continue));
        assert_eq!(f.last_id, 7);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "== specification (coder-1) ==\nHello, world\n-- specification completed\n\
             -- testing failed: timeout: too slow\ntask failed: stage_failed: no luck\n"
        );
        let dropped = SseMessage {
            id: None,
            event: "dropped".into(),
            data: "{}".into(),
        };
        assert_eq!(f.on(&dropped, &mut out).expect("write"), Step::Resume);
        assert_eq!(f.last_id, 7, "a dropped notice has no id");
    }
}
