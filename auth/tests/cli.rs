//! The binary starts its argument parsing cleanly and documents its settings.

#[test]
fn help_lists_every_setting() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_eventbus-auth"))
        .arg("--help")
        .output()
        .expect("run the binary");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(
        help.contains("EVENTBUS_"),
        "--help names the environment variables:\n{help}"
    );
}

#[test]
fn a_bad_setting_exits_64_naming_it() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_eventbus-auth"))
        .env("EVENTBUS_AUTH_LISTEN", "not-an-address")
        .output()
        .expect("run the binary");
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("listen"),
        "the message names the setting: {stderr}"
    );
}
