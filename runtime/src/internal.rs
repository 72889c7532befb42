//! The internal credential: a shared secret that the store's and auth's gRPC demand of every
//! caller (ingest, gateways, auth itself), so that reaching their port is not enough to append
//! events or forge presence. Callers send it as `authorization: Bearer <secret>`; it is compared in
//! constant time and never logged. The all-in-one process makes a random one for itself.

use std::path::PathBuf;
use std::sync::Arc;

use subtle::ConstantTimeEq;

#[derive(clap::Args, Clone, Default)]
#[group(id = "internal")]
pub struct Args {
    /// The internal credential shared by every service (at least 16 characters). Prefer the file.
    #[arg(
        long = "internal-token",
        env = "EVENTBUS_INTERNAL_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// A file holding the internal credential (a mounted Secret).
    #[arg(long = "internal-token-file", env = "EVENTBUS_INTERNAL_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

impl std::fmt::Debug for Args {
    // The secret never reaches a log line, even through `{:?}` of a whole configuration.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Args")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .finish()
    }
}

/// The internal credential: what a client sends, what a server demands.
#[derive(Clone)]
pub struct Credential(Arc<str>);

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential(<redacted>)")
    }
}

impl Credential {
    /// A random secret, for a process that is every service at once.
    pub fn random_secret() -> String {
        let bytes: [u8; 32] = rand::random();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn new(secret: &str) -> Result<Credential, String> {
        let secret = secret.trim();
        if secret.len() < 16 {
            return Err("the internal credential must be at least 16 characters".into());
        }
        Ok(Credential(secret.into()))
    }

    fn header(&self) -> String {
        format!("Bearer {}", self.0)
    }

    /// Whether a request's `authorization` header holds this credential.
    pub fn admits(&self, header: Option<&[u8]>) -> bool {
        let expected = self.header();
        header.is_some_and(|h| bool::from(h.ct_eq(expected.as_bytes())))
    }

    /// Adds the credential to a gRPC request (a tonic interceptor).
    pub fn attach(
        &self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let value = self.header().parse().map_err(|_| {
            tonic::Status::internal("the internal credential is not a valid header")
        })?;
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}

impl tonic::service::Interceptor for Credential {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        self.attach(request)
    }
}

impl Args {
    /// The configured credential; an error names the variables when there is none, or when it
    /// cannot be read.
    pub fn credential(&self) -> Result<Credential, String> {
        if let Some(path) = &self.token_file {
            let secret = std::fs::read_to_string(path)
                .map_err(|err| format!("EVENTBUS_INTERNAL_TOKEN_FILE {}: {err}", path.display()))?;
            return Credential::new(&secret);
        }
        match &self.token {
            Some(secret) => Credential::new(secret),
            None => Err(
                "set EVENTBUS_INTERNAL_TOKEN_FILE (or EVENTBUS_INTERNAL_TOKEN): the internal gRPC APIs accept only callers holding that credential".into(),
            ),
        }
    }
}

/// Wraps the gRPC routes of a server so that only holders of `credential` reach them; others get
/// `UNAUTHENTICATED`.
pub fn require(router: axum::Router, credential: Credential) -> axum::Router {
    router.layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| {
            let credential = credential.clone();
            async move {
                let header = request
                    .headers()
                    .get(axum::http::header::AUTHORIZATION)
                    .map(|v| v.as_bytes());
                if credential.admits(header) {
                    next.run(request).await
                } else {
                    tonic::Status::unauthenticated(
                        "the internal credential is missing or wrong (EVENTBUS_INTERNAL_TOKEN_FILE)",
                    )
                    .into_http()
                }
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_only_the_credential_and_never_shows_it() {
        let credential = Credential::new("0123456789abcdef-secret").unwrap();
        assert!(credential.admits(Some(b"Bearer 0123456789abcdef-secret")));
        assert!(!credential.admits(Some(b"Bearer 0123456789abcdef-secreT")));
        assert!(!credential.admits(None));
        assert!(!format!("{credential:?}").contains("secret"));
        let args = Args {
            token: Some("0123456789abcdef-secret".into()),
            token_file: None,
        };
        assert!(!format!("{args:?}").contains("secret"));
        assert!(Credential::new("short").is_err());
        assert!(Args::default().credential().is_err());
        assert_ne!(Credential::random_secret(), Credential::random_secret());
        assert!(Credential::new(&Credential::random_secret()).is_ok());
    }
}
