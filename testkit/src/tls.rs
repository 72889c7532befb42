//! TLS for tests: a certificate authority made on the spot, certificates it signs, and an HTTPS
//! server on loopback, so that clients are tested against real TLS with a CA nobody else trusts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM: what a client is told to trust.
    pub pem: String,
}

impl TestCa {
    pub fn new() -> TestCa {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "eventbus test CA");
        let cert = params.self_signed(&key).expect("CA certificate");
        TestCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Writes the CA certificate to `dir/ca.pem` (for `SSL_CERT_FILE` and the like).
    pub fn write(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.pem).expect("write ca.pem");
        path
    }

    /// A server configuration with a certificate for `localhost` and 127.0.0.1.
    pub fn server_config(&self) -> rustls::ServerConfig {
        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("server certificate");
        let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der");
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .expect("server config")
    }

    /// Serves `app` over HTTPS on loopback; returns its base URL (`https://localhost:PORT`).
    pub async fn serve(&self, app: axum::Router) -> String {
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = tcp.local_addr().expect("addr").port();
        let listener = Tls {
            tcp,
            acceptor: TlsAcceptor::from(Arc::new(self.server_config())),
        };
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("https://localhost:{port}")
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

struct Tls {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for Tls {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, addr)) = self.tcp.accept().await else {
                continue;
            };
            // A client that fails the handshake (e.g. one that does not trust the CA) is dropped.
            if let Ok(tls) = self.acceptor.accept(stream).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
