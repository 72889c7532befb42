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

/// `eventbus probe` is what container healthchecks run: 0 for a 2xx answer, 1 otherwise.
#[test]
fn probe_exits_by_the_answer() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || {
        for status in ["200 OK", "503 Service Unavailable"] {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request);
            let _ = write!(stream, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let probe = |url: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_eventbus"))
            .args(["probe", url])
            .output()
            .expect("run eventbus probe")
            .status
            .code()
    };
    let url = format!("http://127.0.0.1:{port}/readyz");
    assert_eq!(probe(&url), Some(0), "200");
    assert_eq!(probe(&url), Some(1), "503");
    server.join().expect("server");
    assert_eq!(probe(&url), Some(1), "nobody listening");
    assert_eq!(probe("https://example.com/"), Some(1), "only http");
}
