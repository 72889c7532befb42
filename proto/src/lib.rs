//! The gRPC contracts between eventbus services (tonic/prost), generated at build time from
//! `protos/` with a vendored `protoc`. The public JSON event model is not re-declared here: events
//! travel as the opaque JSON bytes the model crate produced.

pub mod store {
    tonic::include_proto!("eventbus.store.v1");
}

pub mod auth {
    tonic::include_proto!("eventbus.auth.v1");
}
