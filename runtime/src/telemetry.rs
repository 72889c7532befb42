//! Logging: `tracing` with an `EVENTBUS_LOG` / `RUST_LOG` filter, text by default, JSON when
//! `EVENTBUS_LOG_FORMAT=json`. Colours only on a terminal: a log written to a file or collected
//! from a container's output carries no escape codes.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Sets up logging once per process; a second call is a no-op.
pub fn init() {
    let filter = std::env::var("EVENTBUS_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_owned());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("EVENTBUS_LOG_FORMAT")
        .is_ok_and(|format| format.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none());
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
