//! The crate map holds: the services that only call the store and auth (ingest, gateway) link
//! their clients, never the log engine or the auth service (docs/architecture.md "Crates").

use std::path::Path;

/// The names in a crate's `[dependencies]` section.
fn dependencies(krate: &str) -> Vec<String> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(krate)
        .join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    let table: toml::Table = text.parse().expect("TOML");
    table
        .get("dependencies")
        .and_then(|d| d.as_table())
        .map(|d| d.keys().cloned().collect())
        .unwrap_or_default()
}

#[test]
fn ingest_and_gateway_link_clients_not_engines() {
    for krate in ["ingest", "gateway"] {
        let deps = dependencies(krate);
        for engine in ["eventbus-store", "eventbus-auth"] {
            assert!(
                !deps.iter().any(|d| d == engine),
                "{krate} depends on {engine}; use its client crate"
            );
        }
        assert!(deps.iter().any(|d| d == "eventbus-store-client"), "{krate}");
        assert!(deps.iter().any(|d| d == "eventbus-auth-client"), "{krate}");
    }
    for client in ["store-client", "auth-client"] {
        let deps = dependencies(client);
        assert!(
            !deps
                .iter()
                .any(|d| d == "eventbus-store" || d == "eventbus-auth"),
            "{client} depends on an engine: {deps:?}"
        );
    }
}
