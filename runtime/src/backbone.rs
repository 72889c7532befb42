//! Backbone settings shared by the services that use it (store publishes, gateway subscribes).

use std::sync::Arc;

use eventbus_router::{Backbone, NatsBackbone};

#[derive(clap::Args, Clone)]
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
    /// NATS user of the bus (with EVENTBUS_NATS_PASSWORD): whoever may publish on the bus's
    /// subjects can show subscribers events, so production NATS requires credentials.
    #[arg(long = "nats-user", env = "EVENTBUS_NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password of the bus (prefer --nats-password-file).
    #[arg(
        long = "nats-password",
        env = "EVENTBUS_NATS_PASSWORD",
        hide_env_values = true
    )]
    pub nats_password: Option<String>,
    /// A file holding the NATS password (a mounted Secret), instead of EVENTBUS_NATS_PASSWORD.
    #[arg(long = "nats-password-file", env = "EVENTBUS_NATS_PASSWORD_FILE")]
    pub nats_password_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Args {
    // The password never reaches a log line, even through `{:?}` of a whole configuration.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Args")
            .field("nats_url", &self.nats_url)
            .field("subject_prefix", &self.subject_prefix)
            .field("nats_user", &self.nats_user)
            .field(
                "nats_password",
                &self.nats_password.as_ref().map(|_| "<redacted>"),
            )
            .field("nats_password_file", &self.nats_password_file)
            .finish()
    }
}

impl Args {
    /// Connects to NATS; a `tls://` URL is dialled over TLS trusting `trust`.
    pub async fn connect(&self, trust: &crate::tls::Trust) -> anyhow::Result<Arc<dyn Backbone>> {
        let from_file = match &self.nats_password_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|err| anyhow::anyhow!("cannot read {}: {err}", path.display()))?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
            ),
            None => None,
        };
        let password = self.nats_password.clone().or(from_file);
        let credentials = match (&self.nats_user, &password) {
            (Some(user), Some(password)) => Some((user.clone(), password.clone())),
            (None, None) => None,
            _ => {
                anyhow::bail!("set both EVENTBUS_NATS_USER and EVENTBUS_NATS_PASSWORD, or neither")
            }
        };
        let nats = NatsBackbone::connect_with(
            &self.nats_url,
            &self.subject_prefix,
            credentials,
            Some(trust.client_config().map_err(anyhow::Error::msg)?),
            std::sync::Arc::new(|| {
                crate::metrics::metrics().backbone_reconnects.inc();
            }),
        )
        .await?;
        Ok(Arc::new(nats))
    }
}
