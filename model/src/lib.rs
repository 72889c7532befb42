//! The public event model of eventbus: what an event is, how one is parsed and validated at the edge,
//! and how a stored event is laid out on the wire.
//!
//! Every service that touches an event goes through this crate, so the rules of the contract
//! (docs/protocol.md §1) are written once. It does no I/O and knows nothing of tokens or permissions: those
//! live in the router crate.
#![forbid(unsafe_code)]

pub mod event;
pub mod names;
pub mod stored;
pub mod whole;

pub use event::{Accepted, Appended, EventError, Limits, parse_event, parse_events};
pub use names::{NameError, validate_channel, validate_identity};
pub use stored::{StoredEvent, event_frame, seq_of, with_seq};
