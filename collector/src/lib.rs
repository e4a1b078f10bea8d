//! The Driftwatch collector: ingests agent streams durably, stores events in
//! sled, and answers timeline queries.
//!
//! - [`store`]: keys, indexes, idempotent appends, retention;
//! - [`ingest`]: the agent stream service (hello, batches, acks, heartbeats);
//! - [`query`]: the timeline and agents services;
//! - [`correlate`]: findings from events, policy, desired state and approvals;
//! - [`audit`]: the chained record of people's actions;
//! - [`control`]: the findings, approvals and baselines services, and principals;
//! - [`policy`]: the policy file the collector judges with and pushes;
//! - [`security`]: TLS, callers, roles, certificates;
//! - [`units`]: durations and sizes on command lines;
//! - [`statuses`]: the gRPC status of what the transport refuses.

pub mod audit;
pub mod control;
pub mod correlate;
pub mod export;
pub mod ingest;
pub mod json;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod query;
pub mod security;
pub mod statuses;
pub mod store;
pub mod units;
pub mod web;

/// Resolves once `closing` turns true; never when its sender is gone
/// without having said so (a service built without a stop signal).
pub async fn closed(closing: &mut tokio::sync::watch::Receiver<bool>) {
    if closing.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}
