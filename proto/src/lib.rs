//! The gRPC contracts between eventbus services, and the messages they send one another over the
//! backbone (tonic/prost), generated at build time from
//! `protos/` with a vendored `protoc`. The public JSON event model is not re-declared here: events
//! travel as the opaque JSON bytes the model crate produced.

pub mod store {
    tonic::include_proto!("eventbus.store.v1");

    /// gRPC metadata marking a refusal by quota (retrying will not help).
    pub const QUOTA_METADATA: &str = "eventbus-quota";
    /// gRPC metadata carrying the first retained seq of a truncated read.
    pub const FIRST_SEQ_METADATA: &str = "eventbus-first-seq";
    /// Most events one Append may carry.
    pub const MAX_APPEND_EVENTS: usize = 10_000;
    /// Most channels one Heads call may ask about.
    pub const MAX_HEADS: usize = 10_000;
    /// Largest gRPC message between the store and its clients.
    pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
}

pub mod auth {
    tonic::include_proto!("eventbus.auth.v1");
}

/// Presence reports, carried on the backbone rather than over gRPC (no service is generated).
pub mod presence {
    tonic::include_proto!("eventbus.presence.v1");

    /// The backbone topic of gateways' reports.
    pub const REPORTS_TOPIC: &str = "presence.reports";
    /// The backbone topic of requests for a full report.
    pub const RESYNC_TOPIC: &str = "presence.resync";
}
