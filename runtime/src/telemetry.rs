//! Logging: `tracing` with an `EVENTBUS_LOG` / `RUST_LOG` filter, text by default, JSON when
//! `EVENTBUS_LOG_FORMAT=json`.

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
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
