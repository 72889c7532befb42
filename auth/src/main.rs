//! `eventbus-auth`: the identity service as its own process.

use eventbus_runtime::{Shutdown, telemetry};

#[derive(clap::Parser)]
#[command(
    name = "eventbus-auth",
    about = "The eventbus identity service: tokens and signing keys"
)]
struct Cli {
    #[command(flatten)]
    config: eventbus_auth::Config,
}

#[tokio::main]
async fn main() {
    let cli: Cli = eventbus_runtime::parse_cli();
    telemetry::init();
    let shutdown = Shutdown::new();
    shutdown.on_signals();
    let result = async {
        let listener = eventbus_runtime::bind(cli.config.listen).await?;
        eventbus_auth::run(cli.config, listener, shutdown).await?;
        anyhow::Ok(())
    }
    .await;
    eventbus_runtime::exit_on_error("auth", result);
}
