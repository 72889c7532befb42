//! Backbone settings shared by the services that use it (store publishes, gateway subscribes).

use std::sync::Arc;

use eventbus_router::{Backbone, NatsBackbone};

#[derive(clap::Args, Debug, Clone)]
#[group(id = "backbone")]
pub struct Args {
    /// NATS server URL of the backbone.
    #[arg(
        long = "nats-url",
        env = "EVENTBUS_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,
    /// Subject prefix of channel subjects; deployments sharing one NATS give each bus its own.
    #[arg(long = "subject-prefix", env = "EVENTBUS_SUBJECT_PREFIX", default_value = eventbus_router::subject::DEFAULT_PREFIX)]
    pub subject_prefix: String,
}

impl Args {
    pub async fn connect(&self) -> anyhow::Result<Arc<dyn Backbone>> {
        let nats = NatsBackbone::connect_with(
            &self.nats_url,
            &self.subject_prefix,
            std::sync::Arc::new(|| {
                crate::metrics::metrics().backbone_reconnects.inc();
            }),
        )
        .await?;
        Ok(Arc::new(nats))
    }
}
