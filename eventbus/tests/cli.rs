//! Every subcommand of the eventbus binary parses its settings cleanly.

#[test]
fn every_subcommand_has_help() {
    for sub in ["serve", "store", "auth", "ingest", "gateway"] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_eventbus"))
            .args([sub, "--help"])
            .output()
            .expect("run eventbus");
        assert!(
            output.status.success(),
            "{sub}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            String::from_utf8_lossy(&output.stdout).contains("EVENTBUS_"),
            "{sub}"
        );
    }
}
