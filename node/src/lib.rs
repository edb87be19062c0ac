//! The swarm node: composition root and the only crate with HTTP or a CLI.
//!
//! - `node`: [`Node::start`] wires config, store, auth and gateway into a [`NodeHandle`].
//! - `gateway`: the axum router with its middleware (request ids, authn, RBAC, bulkheads,
//!   timeouts, audit) and routes.
//! - `auth` (JWT and API keys, revocation), `jwt` (EdDSA tokens), `policy` (RBAC), `error`
//!   ([`AppError`]), `metrics` (Prometheus text).
//! - `init`: `swarm init` (cluster CA, node folders, keys, admin token); `cli`: the `swarm` command.

pub mod auth;
pub mod cli;
pub mod cluster;
pub mod error;
pub mod gateway;
pub mod inference;
pub mod init;
pub mod jwt;
pub mod metrics;
pub mod node;
pub mod policy;
pub mod server;

pub use error::AppError;
pub use node::{Node, NodeError, NodeHandle};
