//! Local token verification against the auth service's key set, cached; an unknown `kid` refreshes
//! the cache (at most once a second), which is how services pick up a rotated key.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::claims::{Claims, ISSUER, TokenError, Verified};

const REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// Where the public keys come from.
#[async_trait]
pub trait KeySource: Send + Sync + 'static {
    async fn fetch(&self) -> Result<JwkSet, String>;
}

/// Keys fetched from the auth service over gRPC.
pub struct GrpcKeySource {
    client: eventbus_proto::auth::auth_client::AuthClient<
        tonic::service::interceptor::InterceptedService<
            tonic::transport::Channel,
            eventbus_runtime::internal::Credential,
        >,
    >,
}

impl GrpcKeySource {
    /// Auth's keys as a service reaches them: the URL, credential and trust of its upstream
    /// settings.
    pub fn for_upstream(upstream: &eventbus_runtime::upstream::Args) -> Result<Self, String> {
        Self::new(&upstream.auth_url, upstream.credential()?, &upstream.trust)
    }

    /// `url` is the auth service's address, e.g. `http://127.0.0.1:7002`; nothing is dialled yet.
    pub fn new(
        url: &str,
        credential: eventbus_runtime::internal::Credential,
        trust: &eventbus_runtime::tls::Trust,
    ) -> Result<Self, String> {
        let endpoint = eventbus_runtime::tls::grpc_endpoint(url, trust)
            .map_err(|err| format!("auth url {url:?}: {err}"))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(5));
        Ok(Self {
            client: eventbus_proto::auth::auth_client::AuthClient::with_interceptor(
                endpoint.connect_lazy(),
                credential,
            ),
        })
    }
}

#[async_trait]
impl KeySource for GrpcKeySource {
    async fn fetch(&self) -> Result<JwkSet, String> {
        let response = self
            .client
            .clone()
            .get_keys(eventbus_proto::auth::GetKeysRequest {})
            .await
            .map_err(|status| status.message().to_owned())?;
        serde_json::from_str(&response.into_inner().jwks_json).map_err(|err| err.to_string())
    }
}

/// Most tokens remembered as verified. Publishers send the same token with every request, and an
/// Ed25519 check costs about 50 µs of CPU (a quarter of ingest's time per single-event request);
/// past this bound the memory is simply started afresh.
const VERIFIED_CACHE: usize = 16_384;

pub struct Verifier {
    source: Box<dyn KeySource>,
    /// token → what it grants; entries are valid until the token's own `exp`, and the whole cache
    /// is dropped whenever the key set changes.
    verified: Mutex<HashMap<Box<str>, Verified, foldhash::fast::RandomState>>,
    keys: RwLock<HashMap<String, DecodingKey>>,
    last_refresh: Mutex<Option<Instant>>,
    refresh: tokio::sync::Mutex<()>,
}

impl Verifier {
    pub fn new(source: impl KeySource) -> Self {
        Self {
            source: Box::new(source),
            verified: Mutex::new(HashMap::default()),
            keys: RwLock::new(HashMap::new()),
            last_refresh: Mutex::new(None),
            refresh: tokio::sync::Mutex::new(()),
        }
    }

    pub async fn verify(&self, token: &str) -> Result<Verified, TokenError> {
        let now = crate::claims::now_s();
        if let Some(known) = self
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
        {
            // Same strict rule as below: dead at `exp`.
            return if known.expires_at <= now {
                Err(TokenError::Expired)
            } else {
                Ok(known.clone())
            };
        }
        let verified = self.verify_signature(token).await?;
        let mut cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= VERIFIED_CACHE {
            cache.clear();
        }
        cache.insert(token.into(), verified.clone());
        Ok(verified)
    }

    async fn verify_signature(&self, token: &str) -> Result<Verified, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::EdDSA {
            return Err(TokenError::Malformed);
        }
        let kid = header.kid.ok_or(TokenError::Malformed)?;
        let key = match self.key(&kid) {
            Some(key) => key,
            None => {
                self.refresh().await?;
                self.key(&kid).ok_or(TokenError::UnknownKey)?
            }
        };
        let mut validation = Validation::new(Algorithm::EdDSA);
        // Our services share one clock source closely enough; a token is dead when it says so.
        validation.leeway = 0;
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "sub", "iss"]);
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|err| {
            use jsonwebtoken::errors::ErrorKind;
            match err.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                ErrorKind::InvalidIssuer
                | ErrorKind::MissingRequiredClaim(_)
                | ErrorKind::Json(_) => TokenError::InvalidClaims(err.to_string()),
                _ => TokenError::Malformed,
            }
        })?;
        // RFC 7519: `exp` is the time on or after which the token must not be accepted; the library
        // accepts the second of `exp` itself.
        if data.claims.exp <= crate::claims::now_s() {
            return Err(TokenError::Expired);
        }
        data.claims.into_verified()
    }

    fn key(&self, kid: &str) -> Option<DecodingKey> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(kid)
            .cloned()
    }

    async fn refresh(&self) -> Result<(), TokenError> {
        let _one_at_a_time = self.refresh.lock().await;
        {
            let last = self.last_refresh.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|at| at.elapsed() < REFRESH_INTERVAL) {
                return Ok(());
            }
        }
        let set = self
            .source
            .fetch()
            .await
            .map_err(TokenError::KeysUnavailable)?;
        let mut fresh = HashMap::new();
        for jwk in &set.keys {
            if let (Some(kid), Ok(key)) = (jwk.common.key_id.clone(), DecodingKey::from_jwk(jwk)) {
                fresh.insert(kid, key);
            }
        }
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        // A key that left the set must take its tokens with it.
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        *self.last_refresh.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        Ok(())
    }
}

/// A fixed key set, for tests and for the auth service verifying its own tokens.
pub struct StaticKeys(pub JwkSet);

#[async_trait]
impl KeySource for StaticKeys {
    async fn fetch(&self) -> Result<JwkSet, String> {
        Ok(self.0.clone())
    }
}
