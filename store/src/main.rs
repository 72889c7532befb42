//! `eventbus-store`: the durable event log as its own process.

#[derive(clap::Parser)]
#[command(
    name = "eventbus-store",
    about = "The eventbus durable event log (gRPC)"
)]
struct Cli {
    #[command(flatten)]
    config: eventbus_store::Config,
    #[command(flatten)]
    backbone: eventbus_runtime::backbone::Args,
}

#[tokio::main]
async fn main() {
    let cli: Cli = eventbus_runtime::parse_cli();
    eventbus_runtime::serve_main("store", |shutdown| async move {
        let listener = eventbus_runtime::bind(cli.config.listen).await?;
        let backbone = cli.backbone.connect(&cli.config.trust).await?;
        eventbus_store::run(cli.config, listener, backbone, shutdown).await?;
        Ok(())
    })
    .await;
}
