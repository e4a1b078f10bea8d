//! The `driftwatch.v1` API: messages, the agent and query services, and the
//! time conversions its `*_unix_nanos` fields need.
#![allow(
    missing_docs,
    clippy::doc_lazy_continuation,
    clippy::large_enum_variant
)]

pub mod chain;
pub mod client;
pub mod ops;
pub mod raw;
pub mod structure;
pub mod time;

/// True for the file operations after which a file's content, mode or owner
/// may differ (`open` is not one: its `close_write` is). The agent reads a
/// file's state after them; the collector remembers who did them until it has.
pub fn completes_change(op: &str) -> bool {
    matches!(
        op,
        "close_write"
            | "write"
            | "rename"
            | "unlink"
            | "chmod"
            | "chown"
            | "truncate"
            | "link"
            | "symlink"
            | "setxattr"
            | "removexattr"
            | "utimes"
            | "setflags"
            | "mount"
            | "umount"
            | "munmap"
    )
}

/// Generated from `proto/driftwatch/v1/driftwatch.proto`.
pub mod v1 {
    tonic::include_proto!("driftwatch.v1");

    /// The encoded `FileDescriptorSet` of the API, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/driftwatch_descriptor.bin"));
}

pub mod policy;
