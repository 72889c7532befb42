use std::net::SocketAddr;
use std::path::PathBuf;

/// Settings of the store service.
#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    /// Address for gRPC and the health endpoints.
    #[arg(
        long = "listen",
        env = "EVENTBUS_STORE_LISTEN",
        default_value = "127.0.0.1:7001"
    )]
    pub listen: SocketAddr,
    /// Directory of the log.
    #[arg(
        long = "data",
        env = "EVENTBUS_STORE_DATA",
        default_value = "./data/store"
    )]
    pub data: PathBuf,
    /// Size at which a log segment is sealed and a new one begun.
    #[arg(long = "segment-bytes", env = "EVENTBUS_STORE_SEGMENT_BYTES", default_value_t = 128 * 1024 * 1024)]
    pub segment_bytes: u64,
}

impl Config {
    /// A configuration for tests and the all-in-one mode: data in `data`, everything else default.
    pub fn with_data(data: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data,
            segment_bytes: 128 * 1024 * 1024,
        }
    }
}
