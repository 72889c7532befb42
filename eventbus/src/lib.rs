//! The `eventbus` command: the all-in-one bus (`eventbus serve`), every service on its own
//! (`eventbus store|auth|ingest|gateway`), and later the command-line client.
//!
//! The all-in-one mode composes the same service functions the separate binaries run: store and
//! auth on loopback listeners reached over gRPC, the in-process backbone instead of NATS, and every
//! public endpoint on one port. No service knows which way it runs.
#![forbid(unsafe_code)]

pub mod cli;
pub mod offline;
pub mod probe;
pub mod serve;
