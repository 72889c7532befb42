//! `eventbus-auth`: the identity service as its own process.

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
    eventbus_runtime::serve_main("auth", |shutdown| async move {
        let listener = eventbus_runtime::bind(cli.config.listen).await?;
        eventbus_auth::run(cli.config, listener, shutdown).await?;
        Ok(())
    })
    .await;
}
