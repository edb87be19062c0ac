//! One actor session per live peer, driven by membership events.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use swarm_membership::{MemberEvent, MemberState, Membership};
use tokio::sync::broadcast;

use crate::{ActorCluster, StreamKind};

/// Keep one actor session per live peer: the node with the smaller name opens it (on a QUIC
/// stream of the peer connection); sessions close when the member goes down or leaves.
pub fn spawn_sessions(membership: Membership, actors: ActorCluster) {
    tokio::spawn(async move {
        let me = membership.name().to_string();
        let mut events = membership.subscribe();
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        let connecting: Arc<std::sync::Mutex<HashSet<String>>> = Arc::default();
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Ok(MemberEvent::Down(id) | MemberEvent::Left(id)) => actors.disconnect(&id.name),
                    Ok(MemberEvent::Up(id)) if me < id.name => {
                        // A member that comes back is a new process: its old session is stale.
                        actors.disconnect(&id.name);
                        open_session(&membership, &actors, &connecting, id.name);
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                _ = tick.tick() => {
                    let have: HashSet<String> = actors.sessions().into_iter().collect();
                    for m in membership.view().members {
                        let live = matches!(m.state, MemberState::Alive | MemberState::Suspect);
                        if live && me < m.name && !have.contains(&m.name) {
                            open_session(&membership, &actors, &connecting, m.name);
                        }
                    }
                }
            }
        }
    });
}

fn open_session(
    membership: &Membership,
    actors: &ActorCluster,
    connecting: &Arc<std::sync::Mutex<HashSet<String>>>,
    peer: String,
) {
    {
        let mut c = connecting.lock().unwrap_or_else(|e| e.into_inner());
        if !c.insert(peer.clone()) {
            return;
        }
    }
    let (membership, actors, connecting) = (membership.clone(), actors.clone(), connecting.clone());
    tokio::spawn(async move {
        let r = match membership
            .open_stream(&peer, StreamKind::Ractor.byte())
            .await
        {
            Ok((send, recv)) => actors
                .connect(peer.clone(), send, recv)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = r {
            tracing::debug!(%peer, error = %e, "actor session not opened (will retry)");
        }
        connecting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&peer);
    });
}
