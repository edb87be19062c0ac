//! The chaos suite. Two halves that check the same promises:
//!
//! - **The runner** starts real `swarm node` processes, drives a workload through their gateways
//!   while a seeded nemesis kills, pauses, partitions and degrades them, records every request and
//!   its outcome (the history), heals, and checks the history: nothing acknowledged lost, replicas
//!   identical, membership converged, no task lost or run twice, nothing erased readable.
//! - **The simulation** ([`sim`]) composes the sans-IO cores (gossip, the replication protocol, the
//!   task dispatcher) into one cluster in virtual time over an in-memory network with seeded
//!   crashes, partitions, loss, duplication and reordering, and checks the same invariants.

pub mod check;
pub mod cluster;
pub mod history;
pub mod nemesis;
pub mod report;
pub mod run;
pub mod scenario;
pub mod sim;
pub mod workload;

mod error;

pub use error::Error;
