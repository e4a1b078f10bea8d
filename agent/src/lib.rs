//! The Driftwatch node agent: loads the kernel sensors, attributes each
//! event to a process identity, and emits the events.
//!
//! Where things happen:
//! - [`sensors`]: preflight, BTF offsets, loading and attaching programs,
//!   the watch maps, and decoding ring buffer records;
//! - [`identity`]: the process table, cgroup/container/pod parsing, argv masking;
//! - [`policy`]: the policy file (shared with the collector);
//! - [`digest`]: content digests, mode and owner of watched files;
//! - [`event`]: the events as emitted;
//! - [`guard`]: the guardrails compiled for the kernel;
//! - [`stream`]: the spool and the stream to the collector.

pub mod attributes;
pub mod clock;
pub mod digest;
pub mod event;
pub mod guard;
pub mod identity;
pub mod metrics;
pub mod pods;
pub mod secrets;
pub mod structure;
pub use driftwatch_proto::policy;
pub mod sensors;
pub mod stream;
