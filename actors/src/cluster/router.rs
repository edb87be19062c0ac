//! The router: the one remotable actor each node exposes to its peers (process group
//! [`ROUTER_GROUP`]). Agents and services are reached through it; for now it answers pings.

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster_derive::RactorClusterMessage;

/// Process group every node's router joins.
pub const ROUTER_GROUP: &str = "swarm.router";

/// What a router accepts, locally or from a peer over the cluster session.
#[derive(RactorClusterMessage)]
pub enum RouterMsg {
    /// Echo: the reply is the number sent.
    #[rpc]
    Ping(u64, RpcReplyPort<u64>),
}

impl std::fmt::Debug for RouterMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouterMsg::Ping(n, _) => f.debug_tuple("Ping").field(n).finish(),
        }
    }
}

/// The router actor; its argument is this node's name (for the span).
#[derive(Debug)]
pub(crate) struct Router;

impl Actor for Router {
    type Msg = RouterMsg;
    type State = String;
    type Arguments = String;

    async fn pre_start(
        &self,
        _myself: ActorRef<RouterMsg>,
        node: String,
    ) -> Result<String, ActorProcessingErr> {
        Ok(node)
    }

    async fn handle(
        &self,
        _myself: ActorRef<RouterMsg>,
        msg: RouterMsg,
        node: &mut String,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RouterMsg::Ping(n, reply) => {
                if reply.send(n).is_err() {
                    tracing::debug!(node = %node, "ping caller gone");
                }
            }
        }
        Ok(())
    }
}
