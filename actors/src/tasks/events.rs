//! The node's event bus: task, agent and membership events for `/v1/events`. Bounded
//! everywhere: a ring of the latest events (for `Last-Event-ID` resumption) and a broadcast
//! channel whose slow receivers lag (the gateway tells them and drops them) instead of holding
//! the publisher up.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// Events kept for resumption.
pub const EVENT_RING: usize = 2048;
/// Events a subscriber may fall behind by before it is dropped.
pub const SUBSCRIBER_BUFFER: usize = 512;

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// This node's sequence number (the SSE id).
    pub id: u64,
    pub ts_ms: u64,
    /// `task.accepted`, `task.started`, `stage.started`, `stage.delta`, `stage.completed`,
    /// `stage.failed`, `task.completed`, `task.failed`, `task.cancelled`, `task.escalated`,
    /// `task.dead_letter`, `task.requeued`, `task.adopted`, `result.refused`, `agent.started`,
    /// `agent.restarted`, `agent.escalated`, `agent.moved`, `member.up`, `member.down`, ...
    pub kind: String,
    pub task: Option<String>,
    pub agent: Option<String>,
    /// The task's submitter: only they and admins see the event. `None`: every `events.read`.
    pub submitter: Option<String>,
    /// The node where it happened.
    pub node: String,
    pub data: serde_json::Value,
}

/// An event before the bus numbers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    pub kind: String,
    pub task: Option<String>,
    pub agent: Option<String>,
    pub submitter: Option<String>,
    pub node: String,
    pub data: serde_json::Value,
}

/// A subscription: the events after the asked-for id still in the ring, then the live ones.
#[derive(Debug)]
pub struct Subscription {
    pub replay: Vec<Arc<Event>>,
    /// `Err(Lagged)` when the subscriber fell behind: tell it and drop it.
    pub live: broadcast::Receiver<Arc<Event>>,
}

/// The bus. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct EventBus {
    next: AtomicU64,
    ring: Mutex<VecDeque<Arc<Event>>>,
    tx: broadcast::Sender<Arc<Event>>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(SUBSCRIBER_BUFFER);
        Self {
            next: AtomicU64::new(1),
            ring: Mutex::new(VecDeque::with_capacity(EVENT_RING)),
            tx,
        }
    }

    /// Number and publish `e`; returns its id.
    pub fn publish(&self, e: NewEvent) -> u64 {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        // Numbered under the ring's lock, so the ring stays in id order.
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let ev = Arc::new(Event {
            id,
            ts_ms: super::now_ms(),
            kind: e.kind,
            task: e.task,
            agent: e.agent,
            submitter: e.submitter,
            node: e.node,
            data: e.data,
        });
        if ring.len() == EVENT_RING {
            ring.pop_front();
        }
        ring.push_back(ev.clone());
        // No subscriber is fine.
        let _ = self.tx.send(ev);
        id
    }

    /// Subscribe; with `after`, first the events numbered above it that the ring still holds.
    pub fn subscribe(&self, after: Option<u64>) -> Subscription {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let live = self.tx.subscribe();
        let replay = match after {
            Some(after) => ring.iter().filter(|e| e.id > after).cloned().collect(),
            None => Vec::new(),
        };
        Subscription { replay, live }
    }

    /// The latest events, oldest first (at most `n`).
    pub fn recent(&self, n: usize) -> Vec<Arc<Event>> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let skip = ring.len().saturating_sub(n);
        ring.iter().skip(skip).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: &str) -> NewEvent {
        NewEvent {
            kind: kind.into(),
            task: None,
            agent: None,
            submitter: None,
            node: "n".into(),
            data: serde_json::Value::Null,
        }
    }

    #[tokio::test]
    async fn a_subscriber_resumes_after_its_last_id_and_a_slow_one_lags() {
        let bus = EventBus::new();
        let first = bus.publish(ev("a"));
        bus.publish(ev("b"));
        let s = bus.subscribe(Some(first));
        assert_eq!(s.replay.len(), 1);
        assert_eq!(s.replay[0].kind, "b");
        let mut slow = bus.subscribe(None).live;
        for _ in 0..SUBSCRIBER_BUFFER + 10 {
            bus.publish(ev("x"));
        }
        assert!(matches!(
            slow.recv().await,
            Err(broadcast::error::RecvError::Lagged(_))
        ));
        assert!(bus.recent(5).len() == 5);
    }
}
