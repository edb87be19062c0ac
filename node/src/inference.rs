//! Inference as the node wires it: this node's models (`swarm_gpu::LocalServer`, for `/health`,
//! `/metrics` and gossip) under the cluster's routing (`swarm_actors::ClusterInference`, which
//! the OpenAI routes call through [`swarm_actors::Inference`] and which serves peers' inference
//! streams), and the one HTTP concern: an inference failure as an [`AppError`].

use std::sync::Arc;

use swarm_actors::ClusterInference;
use swarm_actors::inference::{Failure, FailureCode, InferencePeers};
use swarm_config::NodeConfig;
use swarm_gpu::LocalServer;
use swarm_membership::{Membership, ModelMeta};

use crate::error::AppError;

impl From<Failure> for AppError {
    fn from(f: Failure) -> Self {
        let bad_request = |code| AppError::BadRequest {
            code,
            message: f.message.clone(),
            field: f.field.clone(),
        };
        match f.code {
            FailureCode::InvalidField => bad_request("invalid_field"),
            FailureCode::ContextLengthExceeded => bad_request("context_length_exceeded"),
            FailureCode::Overloaded => AppError::Overloaded {
                class: "inference",
                retry_after_s: 1,
            },
            FailureCode::ModelNotFound => AppError::ModelNotFound(f.message),
            FailureCode::ModelUnavailable => AppError::ModelUnavailable(f.message),
            FailureCode::Internal => AppError::Internal(f.message),
        }
    }
}

/// This node's models and the cluster's routing over them and its peers'.
#[derive(Debug)]
pub struct Inference {
    /// Routes requests (the OpenAI API's [`Inference::api`]) and serves peers' streams.
    pub cluster: Arc<ClusterInference>,
    /// The models this node serves.
    pub local: Arc<LocalServer>,
}

impl Inference {
    /// Starts loading every configured model in the background (the node serves meanwhile;
    /// `/health` says `loading`) and routes across `membership`'s members.
    pub async fn start(cfg: &NodeConfig, membership: Option<Membership>) -> Arc<Self> {
        let local = LocalServer::start(cfg).await;
        let peers = membership.map(|m| Arc::new(m) as Arc<dyn InferencePeers>);
        let cluster = ClusterInference::new(cfg.node.name.clone(), local.clone(), peers);
        Arc::new(Self { cluster, local })
    }

    /// A node with no models and no peers (tests of the gateway alone).
    pub fn standalone(node: &str) -> Arc<Self> {
        let local = LocalServer::new(node, Vec::new(), Default::default(), 16, None);
        let cluster = ClusterInference::new(node, local.clone(), None);
        Arc::new(Self { cluster, local })
    }

    /// What the OpenAI routes call.
    pub fn api(&self) -> &dyn swarm_actors::Inference {
        &*self.cluster
    }

    /// What this node advertises in gossip: its ready models and their load.
    pub fn advertised(&self) -> Vec<ModelMeta> {
        self.cluster.advertised()
    }
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;

    use super::*;

    #[test]
    fn failures_keep_their_status_code_and_field() {
        let cases = [
            (
                FailureCode::InvalidField,
                StatusCode::BAD_REQUEST,
                "invalid_field",
            ),
            (
                FailureCode::ContextLengthExceeded,
                StatusCode::BAD_REQUEST,
                "context_length_exceeded",
            ),
            (
                FailureCode::Overloaded,
                StatusCode::TOO_MANY_REQUESTS,
                "overloaded",
            ),
            (
                FailureCode::ModelNotFound,
                StatusCode::NOT_FOUND,
                "model_not_found",
            ),
            (
                FailureCode::ModelUnavailable,
                StatusCode::SERVICE_UNAVAILABLE,
                "model_unavailable",
            ),
            (
                FailureCode::Internal,
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
            ),
        ];
        for (code, status, name) in cases {
            let e: AppError = Failure {
                code,
                field: Some("max_tokens".into()),
                message: "m".into(),
            }
            .into();
            assert_eq!((e.status(), e.code()), (status, name), "{code:?}");
        }
        let e: AppError = Failure::invalid("temperature", "too hot").into();
        assert_eq!(e.body()["error"]["param"], "temperature");
    }
}
