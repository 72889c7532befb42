//! `eventbus`: the all-in-one bus, and each service on its own.

use clap::{CommandFactory, Parser, Subcommand};

/// mimalloc instead of glibc's malloc: the publish path allocates from every worker thread at
/// once, and glibc's arenas made a fifth of the CPU there malloc, free and their locks
/// (docs/benchmarks.md, issue 17).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "eventbus",
    version,
    about = "An end-to-end event bus for web applications"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every service in one process: local disk, in-process backbone, one port.
    Serve(eventbus::serve::Config),
    /// The durable event log (gRPC).
    Store {
        #[command(flatten)]
        config: eventbus_store::Config,
        #[command(flatten)]
        backbone: eventbus_runtime::backbone::Args,
    },
    /// The identity service: tokens, signing keys and presence.
    Auth {
        #[command(flatten)]
        config: eventbus_auth::Config,
        #[command(flatten)]
        backbone: eventbus_runtime::backbone::Args,
    },
    /// Webhook delivery and its API.
    Hooks {
        #[command(flatten)]
        config: eventbus_hooks::Config,
    },
    /// The HTTP publishing API.
    Ingest {
        #[command(flatten)]
        config: eventbus_ingest::Config,
    },
    /// Prints a token: a service token for the API key, or with --sub a client token; with
    /// --keys-dir signed here, without a bus; `token check JWT` verifies one.
    Token(eventbus::cli::TokenArgs),
    /// Adds a signing key to a key directory (it signs from auth's next start; see key rotation).
    Keygen(eventbus::offline::KeygenArgs),
    /// Publishes an event (data as JSON, or one event per stdin line); prints each ack.
    Pub(eventbus::cli::PubArgs),
    /// Prints a channel's events as JSON lines and follows it live (--after N for history).
    Tail(eventbus::cli::TailArgs),
    /// Registers, lists, shows and deletes webhooks.
    Webhooks(eventbus::cli::WebhooksArgs),
    /// Prints a complete configuration file: every setting of every role, with its default.
    Genconfig,
    /// Checks a configuration file: sections, keys and values (exit 0 when it is good, 64 if not).
    Checkconfig { file: std::path::PathBuf },
    /// Exits 0 when URL answers 2xx (for container healthchecks: `eventbus probe http://127.0.0.1:7003/readyz`).
    Probe {
        url: String,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 3)]
        timeout_s: u64,
    },
    /// The WebSocket gateway.
    Gateway {
        #[command(flatten)]
        config: eventbus_gateway::Config,
        #[command(flatten)]
        backbone: eventbus_runtime::backbone::Args,
    },
}

#[tokio::main]
async fn main() {
    let cli: Cli = eventbus_runtime::parse_cli();
    let client = match cli.command {
        Command::Token(args) => Some(eventbus::cli::token(args).await),
        Command::Keygen(args) => Some(eventbus::offline::keygen(args)),
        Command::Genconfig => {
            print!("{}", eventbus_runtime::config::generate(&Cli::command()));
            Some(Ok(()))
        }
        Command::Checkconfig { file } => Some(checkconfig(&file)),
        Command::Pub(args) => Some(eventbus::cli::publish(args).await),
        Command::Tail(args) => Some(eventbus::cli::tail(args).await),
        Command::Webhooks(args) => Some(eventbus::cli::webhooks(args).await),
        command => {
            run(command).await;
            None
        }
    };
    if let Some(outcome) = client {
        match outcome {
            Ok(()) => std::process::exit(0),
            Err(failure) => {
                eprintln!("eventbus: {}", failure.message);
                std::process::exit(failure.code);
            }
        }
    }
}

async fn run(command: Command) {
    if let Command::Probe { url, timeout_s } = &command {
        match eventbus::probe::probe(url, std::time::Duration::from_secs(*timeout_s)).await {
            Ok(_) => std::process::exit(0),
            Err(why) => {
                eprintln!("probe failed: {why}");
                std::process::exit(1);
            }
        }
    }
    eventbus_runtime::serve_main("eventbus", |shutdown| async move {
        match command {
            Command::Token(_)
            | Command::Keygen(_)
            | Command::Genconfig
            | Command::Checkconfig { .. }
            | Command::Pub(_)
            | Command::Tail(_)
            | Command::Webhooks(_) => {}
            Command::Serve(config) => {
                let listener = eventbus_runtime::bind(config.listen).await?;
                eventbus::serve::run(config, listener, shutdown).await?;
            }
            Command::Store { config, backbone } => {
                let listener = eventbus_runtime::bind(config.listen).await?;
                let backbone = backbone.connect(&config.trust).await?;
                eventbus_store::run(config, listener, backbone, shutdown).await?;
            }
            Command::Auth { config, backbone } => {
                let listener = eventbus_runtime::bind(config.listen).await?;
                let backbone = backbone.connect(&config.trust).await?;
                eventbus_auth::run(config, listener, backbone, shutdown).await?;
            }
            Command::Hooks { config } => {
                let listener = eventbus_runtime::bind(config.listen).await?;
                eventbus_hooks::run(config, listener, shutdown).await?;
            }
            Command::Ingest { config } => {
                let listener = eventbus_runtime::bind(config.listen).await?;
                eventbus_ingest::run(config, listener, shutdown).await?;
            }
            Command::Probe { .. } => {}
            Command::Gateway { config, backbone } => {
                let listener = eventbus_runtime::bind(config.listen).await?;
                let backbone = backbone.connect(&config.upstream.trust).await?;
                eventbus_gateway::run(config, listener, backbone, shutdown).await?;
            }
        }
        Ok(())
    })
    .await;
}

fn checkconfig(path: &std::path::Path) -> Result<(), eventbus::cli::Failure> {
    let command = Cli::command();
    let roles = eventbus_runtime::config::roles_of(&command);
    let checked = eventbus_runtime::config::File::read(path).and_then(|file| {
        file.check(&roles)?;
        // Every role's view of it, as `eventbus <role> --config FILE` would take it.
        for (role, role_command) in &roles {
            file.apply(role, (*role_command).clone(), &roles)?;
        }
        Ok(())
    });
    match checked {
        Ok(()) => {
            println!("{}: ok", path.display());
            Ok(())
        }
        Err(why) => Err(eventbus::cli::Failure {
            code: eventbus_runtime::EXIT_CONFIG,
            message: why,
        }),
    }
}
