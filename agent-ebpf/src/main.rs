//! Driftwatch kernel sensors, built for `bpfel-unknown-none` by the agent's
//! `build.rs`. On the host this crate is an empty binary so that workspace
//! lints and builds pass over it.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
