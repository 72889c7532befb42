//! TLS, both ways, with one provider (rustls on ring) and one trust store:
//! - **listeners** speak https and wss on their own port when given a certificate and key (PEM);
//!   the files are read again when they change (cert-manager and certbot replace them in place),
//!   and the next handshake uses the new pair while open connections carry on;
//! - **clients** (webhook deliveries, gRPC to the store and auth, NATS, the CLI) trust the
//!   system's roots plus the CA bundle named by `--ca-file` / `SSL_CERT_FILE`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tracing::{info, warn};

/// How often certificate files are looked at for a change.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A listener's certificate, for https and wss on the listener's own port.
#[derive(clap::Args, Debug, Clone, Default)]
#[group(id = "tls")]
pub struct Args {
    /// PEM certificate chain for https/wss on this port (leaf first); read again when it changes.
    #[arg(long = "tls-cert", env = "EVENTBUS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long = "tls-key", env = "EVENTBUS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl Args {
    /// The acceptor for these files, or `None` when TLS is off. Must be called inside a Tokio
    /// runtime: it starts the task that watches the files.
    pub fn acceptor(&self) -> Result<Option<Acceptor>, String> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Acceptor::watching(cert, key).map(Some),
            (None, None) => Ok(None),
            _ => Err("--tls-cert and --tls-key go together".into()),
        }
    }

    /// The scheme clients use for this listener.
    pub fn scheme(&self) -> &'static str {
        if self.tls_cert.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// Accepts TLS connections with the certificate the files hold now.
#[derive(Clone)]
pub struct Acceptor {
    inner: tokio_rustls::TlsAcceptor,
}

impl Acceptor {
    /// Loads `cert` and `key`, and re-reads them every [`RELOAD_EVERY`] while the acceptor lives.
    pub fn watching(cert: &Path, key: &Path) -> Result<Acceptor, String> {
        let files = Arc::new(Watched::load(cert, key)?);
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|err| err.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(files.clone());
        // HTTP/2 for the API and gRPC; HTTP/1.1 for WebSockets and older clients.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let weak = Arc::downgrade(&files);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(files) = weak.upgrade() else { return };
                files.reload_if_changed();
            }
        });
        Ok(Acceptor {
            inner: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }

    pub fn accept<IO>(&self, io: IO) -> tokio_rustls::Accept<IO>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        self.inner.accept(io)
    }
}

/// The certificate files and what was last loaded from them.
#[derive(Debug)]
struct Watched {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    /// The files' bytes, to tell a change (mtimes are unreliable across a Secret's symlink swap).
    bytes: (Vec<u8>, Vec<u8>),
    certified: Arc<CertifiedKey>,
}

impl Watched {
    fn load(cert: &Path, key: &Path) -> Result<Watched, String> {
        let bytes = read_pair(cert, key)?;
        let certified = certified(&bytes, cert, key)?;
        Ok(Watched {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new(Loaded {
                bytes,
                certified: Arc::new(certified),
            }),
        })
    }

    fn reload_if_changed(&self) {
        let Ok(bytes) = read_pair(&self.cert, &self.key) else {
            // Mid-replacement (one file gone for a moment): the next look will tell.
            return;
        };
        if self.current.read().is_ok_and(|c| c.bytes == bytes) {
            return;
        }
        match certified(&bytes, &self.cert, &self.key) {
            Ok(certified) => {
                if let Ok(mut current) = self.current.write() {
                    *current = Loaded {
                        bytes,
                        certified: Arc::new(certified),
                    };
                    info!(cert = %self.cert.display(), "TLS certificate reloaded");
                }
            }
            // A certificate written before its key (or the reverse) does not match yet: keep
            // serving the old pair, and look again.
            Err(why) => warn!(%why, "TLS certificate changed but cannot be used yet"),
        }
    }
}

impl ResolvesServerCert for Watched {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.certified.clone())
    }
}

fn read_pair(cert: &Path, key: &Path) -> Result<(Vec<u8>, Vec<u8>), String> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|err| format!("cannot read {}: {err}", path.display()))
    };
    Ok((read(cert)?, read(key)?))
}

fn certified(bytes: &(Vec<u8>, Vec<u8>), cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_slice_iter(&bytes.0)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("{}: not a PEM certificate chain: {err}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in it", cert.display()));
    }
    let private = PrivateKeyDer::from_pem_slice(&bytes.1)
        .map_err(|err| format!("{}: not a PEM private key: {err}", key.display()))?;
    let certified = CertifiedKey::from_der(chain, private, &provider())
        .map_err(|err| format!("{}: {err}", key.display()))?;
    certified.keys_match().map_err(|err| {
        format!(
            "{} is not the key of {}: {err}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(certified)
}

/// Whom the bus's clients trust: the system's roots plus a CA bundle of the operator's.
#[derive(clap::Args, Debug, Clone, Default)]
#[group(id = "trust")]
pub struct Trust {
    /// PEM CA bundle trusted beside the system's roots by every client of the bus (webhooks,
    /// gRPC to the store and auth, NATS over tls://).
    #[arg(long = "ca-file", env = "SSL_CERT_FILE")]
    pub ca_file: Option<PathBuf>,
}

/// Where distributions keep their bundle of system roots.
const SYSTEM_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

impl Trust {
    pub fn with_ca_file(ca_file: Option<PathBuf>) -> Trust {
        Trust { ca_file }
    }

    /// Every trusted root, DER. Fails only when `ca_file` is given and unreadable or empty.
    pub fn roots(&self) -> Result<Vec<CertificateDer<'static>>, String> {
        let mut roots = Vec::new();
        if std::env::var_os("SSL_CERT_FILE").is_some() {
            // rustls-native-certs, like OpenSSL, reads SSL_CERT_FILE *instead of* the system's
            // bundle; we promise both.
            if let Some(bundle) = SYSTEM_BUNDLES.iter().find(|p| Path::new(p).exists()) {
                roots.extend(
                    CertificateDer::pem_file_iter(bundle)
                        .into_iter()
                        .flatten()
                        .flatten(),
                );
            }
        } else {
            let native = rustls_native_certs::load_native_certs();
            for err in &native.errors {
                warn!(cause = %err, "some system roots could not be read");
            }
            roots.extend(native.certs);
        }
        if let Some(path) = &self.ca_file {
            let own = CertificateDer::pem_file_iter(path)
                .map_err(|err| format!("cannot read {}: {err}", path.display()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|err| format!("{}: not a PEM bundle: {err}", path.display()))?;
            if own.is_empty() {
                return Err(format!("{}: no certificate in it", path.display()));
            }
            roots.extend(own);
        }
        Ok(roots)
    }

    /// A rustls client configuration trusting [`Trust::roots`] (for reqwest, WebSockets, NATS).
    pub fn client_config(&self) -> Result<rustls::ClientConfig, String> {
        self.client_config_with(Vec::new())
    }

    /// [`Trust::client_config`] trusting `extra` too (a CA named for one connection, as
    /// PostgreSQL's `sslrootcert`).
    pub fn client_config_with(
        &self,
        extra: Vec<CertificateDer<'static>>,
    ) -> Result<rustls::ClientConfig, String> {
        let mut store = rustls::RootCertStore::empty();
        let mut roots = self.roots()?;
        roots.extend(extra);
        let (_added, _skipped) = store.add_parsable_certificates(roots);
        Ok(rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|err| err.to_string())?
            .with_root_certificates(store)
            .with_no_client_auth())
    }

    /// The same trust for tonic's gRPC channels.
    pub fn grpc_config(&self) -> Result<tonic::transport::ClientTlsConfig, String> {
        use base64::Engine;
        let pems = self.roots()?.into_iter().map(|der| {
            let body = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
            let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
            for line in body.as_bytes().chunks(64) {
                pem.push_str(&String::from_utf8_lossy(line));
                pem.push('\n');
            }
            pem.push_str("-----END CERTIFICATE-----\n");
            tonic::transport::Certificate::from_pem(pem)
        });
        Ok(tonic::transport::ClientTlsConfig::new().ca_certificates(pems))
    }
}

/// A gRPC endpoint for `url`, with TLS when it is `https://`.
pub fn grpc_endpoint(url: &str, trust: &Trust) -> Result<tonic::transport::Endpoint, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|err| format!("bad URL {url}: {err}"))?;
    if url.starts_with("https://") {
        endpoint
            .tls_config(trust.grpc_config()?)
            .map_err(|err| format!("TLS for {url}: {err}"))
    } else {
        Ok(endpoint)
    }
}
