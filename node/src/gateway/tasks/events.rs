//! `GET /v1/events`: the node's event bus as server-sent events.
//!
//! A subscriber first gets the events the bus's ring still holds after its `Last-Event-ID`,
//! then the live ones, each as `id` (the bus's sequence number), `event` (its kind) and `data`
//! (the event as JSON), filtered to what it may see: an admin everything, anyone else the
//! events of no submitter and their own. A stream holds one of the node's subscriber slots
//! ([`MAX_EVENT_SUBSCRIBERS`], 429 past it), never a bulkhead permit. A subscriber that falls
//! behind the bus's buffer gets one `dropped` event and the end of its stream, so a slow
//! reader never holds the node up; it reconnects with its last id to resume.

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use swarm_actors::tasks::{Event, Subscription};
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::broadcast::error::RecvError;

use super::service;
use crate::auth::Principal;
use crate::error::AppError;
use crate::gateway::extract::ApiQuery;
use crate::gateway::{AppState, AuditCtx};

/// Event streams one node serves at once.
pub const MAX_EVENT_SUBSCRIBERS: usize = 256;
/// A comment line this often keeps idle streams (and the proxies on their way) open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Query of `GET /v1/events`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(in crate::gateway) struct EventsQuery {
    /// Only the events of this task.
    #[serde(default)]
    task: Option<String>,
}

/// Which events one subscriber gets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(in crate::gateway) struct Filter {
    /// Only events of no submitter or of this one (`None`: every event; admins).
    pub(in crate::gateway) submitter: Option<String>,
    /// Only the events of this task.
    pub(in crate::gateway) task: Option<String>,
}

impl Filter {
    pub(in crate::gateway) fn admits(&self, e: &Event) -> bool {
        let visible = match (&self.submitter, &e.submitter) {
            (Some(me), Some(theirs)) => me == theirs,
            _ => true,
        };
        let of_task = self
            .task
            .as_ref()
            .is_none_or(|t| e.task.as_deref() == Some(t.as_str()));
        visible && of_task
    }
}

/// The `Last-Event-ID` header: the id of the last event the client got.
fn last_event_id(headers: &HeaderMap) -> Result<Option<u64>, AppError> {
    let Some(v) = headers.get("last-event-id") else {
        return Ok(None);
    };
    let text = v.to_str().unwrap_or("").trim();
    if text.is_empty() {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|_| AppError::invalid_field("Last-Event-ID", "the id of an event: a whole number"))
}

/// Task, agent and membership events, as server-sent events. Past the node's limit of
/// streams, 429 `overloaded`.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "tasks",
    params(
        EventsQuery,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event: the \
          events after it that the node still holds come first")
    ),
    responses(
        (status = 200, description = "Server-sent events, each `id: <id>`, `event: <kind>` \
          (`task.accepted`, `stage.started`, `stage.delta`, `stage.completed`, \
          `task.completed`, ...) and `data: <the event as JSON>`, with a comment line every \
          15 s. A subscriber that falls behind gets one `dropped` event and the end of the \
          stream: reconnect with `Last-Event-ID` to resume", content_type = "text/event-stream", body = String)
    ),
    extensions(("x-permission" = json!("events.read")))
)]
pub(in crate::gateway) async fn subscribe(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Extension(ctx): Extension<AuditCtx>,
    ApiQuery(q): ApiQuery<EventsQuery>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let resource = match &q.task {
        Some(t) => format!("events/tasks/{t}"),
        None => "events".into(),
    };
    s.authorize(&ctx, &who, "events.read", &resource, None)?;
    let tasks = service(&s)?;
    let after = last_event_id(&headers)?;
    let slot = s
        .event_subscribers
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            s.metrics.rejected("events");
            AppError::Overloaded {
                class: "events",
                retry_after_s: 1,
            }
        })?;
    let filter = Filter {
        submitter: (!s.sees_all(&who)).then(|| who.subject.clone()),
        task: q.task,
    };
    let feed = Feed::new(tasks.api.events().subscribe(after), filter, Some(slot));
    let stream = futures_util::stream::unfold(feed, |mut feed| async move {
        let ev = feed.next().await?;
        Some((Ok::<_, Infallible>(ev), feed))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}

/// One subscriber's stream: the replay, then the live events, filtered; ends after `dropped`.
#[derive(Debug)]
pub(in crate::gateway) struct Feed {
    replay: std::vec::IntoIter<Arc<Event>>,
    live: tokio::sync::broadcast::Receiver<Arc<Event>>,
    filter: Filter,
    /// The id of the last event sent (none is sent twice).
    last: u64,
    ended: bool,
    /// The subscriber slot, given back when the stream is dropped.
    _slot: Option<OwnedSemaphorePermit>,
}

impl Feed {
    pub(in crate::gateway) fn new(
        sub: Subscription,
        filter: Filter,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Self {
        Self {
            replay: sub.replay.into_iter(),
            live: sub.live,
            filter,
            last: 0,
            ended: false,
            _slot: slot,
        }
    }

    /// The next message for the subscriber; `None`: the stream ends.
    pub(in crate::gateway) async fn next(&mut self) -> Option<SseEvent> {
        if self.ended {
            return None;
        }
        for e in self.replay.by_ref() {
            if self.filter.admits(&e) {
                self.last = e.id;
                return Some(sse_event(&e));
            }
        }
        loop {
            match self.live.recv().await {
                Ok(e) if e.id > self.last && self.filter.admits(&e) => {
                    self.last = e.id;
                    return Some(sse_event(&e));
                }
                Ok(_) => {}
                Err(RecvError::Lagged(missed)) => {
                    self.ended = true;
                    return Some(dropped(missed, self.last));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

/// `id`, `event` and `data` of one event.
fn sse_event(e: &Event) -> SseEvent {
    // An event of strings, numbers and a JSON value always serializes; were it not to, the
    // subscriber still learns that an event happened.
    let data = serde_json::to_string(e).unwrap_or_else(|_| "{}".into());
    SseEvent::default()
        .id(e.id.to_string())
        .event(event_name(&e.kind))
        .data(data)
}

/// The kind as an SSE event name: a line break would end the field early (axum refuses it).
fn event_name(kind: &str) -> Cow<'_, str> {
    if kind.contains(['\r', '\n']) {
        Cow::Owned(kind.replace(['\r', '\n'], "_"))
    } else {
        Cow::Borrowed(kind)
    }
}

/// The last message to a subscriber that fell behind. It carries no id, so the client's
/// `Last-Event-ID` stays that of the last event it got.
fn dropped(missed: u64, last: u64) -> SseEvent {
    let data = serde_json::json!({
        "missed": missed,
        "last_id": last,
        "message": "this subscriber fell behind and is dropped; reconnect with Last-Event-ID to resume",
    });
    SseEvent::default().event("dropped").data(data.to_string())
}

#[cfg(test)]
mod tests {
    use swarm_actors::tasks::events::SUBSCRIBER_BUFFER;
    use swarm_actors::tasks::{EventBus, NewEvent};

    use super::*;

    fn ev(kind: &str, task: Option<&str>, submitter: Option<&str>) -> NewEvent {
        NewEvent {
            kind: kind.into(),
            task: task.map(String::from),
            agent: None,
            submitter: submitter.map(String::from),
            node: "n1".into(),
            data: serde_json::json!({}),
        }
    }

    async fn text(feed: &mut Feed) -> Option<String> {
        let e = tokio::time::timeout(Duration::from_secs(2), feed.next())
            .await
            .expect("an event in time")?;
        let body = Sse::new(futures_util::stream::iter([Ok::<_, Infallible>(e)])).into_response();
        let bytes = axum::body::to_bytes(body.into_body(), 1 << 16)
            .await
            .expect("body");
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }

    #[test]
    fn a_user_sees_their_own_and_unowned_events_of_the_task_asked() {
        let bus = EventBus::new();
        bus.publish(ev("a", Some("t1"), Some("alice")));
        bus.publish(ev("b", Some("t2"), Some("bob")));
        bus.publish(ev("c", None, None));
        bus.publish(ev("d", Some("t3"), Some("alice")));
        let all = bus.recent(10);
        let seen = |f: Filter| -> Vec<String> {
            all.iter()
                .filter(|e| f.admits(e))
                .map(|e| e.kind.clone())
                .collect()
        };
        let alice = |task: Option<&str>| Filter {
            submitter: Some("alice".into()),
            task: task.map(String::from),
        };
        assert_eq!(seen(Filter::default()), ["a", "b", "c", "d"]);
        assert_eq!(seen(alice(None)), ["a", "c", "d"]);
        assert_eq!(seen(alice(Some("t1"))), ["a"]);
        assert!(seen(alice(Some("t2"))).is_empty(), "bob's task");
    }

    #[tokio::test]
    async fn the_feed_replays_then_goes_live_then_drops_a_laggard() {
        let bus = EventBus::new();
        let first = bus.publish(ev("task.accepted", Some("t1"), None));
        bus.publish(ev("stage.started", Some("t1"), None));
        let mut feed = Feed::new(bus.subscribe(Some(first)), Filter::default(), None);
        let replayed = text(&mut feed).await.expect("the replay");
        assert!(
            replayed.starts_with("id: 2\nevent: stage.started\ndata: {"),
            "{replayed}"
        );
        bus.publish(ev("stage.delta", Some("t1"), None));
        let live = text(&mut feed).await.expect("a live event");
        assert!(live.starts_with("id: 3\nevent: stage.delta\n"), "{live}");
        for _ in 0..SUBSCRIBER_BUFFER + 5 {
            bus.publish(ev("stage.delta", Some("t1"), None));
        }
        let last = text(&mut feed).await.expect("the dropped notice");
        assert!(last.starts_with("event: dropped\ndata: {"), "{last}");
        assert!(last.contains("\"last_id\":3"), "{last}");
        assert!(feed.next().await.is_none(), "the stream ends");
    }

    #[test]
    fn event_names_never_break_the_stream() {
        assert_eq!(event_name("task.completed"), "task.completed");
        assert_eq!(event_name("a\nb\rc"), "a_b_c");
    }

    #[test]
    fn last_event_id_is_a_number() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                "last-event-id",
                axum::http::HeaderValue::from_str(v).expect("value"),
            );
            last_event_id(&h)
        };
        assert_eq!(last_event_id(&HeaderMap::new()).ok(), Some(None));
        assert_eq!(with("42").ok(), Some(Some(42)));
        assert_eq!(with(" ").ok(), Some(None));
        let e = with("x").expect_err("refused");
        assert!(
            matches!(&e, AppError::BadRequest { field: Some(f), .. } if f == "Last-Event-ID"),
            "{e:?}"
        );
    }
}
