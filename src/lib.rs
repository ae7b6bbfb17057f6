//! kvmrun: a small, fast VMM on Linux KVM that doubles as a test host.
//!
//! `main.rs` only parses the command line; everything else lives here so
//! integration tests and later front ends (snapshot, test host) share it.

pub mod api;
pub mod backing;
pub mod boot;
pub mod bus;
pub mod config;
pub mod cpu;
pub mod diag;
pub mod gdb;
pub mod kvmcaps;
pub mod layout;
pub mod memory;
pub mod migrate;
pub mod pit;
pub mod platform;
pub mod rootfs;
pub mod sandbox;
pub mod serial_out;
pub mod shutdown;
pub mod snapshot;
pub mod term;
pub mod testhost;
pub mod vcpu;
pub mod vm;
pub mod vmm;
