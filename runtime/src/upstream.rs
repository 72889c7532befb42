//! Where a service finds the store and auth over gRPC (ingest and gateway both need them).

#[derive(clap::Args, Debug, Clone)]
#[group(id = "upstream")]
pub struct Args {
    /// gRPC address of the store.
    #[arg(
        long = "store-url",
        env = "EVENTBUS_STORE_URL",
        default_value = "http://127.0.0.1:7001"
    )]
    pub store_url: String,
    /// gRPC address of the auth service (for its signing keys).
    #[arg(
        long = "auth-url",
        env = "EVENTBUS_AUTH_URL",
        default_value = "http://127.0.0.1:7002"
    )]
    pub auth_url: String,
}
