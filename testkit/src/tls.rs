//! TLS for tests: a certificate authority made on the spot, certificates it signs, and an HTTPS
//! server on loopback, so that clients are tested against real TLS with a CA nobody else trusts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
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

    /// A new certificate (with a new key) for `localhost` and 127.0.0.1: `(cert, key)`.
    fn issue(&self) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("server certificate");
        (cert, key)
    }

    /// Writes a new server certificate and key as PEM to `cert` and `key`, each replaced whole
    /// (written aside, then renamed, as cert-manager and certbot do); returns the certificate, DER.
    pub fn write_server_pair(&self, cert: &Path, key: &Path) -> Vec<u8> {
        let (certificate, pair) = self.issue();
        let replace = |path: &Path, text: String| {
            let aside = path.with_extension("new");
            std::fs::write(&aside, text).expect("write PEM");
            std::fs::rename(&aside, path).expect("rename PEM");
        };
        replace(key, pair.serialize_pem());
        replace(cert, certificate.pem());
        certificate.der().to_vec()
    }

    /// A client configuration trusting this CA alone.
    pub fn client_config(&self) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(self.pem.as_bytes()) {
            roots.add(cert.expect("CA PEM")).expect("CA root");
        }
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
    }

    /// An HTTP client trusting this CA alone.
    pub fn http_client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .use_preconfigured_tls(self.client_config())
            .build()
            .expect("https client")
    }

    /// Connects to `addr` over TLS as `localhost`, offering `alpn`; returns the server's
    /// certificate (DER) and the protocol it chose.
    pub async fn handshake(
        &self,
        addr: std::net::SocketAddr,
        alpn: &[&[u8]],
    ) -> std::io::Result<(Vec<u8>, Option<Vec<u8>>)> {
        let mut config = self.client_config();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let tls = connector.connect(name, tcp).await?;
        let (_, session) = tls.get_ref();
        let cert = session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|c| c.to_vec())
            .unwrap_or_default();
        Ok((cert, session.alpn_protocol().map(|p| p.to_vec())))
    }

    /// A server configuration with a certificate for `localhost` and 127.0.0.1.
    pub fn server_config(&self) -> rustls::ServerConfig {
        let (cert, key) = self.issue();
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
