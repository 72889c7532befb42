//! `eventbus-ingest`: the publishing HTTP API as its own process.

#[derive(clap::Parser)]
#[command(name = "eventbus-ingest", about = "The eventbus HTTP publishing API")]
struct Cli {
    #[command(flatten)]
    config: eventbus_ingest::Config,
}

#[tokio::main]
async fn main() {
    let cli: Cli = eventbus_runtime::parse_cli();
    eventbus_runtime::serve_main("ingest", |shutdown| async move {
        let listener = eventbus_runtime::bind(cli.config.listen).await?;
        eventbus_ingest::run(cli.config, listener, shutdown).await?;
        Ok(())
    })
    .await;
}
