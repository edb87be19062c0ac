//! The client commands of tasks and agents: `swarm task new|status|review|list|kill` and
//! `swarm agents`, over a gateway's HTTP API (what they print: `print`).
//!
//! `task new --follow` reads the task's server-sent events (`GET /v1/events?task=ID`) and
//! prints them as they come (`follow`). It asks for the node's whole event ring first
//! (`Last-Event-ID: 0`), so the events of a task that started before the stream opened are not
//! missed, and it checks the task's record once subscribed, so a task whose events the ring no
//! longer holds still ends the wait. A stream that breaks, or that drops a slow reader, is
//! resumed from the last event seen.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::follow::Follower;
use super::print::{now_ms, print_agents, print_list, print_review, print_task, text};

/// How a client command reaches a gateway.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ClientArgs {
    /// The gateway to ask.
    #[arg(long, env = "SWARM_GATEWAY", default_value = "https://127.0.0.1:8080")]
    pub(crate) gateway: String,
    /// The CA that signed the gateway's HTTPS certificate (default: DIR/ca.pem when it
    /// exists, else the system's roots).
    #[arg(long, env = "SWARM_CA")]
    pub(crate) ca: Option<PathBuf>,
    /// A token with the permissions the command needs (default: DIR/admin.token when it
    /// exists).
    #[arg(long, env = "SWARM_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// The cluster folder whose CA and admin token to use when none is given.
    #[arg(long, default_value = "swarm-data")]
    pub(crate) dir: PathBuf,
}

/// `swarm task ...`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum TaskCommand {
    /// Submit a task; prints its id. With --follow, prints its stages as they run and exits 0
    /// when it completes, 1 when it fails, is cancelled or is dead-lettered.
    New {
        objective: String,
        /// critical, high, normal (default), low or background.
        #[arg(long)]
        priority: Option<String>,
        /// The workflow (default: the node's, `sparc` unless configured).
        #[arg(long)]
        workflow: Option<String>,
        /// A JSON object the agents should know.
        #[arg(long, value_parser = json_object)]
        context: Option<Value>,
        /// Resubmitting with the same key answers the first task instead of a new one.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Stream the task's progress until it ends.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// A task's state.
    Status {
        id: String,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// What each stage of a task produced, and which agent.
    Review {
        id: String,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Your tasks (an admin's: everyone's), newest first.
    List {
        /// pending, in_progress, completed, failed, cancelled or dead_letter.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cancel a task.
    Kill {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `--context`: a JSON object.
fn json_object(s: &str) -> Result<Value, String> {
    match serde_json::from_str::<Value>(s) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err("must be a JSON object".into()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

/// A gateway, with the credential to use.
#[derive(Debug)]
pub(crate) struct Client {
    base: String,
    token: String,
    ca: Option<PathBuf>,
    agent: ureq::Agent,
}

impl Client {
    /// The client `args` describe: the CA and token of `--dir` when none is given.
    pub(crate) fn new(args: ClientArgs) -> Result<Self> {
        let ca = args
            .ca
            .or_else(|| Some(args.dir.join("ca.pem")).filter(|p| p.exists()));
        let token = match args.token {
            Some(t) => t,
            None => std::fs::read_to_string(args.dir.join("admin.token"))
                .map(|t| t.trim().to_string())
                .with_context(|| {
                    format!(
                        "no --token (or SWARM_TOKEN) and no {}",
                        args.dir.join("admin.token").display()
                    )
                })?,
        };
        let agent = super::gateway_agent(ca.as_deref())?;
        Ok(Self {
            base: args.gateway.trim_end_matches('/').to_string(),
            token,
            ca,
            agent,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        self.agent
            .request(method, &self.url(path))
            .set("Authorization", &format!("Bearer {}", self.token))
    }

    /// The JSON answer of a request, or an error that says what the gateway refused.
    fn answer(&self, req: ureq::Request, body: Option<&Value>) -> Result<Value> {
        let what = format!("{} {}", req.method(), req.url());
        let resp = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match resp {
            Ok(r) => r
                .into_json()
                .with_context(|| format!("{what}: read the answer")),
            Err(ureq::Error::Status(status, r)) => {
                let text = r.into_string().unwrap_or_default();
                bail!("{what}: HTTP {status}: {}", refusal(&text))
            }
            Err(e) => bail!("{what}: {e}"),
        }
    }

    pub(crate) fn get(&self, path: &str) -> Result<Value> {
        self.answer(self.request("GET", path), None)
    }

    fn post(&self, path: &str, body: &Value, idempotency_key: Option<&str>) -> Result<Value> {
        let mut req = self.request("POST", path);
        if let Some(k) = idempotency_key {
            req = req.set("Idempotency-Key", k);
        }
        self.answer(req, Some(body))
    }

    fn delete(&self, path: &str) -> Result<Value> {
        self.answer(self.request("DELETE", path), None)
    }

    /// The event stream of `task`, after event `after`; subscribed once this returns.
    fn events(&self, task: &str, after: u64) -> Result<Box<dyn BufRead + Send>> {
        // No overall timeout: the stream lasts as long as the task. A read waits for at most
        // a few of the gateway's 15 s keep-alive comments.
        let builder = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(Duration::from_secs(60));
        let agent = super::agent_with(builder, self.ca.as_deref())?;
        let url = self.url(&format!("/v1/events?task={}", encode(task)));
        let resp = agent
            .get(&url)
            .set("Authorization", &format!("Bearer {}", self.token))
            .set("Accept", "text/event-stream")
            .set("Last-Event-ID", &after.to_string())
            .call();
        match resp {
            Ok(r) => Ok(Box::new(BufReader::new(r.into_reader()))),
            Err(ureq::Error::Status(status, r)) => {
                let text = r.into_string().unwrap_or_default();
                bail!("GET {url}: HTTP {status}: {}", refusal(&text))
            }
            Err(e) => bail!("GET {url}: {e}"),
        }
    }
}

/// `code: message` of an error answer, or its text.
fn refusal(body: &str) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(v) if v["error"]["code"].is_string() => format!(
            "{}: {}",
            v["error"]["code"].as_str().unwrap_or(""),
            v["error"]["message"].as_str().unwrap_or("")
        ),
        _ => body.trim().to_string(),
    }
}

/// Percent-encode a path segment or query value (task ids are plain, but not by contract).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Run `swarm task ...`.
pub(crate) fn run_task(cmd: TaskCommand) -> Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match cmd {
        TaskCommand::New {
            objective,
            priority,
            workflow,
            context,
            idempotency_key,
            follow,
            client,
        } => {
            let client = Client::new(client)?;
            let mut body = json!({ "objective": objective });
            for (k, v) in [("priority", priority), ("workflow", workflow)] {
                if let Some(v) = v {
                    body[k] = json!(v);
                }
            }
            if let Some(c) = context {
                body["context"] = c;
            }
            new_task(&client, &body, idempotency_key.as_deref(), follow, &mut out)
        }
        TaskCommand::Status { id, json, client } => {
            let task = Client::new(client)?.get(&format!("/v1/tasks/{}", encode(&id)))?;
            print_or_json(&mut out, &task, json, |o, t| print_task(o, t, now_ms()))
        }
        TaskCommand::Review { id, json, client } => {
            let client = Client::new(client)?;
            let results = client.get(&format!("/v1/tasks/{}/results", encode(&id)))?;
            print_or_json(&mut out, &results, json, print_review)
        }
        TaskCommand::List {
            status,
            limit,
            json,
            client,
        } => {
            let mut path = format!("/v1/tasks?limit={limit}");
            if let Some(s) = status {
                path.push_str(&format!("&status={}", encode(&s)));
            }
            let list = Client::new(client)?.get(&path)?;
            print_or_json(&mut out, &list, json, |o, l| print_list(o, l, now_ms()))
        }
        TaskCommand::Kill { id, client } => {
            let task = Client::new(client)?.delete(&format!("/v1/tasks/{}", encode(&id)))?;
            writeln!(
                out,
                "task {} {}",
                text(&task["task_id"]),
                text(&task["status"])
            )?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Run `swarm agents`.
pub(crate) fn run_agents(client: ClientArgs, json: bool) -> Result<ExitCode> {
    let agents = Client::new(client)?.get("/v1/agents")?;
    print_or_json(&mut std::io::stdout().lock(), &agents, json, print_agents)
}

fn print_or_json<W: Write>(
    out: &mut W,
    v: &Value,
    json: bool,
    print: impl FnOnce(&mut W, &Value) -> std::io::Result<()>,
) -> Result<ExitCode> {
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(v)?)?;
    } else {
        print(out, v)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Submit, print the id, and with `follow` the task's progress until it ends.
pub(crate) fn new_task(
    client: &Client,
    body: &Value,
    idempotency_key: Option<&str>,
    follow: bool,
    out: &mut impl Write,
) -> Result<ExitCode> {
    let task = client.post("/v1/tasks", body, idempotency_key)?;
    let id = task["task_id"]
        .as_str()
        .context("the gateway answered no task_id")?
        .to_string();
    writeln!(out, "{id}")?;
    if task["deduplicated"] == true {
        eprintln!("deduplicated: the same task is already pending or running");
    }
    if task["replayed"] == true {
        eprintln!("replayed: this idempotency key was used before");
    }
    if !follow {
        return Ok(ExitCode::SUCCESS);
    }
    let status = follow_task(client, &id, out)?;
    Ok(exit_for(&status))
}

/// 0 for a completed task, 1 for any other end.
fn exit_for(status: &str) -> ExitCode {
    if status == "completed" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Statuses after which nothing happens without someone acting.
fn is_end(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "cancelled" | "dead_letter")
}

/// Streams broken in a row (no event between them) before `--follow` gives up.
const MAX_BROKEN_STREAMS: u32 = 5;

/// Print the task's events until it ends; returns its final status.
fn follow_task(client: &Client, id: &str, out: &mut impl Write) -> Result<String> {
    let mut follower = Follower::default();
    let mut broken = 0;
    loop {
        let stream = client.events(id, follower.last_id)?;
        // Subscribed: whatever happens next arrives. What happened before is in the replay,
        // unless the ring dropped it; the record tells whether the task already ended.
        let task = client.get(&format!("/v1/tasks/{}", encode(id)))?;
        let status = text(&task["status"]).to_string();
        if is_end(&status) {
            if follower.last_id == 0 {
                let results = client.get(&format!("/v1/tasks/{}/results", encode(id)))?;
                print_review(out, &results)?;
            }
            follower.finish(out, &status, &task["error"])?;
            return Ok(status);
        }
        let before = follower.last_id;
        if let Some(status) = follower.read(stream, out)? {
            return Ok(status);
        }
        broken = if follower.last_id > before {
            0
        } else {
            broken + 1
        };
        if broken >= MAX_BROKEN_STREAMS {
            bail!("the event stream of task {id} broke {broken} times in a row");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A client of `gateway` with `token` and no CA, for tests.
#[cfg(test)]
fn test_client(gateway: &str, token: &str) -> Client {
    Client {
        base: gateway.trim_end_matches('/').to_string(),
        token: token.to_string(),
        ca: None,
        agent: ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(10))
            .build(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `task new --follow` against a gateway that streams a task's events over HTTP: the id,
    /// the stage, the text as it streams, the end, and exit 0; the stream was asked for from
    /// the start of the node's ring.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn following_reads_a_live_event_stream_to_the_tasks_end() {
        use axum::response::sse::{Event as Sse, Sse as Stream};
        use axum::routing::{get, post};
        let events = |headers: axum::http::HeaderMap| async move {
            let from = headers
                .get("last-event-id")
                .and_then(|v| v.to_str().ok())
                .map(String::from);
            let ev = |id: u64, kind: &str, data: Value| {
                let e =
                    json!({"id": id, "kind": kind, "task": "t1", "agent": "qa-1", "data": data});
                Ok::<_, std::convert::Infallible>(
                    Sse::default()
                        .id(id.to_string())
                        .event(kind)
                        .data(e.to_string()),
                )
            };
            let mut list = vec![
                ev(1, "stage.started", json!({"stage": "answer"})),
                ev(2, "stage.delta", json!({"text": "forty"})),
                ev(3, "stage.delta", json!({"text": "-two"})),
                ev(4, "stage.completed", json!({"stage": "answer"})),
                ev(5, "task.completed", json!({})),
            ];
            if from.as_deref() != Some("0") {
                list.truncate(1);
            }
            Stream::new(futures_util::stream::iter(list))
        };
        let app = axum::Router::new()
            .route(
                "/v1/tasks",
                post(|| async {
                    (
                        axum::http::StatusCode::ACCEPTED,
                        axum::Json(json!({"task_id": "t1", "deduplicated": true})),
                    )
                }),
            )
            .route(
                "/v1/tasks/t1",
                get(|| async { axum::Json(json!({"task_id": "t1", "status": "in_progress"})) }),
            )
            .route("/v1/events", get(events));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port");
        let addr = listener.local_addr().expect("its address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        let (code, out) = tokio::task::spawn_blocking(move || {
            let client = test_client(&format!("http://{addr}"), "token");
            let mut out = Vec::new();
            let code = new_task(&client, &json!({"objective": "x"}), None, true, &mut out)
                .expect("followed to the end");
            (code, out)
        })
        .await
        .expect("the client thread");
        assert_eq!(code, ExitCode::SUCCESS);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "t1\n== answer (qa-1) ==\nforty-two\n-- answer completed\ntask completed\n"
        );
    }

    #[test]
    fn context_must_be_an_object() {
        assert!(json_object(r#"{"file_paths":["a"]}"#).is_ok());
        assert!(json_object("[1]").is_err());
        assert!(json_object("{").is_err());
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
        assert_eq!(exit_for("completed"), ExitCode::SUCCESS);
        assert_eq!(exit_for("dead_letter"), ExitCode::from(1));
    }
}
