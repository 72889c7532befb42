//! `eventbus-hooks`: webhook delivery as its own process.

#[derive(clap::Parser)]
#[command(name = "eventbus-hooks", about = "The eventbus webhook service")]
struct Cli {
    #[command(flatten)]
    config: eventbus_hooks::Config,
}

#[tokio::main]
async fn main() {
    let cli: Cli = eventbus_runtime::parse_cli();
    eventbus_runtime::serve_main("hooks", |shutdown| async move {
        let listener = eventbus_runtime::bind(cli.config.listen).await?;
        eventbus_hooks::run(cli.config, listener, shutdown).await?;
        Ok(())
    })
    .await;
}
