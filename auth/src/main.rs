//! `eventbus-auth`: the identity service as its own process.

#[derive(clap::Parser)]
#[command(
    name = "eventbus-auth",
    about = "The eventbus identity service: tokens, signing keys and presence"
)]
struct Cli {
    #[command(flatten)]
    config: eventbus_auth::Config,
    #[command(flatten)]
    backbone: eventbus_runtime::backbone::Args,
}

#[tokio::main]
async fn main() {
    let cli: Cli = eventbus_runtime::parse_cli();
    eventbus_runtime::serve_main("auth", |shutdown| async move {
        let listener = eventbus_runtime::bind(cli.config.listen).await?;
        let backbone = cli.backbone.connect(&cli.config.trust).await?;
        eventbus_auth::run(cli.config, listener, backbone, shutdown).await?;
        Ok(())
    })
    .await;
}
