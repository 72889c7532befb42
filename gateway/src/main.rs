//! `eventbus-gateway`: the WebSocket endpoint as its own process.

use eventbus_runtime::{Shutdown, telemetry};

#[derive(clap::Parser)]
#[command(name = "eventbus-gateway", about = "The eventbus WebSocket gateway")]
struct Cli {
    #[command(flatten)]
    config: eventbus_gateway::Config,
    #[command(flatten)]
    backbone: eventbus_runtime::backbone::Args,
}

#[tokio::main]
async fn main() {
    let cli: Cli = eventbus_runtime::parse_cli();
    telemetry::init();
    let shutdown = Shutdown::new();
    shutdown.on_signals();
    let result = async {
        let listener = eventbus_runtime::bind(cli.config.listen).await?;
        let backbone = cli.backbone.connect().await?;
        eventbus_gateway::run(cli.config, listener, backbone, shutdown).await?;
        anyhow::Ok(())
    }
    .await;
    eventbus_runtime::exit_on_error("gateway", result);
}
