//! The `driftwatch.v1` API: messages and the agent and query services.
#![allow(missing_docs, clippy::doc_lazy_continuation, clippy::large_enum_variant)]

/// Generated from `proto/driftwatch/v1/driftwatch.proto`.
pub mod v1 {
    tonic::include_proto!("driftwatch.v1");
}
