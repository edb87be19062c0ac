//! The OpenAI-compatible API: `GET /v1/models`, `POST /v1/chat/completions`,
//! `POST /v1/completions`, with `stream: true` as server-sent events ending in `[DONE]`.
//! Requests run on the least-loaded node that serves the model; a client that disconnects
//! cancels its sequence there.

use std::convert::Infallible;

use axum::Extension;
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderValue;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use swarm_actors::inference::{Chunk, Generation, Input, Message, Request, Sampling as Params};

use super::extract::json_body;
use super::{AppState, AuditCtx, now_s};
use crate::auth::Principal;
use crate::error::AppError;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// A content part; only `text` parts are supported.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct Part {
    /// `text`.
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct MessageIn {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    #[schema(pattern = "^(system|developer|user|assistant|tool)$")]
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The sampling fields chat and completions requests share. Unknown fields are ignored, as
/// OpenAI clients send many this server has no use for.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct Sampling {
    /// Answer server-sent events, ending in `[DONE]`.
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    #[schema(minimum = 1)]
    max_tokens: Option<i64>,
    /// Wins over `max_tokens`.
    #[serde(default)]
    #[schema(minimum = 1)]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    #[schema(minimum = 0, maximum = 2)]
    temperature: Option<f32>,
    #[serde(default)]
    #[schema(exclusive_minimum = 0, maximum = 1)]
    top_p: Option<f32>,
    /// 0: no top-k cut.
    #[serde(default)]
    #[schema(minimum = 0)]
    top_k: Option<i64>,
    #[serde(default)]
    seed: Option<u64>,
    /// One stop string or several.
    #[serde(default)]
    stop: Option<Stop>,
    /// Only 1 is supported.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1)]
    n: Option<i64>,
    /// Extension (as llama-server): keep generating past the end-of-sequence token.
    #[serde(default)]
    ignore_eos: bool,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct ChatRequest {
    model: String,
    #[schema(min_items = 1)]
    messages: Vec<MessageIn>,
    #[serde(flatten)]
    sampling: Sampling,
}

/// One prompt (a list of exactly one is accepted too).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
enum PromptIn {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct CompletionRequest {
    model: String,
    prompt: PromptIn,
    #[serde(flatten)]
    sampling: Sampling,
}

impl Sampling {
    /// The request's sampling parameters; without `max_tokens` the serving node's default
    /// applies.
    fn params(&self) -> Result<Params, AppError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(AppError::invalid_field("n", "only n = 1 is supported"));
        }
        let (field, asked) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => ("max_completion_tokens", Some(m)),
            (None, m) => ("max_tokens", m),
        };
        let max_tokens = match asked {
            None => None,
            Some(m) if m < 1 => return Err(AppError::invalid_field(field, "must be at least 1")),
            Some(m) => Some(u32::try_from(m).unwrap_or(u32::MAX)),
        };
        let top_k = match self.top_k {
            None => 0,
            Some(k) if k < 0 => return Err(AppError::invalid_field("top_k", "must be 0 or more")),
            Some(k) => u32::try_from(k).unwrap_or(u32::MAX),
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        Ok(Params {
            max_tokens,
            temperature: self.temperature.unwrap_or(1.0),
            top_k,
            top_p: self.top_p.unwrap_or(1.0),
            seed: self.seed,
            stop,
            ignore_eos: self.ignore_eos,
        })
    }

    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

fn messages(input: Vec<MessageIn>) -> Result<Vec<Message>, AppError> {
    if input.is_empty() {
        return Err(AppError::invalid_field(
            "messages",
            "must hold at least one message",
        ));
    }
    let mut out = Vec::with_capacity(input.len());
    for (i, m) in input.into_iter().enumerate() {
        if !["system", "developer", "user", "assistant", "tool"].contains(&m.role.as_str()) {
            return Err(AppError::invalid_field(
                format!("messages[{i}].role"),
                format!(
                    "`{}` is not a role (system, developer, user, assistant, tool)",
                    m.role
                ),
            ));
        }
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.into_iter().enumerate() {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        _ => {
                            return Err(AppError::invalid_field(
                                format!("messages[{i}].content[{j}]"),
                                "only text content parts are supported",
                            ));
                        }
                    }
                }
                text
            }
        };
        let role = if m.role == "developer" {
            "system".into()
        } else {
            m.role
        };
        out.push(Message { role, content });
    }
    Ok(out)
}

/// RBAC for using `model`, and the model field present.
fn admit(s: &AppState, ctx: &AuditCtx, who: &Principal, model: &str) -> Result<(), AppError> {
    s.authorize(ctx, who, "inference.use", &format!("models/{model}"), None)?;
    if model.is_empty() {
        return Err(AppError::invalid_field("model", "is required"));
    }
    Ok(())
}

/// Models served anywhere in the cluster now.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "inference",
    responses((status = 200, description = "OpenAI model list, with the nodes serving each model", body = super::openapi::schemas::ModelList)),
    extensions(("x-permission" = json!("inference.use")))
)]
pub(super) async fn models(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(ctx): Extension<AuditCtx>,
) -> Result<Json<Value>, AppError> {
    s.authorize(&ctx, &who, "inference.use", "models", None)?;
    let data: Vec<Value> = s
        .inference
        .api()
        .models()
        .into_iter()
        .map(|m| {
            json!({"id": m.name, "object": "model", "created": 0, "owned_by": "swarm", "nodes": m.nodes})
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

/// OpenAI chat completion, on the least-loaded node serving the model.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "inference",
    request_body = ChatRequest,
    responses((status = 200, description = "The completion; with `stream: true`, server-sent events of `chat.completion.chunk` objects ending in `[DONE]`", content(
        (super::openapi::schemas::ChatCompletion = "application/json"),
        (String = "text/event-stream")
    ))),
    extensions(("x-permission" = json!("inference.use")))
)]
pub(super) async fn chat_completions(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(ctx): Extension<AuditCtx>,
    body: Body,
) -> Result<Response, AppError> {
    let req: ChatRequest = json_body(body, s.body_limit, s.inference_body_deadline).await?;
    admit(&s, &ctx, &who, &req.model)?;
    let params = req.sampling.params()?;
    let input = Input::Chat(messages(req.messages)?);
    run(&s, Kind::Chat, req.model, input, params, &req.sampling).await
}

/// OpenAI text completion of one prompt; the same sampling fields as chat.
#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "inference",
    request_body = CompletionRequest,
    responses((status = 200, description = "The completion; with `stream: true`, server-sent events of `text_completion` objects ending in `[DONE]`", content(
        (super::openapi::schemas::TextCompletion = "application/json"),
        (String = "text/event-stream")
    ))),
    extensions(("x-permission" = json!("inference.use")))
)]
pub(super) async fn completions(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(ctx): Extension<AuditCtx>,
    body: Body,
) -> Result<Response, AppError> {
    let req: CompletionRequest = json_body(body, s.body_limit, s.inference_body_deadline).await?;
    admit(&s, &ctx, &who, &req.model)?;
    let prompt = match req.prompt {
        PromptIn::One(p) => p,
        PromptIn::Many(mut v) if v.len() == 1 => v.remove(0),
        PromptIn::Many(_) => {
            return Err(AppError::invalid_field(
                "prompt",
                "give one prompt (batches of prompts are not supported)",
            ));
        }
    };
    if prompt.is_empty() {
        return Err(AppError::invalid_field("prompt", "is empty"));
    }
    let params = req.sampling.params()?;
    run(
        &s,
        Kind::Completion,
        req.model,
        Input::Prompt(prompt),
        params,
        &req.sampling,
    )
    .await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// What every chunk of one response shares.
struct Shape {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

impl Shape {
    fn object(&self, stream: bool) -> &'static str {
        match (self.kind, stream) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn choice(&self, text: Option<&str>, finish: Option<&str>, first: bool) -> Value {
        match self.kind {
            Kind::Chat => {
                let mut delta = json!({});
                if first {
                    delta["role"] = json!("assistant");
                }
                if let Some(t) = text {
                    delta["content"] = json!(t);
                }
                json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null})
            }
            Kind::Completion => {
                json!({"index": 0, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": null})
            }
        }
    }

    fn chunk(&self, choices: Vec<Value>) -> Value {
        json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": choices})
    }
}

fn usage(prompt: u32, completion: u32) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

async fn run(
    s: &AppState,
    kind: Kind,
    model: String,
    input: Input,
    params: Params,
    sampling: &Sampling,
) -> Result<Response, AppError> {
    let started = s
        .inference
        .api()
        .generate(Request {
            model: model.clone(),
            input,
            sampling: params,
        })
        .await?;
    let mut id = [0u8; 12];
    rand::Rng::fill_bytes(&mut rand::rng(), &mut id);
    let prefix = if kind == Kind::Chat {
        "chatcmpl-"
    } else {
        "cmpl-"
    };
    let shape = Shape {
        kind,
        id: format!("{prefix}{}", hex::encode(id)),
        created: now_s(),
        model,
    };
    let node = HeaderValue::from_str(started.node()).ok();
    let mut resp = if sampling.stream {
        stream(shape, started, sampling.include_usage())
    } else {
        complete(shape, started).await?
    };
    if let Some(node) = node {
        resp.headers_mut().insert("x-swarm-node", node);
    }
    Ok(resp)
}

async fn complete(shape: Shape, mut started: Generation) -> Result<Response, AppError> {
    let mut text = String::new();
    let usage_of = loop {
        match started.next().await {
            Some(Chunk::Text(t)) => text.push_str(&t),
            Some(Chunk::Done(u)) => break u,
            Some(Chunk::Failed(f)) => return Err(f.into()),
            None => {
                return Err(AppError::ModelUnavailable(
                    "the generation ended early".into(),
                ));
            }
        }
    };
    let finish = usage_of.finish_reason.as_str();
    let (prompt, completion) = (usage_of.prompt_tokens, usage_of.completion_tokens);
    let choice = match shape.kind {
        Kind::Chat => {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": null})
        }
        Kind::Completion => {
            json!({"index": 0, "text": text, "finish_reason": finish, "logprobs": null})
        }
    };
    Ok(Json(json!({
        "id": shape.id, "object": shape.object(false), "created": shape.created, "model": shape.model,
        "choices": [choice], "usage": usage(prompt, completion),
    }))
    .into_response())
}

/// Server-sent events: one chunk per text piece, a final chunk with `finish_reason`, usage when
/// asked, then `[DONE]`. Dropping the response (client gone) drops the chunk receiver, which
/// cancels the sequence.
fn stream(shape: Shape, started: Generation, include_usage: bool) -> Response {
    struct St {
        shape: Shape,
        started: Generation,
        first: bool,
        include_usage: bool,
        pending: std::collections::VecDeque<SseEvent>,
        done: bool,
    }
    let st = St {
        shape,
        started,
        first: true,
        include_usage,
        pending: std::collections::VecDeque::new(),
        done: false,
    };
    let events = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(ev) = st.pending.pop_front() {
                return Some((Ok::<_, Infallible>(ev), st));
            }
            if st.done {
                return None;
            }
            let data = |v: Value| SseEvent::default().data(v.to_string());
            match st.started.next().await {
                Some(Chunk::Text(t)) => {
                    let c = st
                        .shape
                        .chunk(vec![st.shape.choice(Some(&t), None, st.first)]);
                    st.first = false;
                    st.pending.push_back(data(c));
                }
                Some(Chunk::Done(done)) => {
                    let text = (st.shape.kind == Kind::Chat && st.first).then_some("");
                    let finish = done.finish_reason.as_str();
                    let c = st
                        .shape
                        .chunk(vec![st.shape.choice(text, Some(finish), st.first)]);
                    st.pending.push_back(data(c));
                    if st.include_usage {
                        let mut u = st.shape.chunk(Vec::new());
                        u["usage"] = usage(done.prompt_tokens, done.completion_tokens);
                        st.pending.push_back(data(u));
                    }
                    st.pending.push_back(SseEvent::default().data("[DONE]"));
                    st.done = true;
                }
                Some(Chunk::Failed(f)) => {
                    let e: AppError = f.into();
                    st.pending.push_back(data(e.body()));
                    st.done = true;
                }
                None => {
                    let e = AppError::ModelUnavailable("the generation ended early".into());
                    st.pending.push_back(data(e.body()));
                    st.done = true;
                }
            }
        }
    });
    Sse::new(events).into_response()
}
