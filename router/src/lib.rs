//! The routing rules of eventbus as a library: subscription patterns, who may subscribe or publish
//! where (docs/protocol.md §2), how channels map to backbone subjects, and the backbone itself (NATS in
//! production, an in-process bus in the all-in-one mode).
//!
//! It holds no state of its own beyond a backbone connection, and it does not verify tokens: the
//! auth crate turns a token into [`Grant`]s, this crate says what a grant allows.
#![forbid(unsafe_code)]

pub mod backbone;
pub mod pattern;
pub mod permissions;
pub mod subject;

pub use backbone::{
    Backbone, BackboneError, BackboneMessage, InProcessBackbone, Messages, NatsBackbone,
    Subscription,
};
pub use pattern::{PatternError, covers, matches, validate_pattern};
pub use permissions::{Denied, Grant, Role};
