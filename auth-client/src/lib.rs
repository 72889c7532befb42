//! What ingest and the gateways need of auth, without auth itself: the claims a token carries,
//! the [`Verifier`] that checks tokens locally against auth's published keys (auth is never asked
//! per request), and the gateway's presence [`presence::Reporter`].
#![forbid(unsafe_code)]

pub mod app_hooks;
pub mod claims;
pub mod presence;
pub mod signature;
pub mod verifier;

pub use claims::{Claims, TokenError, Verified};
pub use verifier::{GrpcKeySource, KeySource, StaticKeys, Verifier};
