//! `eventbus probe <url>`: exits 0 when the URL answers 2xx, 1 otherwise. Container images have no
//! curl; healthchecks (compose, or anything that runs a command) use the binary itself.
//!
//! `https://` is probed without checking the certificate: a healthcheck dials 127.0.0.1 inside the
//! container, where the certificate's name (the public host) never matches, and it sends nothing
//! but `GET <path>` and reads nothing but the status line.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why a probe failed, in one line for the healthcheck's log.
pub async fn probe(url: &str, timeout: Duration) -> Result<u16, String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else {
        return Err(format!(
            "{url:?}: only http:// and https:// URLs can be probed"
        ));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|err| format!("cannot connect to {authority}: {err}"))?;
        if !tls {
            return status(stream, authority, path).await;
        }
        let host = authority
            .rsplit_once(':')
            .map_or(authority, |(host, _)| host)
            .trim_matches(['[', ']']);
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|err| format!("{host}: {err}"))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(any_certificate()));
        let stream = connector
            .connect(name, stream)
            .await
            .map_err(|err| format!("TLS with {authority}: {err}"))?;
        status(stream, authority, path).await
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

/// `GET path` over `stream`; the status code of the answer.
async fn status(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    authority: &str,
    path: &str,
) -> Result<u16, String> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
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
}

/// A TLS client that takes any certificate (signatures are still checked): see the module's note.
fn any_certificate() -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
