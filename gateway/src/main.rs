//! `eventbus-gateway`: the WebSocket endpoint as its own process.

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
    eventbus_runtime::serve_main("gateway", |shutdown| async move {
        let listener = eventbus_runtime::bind(cli.config.listen).await?;
        let backbone = cli.backbone.connect(&cli.config.upstream.trust).await?;
        eventbus_gateway::run(cli.config, listener, backbone, shutdown).await?;
        Ok(())
    })
    .await;
}
