//! The Driftwatch collector: ingests agent streams durably, stores events in
//! sled, and answers timeline queries.
//!
//! - [`store`]: keys, indexes, idempotent appends, retention;
//! - [`ingest`]: the agent stream service (hello, batches, acks, heartbeats);
//! - [`query`]: the timeline and agents services;
//! - [`units`]: durations and sizes on command lines.

pub mod ingest;
pub mod query;
pub mod store;
pub mod units;
