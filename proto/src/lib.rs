//! The `driftwatch.v1` API: messages, the agent and query services, and the
//! time conversions its `*_unix_nanos` fields need.
#![allow(
    missing_docs,
    clippy::doc_lazy_continuation,
    clippy::large_enum_variant
)]

pub mod time;

/// Generated from `proto/driftwatch/v1/driftwatch.proto`.
pub mod v1 {
    tonic::include_proto!("driftwatch.v1");
}

pub mod policy;
