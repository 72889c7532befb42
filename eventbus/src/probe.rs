//! `eventbus probe <url>`: exits 0 when the URL answers 2xx, 1 otherwise. Container images have no
//! curl; healthchecks (compose, or anything that runs a command) use the binary itself.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Why a probe failed, in one line for the healthcheck's log.
pub async fn probe(url: &str, timeout: Duration) -> Result<u16, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?}: only http:// URLs can be probed"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|err| format!("cannot connect to {authority}: {err}"))?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|err| err.to_string())?;
        let mut head = [0u8; 64];
        let mut read = 0;
        while read < 12 {
            let n = stream
                .read(&mut head[read..])
                .await
                .map_err(|err| err.to_string())?;
            if n == 0 {
                break;
            }
            read += n;
        }
        // "HTTP/1.1 200 OK"
        std::str::from_utf8(&head[..read])
            .ok()
            .and_then(|line| line.split(' ').nth(1))
            .and_then(|code| code.parse::<u16>().ok())
            .ok_or_else(|| "not an HTTP answer".to_owned())
    };
    let status = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))??;
    if (200..300).contains(&status) {
        Ok(status)
    } else {
        Err(format!("{url} answered {status}"))
    }
}
