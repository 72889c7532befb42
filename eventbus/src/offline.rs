//! Keys and tokens without a running bus: `eventbus keygen` adds a signing key to a key directory,
//! `eventbus token --keys-dir` signs a token with it, and `eventbus token check` verifies a token
//! against a key directory or a running bus's key set and says what it grants and for how long.
//!
//! Exit codes of `token check`: 0 valid, 1 invalid (malformed, unknown key, bad signature or
//! claims), 2 expired, 69 the key set could not be fetched.

use std::path::PathBuf;

use eventbus_auth::keys::KeyRing;
use eventbus_auth_client::claims::{Claims, ISSUER, TokenError, now_s};
use eventbus_auth_client::verifier::{StaticKeys, Verifier};
use eventbus_router::Role;
use serde_json::{Value, json};

use crate::cli::{EXIT_UNAVAILABLE, Failure, Target, fail};

pub const EXIT_INVALID: i32 = 1;
pub const EXIT_EXPIRED: i32 = 2;

#[derive(clap::Args, Debug)]
pub struct KeygenArgs {
    /// The auth service's key directory (the newest key signs; every key verifies).
    #[arg(long, env = "EVENTBUS_AUTH_KEYS_DIR")]
    pub keys_dir: PathBuf,
}

/// `eventbus keygen`: prints the new key's file and id as JSON.
pub fn keygen(args: KeygenArgs) -> Result<(), Failure> {
    let (file, kid) = KeyRing::add(&args.keys_dir).map_err(|err| fail(1, err.to_string()))?;
    println!("{}", json!({"file": file, "kid": kid}));
    Ok(())
}

/// What an offline token is for (the same fields as `POST /v1/tokens`).
pub struct Request {
    pub sub: Option<String>,
    pub role: Option<Role>,
    pub subscribe: Option<Vec<String>>,
    pub publish: Option<Vec<String>>,
    pub ttl_s: Option<u64>,
}

/// Signs a token with the newest key of `keys_dir`. Defaults as the bus's own: a service token
/// grants `>` both ways, a client token nothing beyond its inbox, one hour.
pub fn mint(keys_dir: &std::path::Path, request: Request) -> Result<String, Failure> {
    let usage = |why: String| fail(eventbus_runtime::EXIT_CONFIG, why);
    let ring = KeyRing::load(keys_dir).map_err(|err| usage(err.to_string()))?;
    let sub = request
        .sub
        .ok_or_else(|| usage("--sub is needed to sign a token offline".into()))?;
    eventbus_model::validate_identity(&sub).map_err(|err| usage(format!("--sub {err}")))?;
    let role = request.role.unwrap_or(Role::Client);
    let everything = || vec![">".to_owned()];
    let (subscribe, publish) = match role {
        Role::Service => (
            request.subscribe.unwrap_or_else(everything),
            request.publish.unwrap_or_else(everything),
        ),
        Role::Client => (
            request.subscribe.unwrap_or_default(),
            request.publish.unwrap_or_default(),
        ),
    };
    for pattern in subscribe.iter().chain(&publish) {
        eventbus_router::validate_pattern(pattern)
            .map_err(|err| usage(format!("pattern {pattern:?}: {err}")))?;
    }
    let ttl_s = request.ttl_s.unwrap_or(3600);
    if ttl_s == 0 {
        return Err(usage("--ttl-s must be at least 1".into()));
    }
    let now = now_s();
    let claims = Claims {
        sub,
        role,
        iss: ISSUER.to_owned(),
        iat: now,
        exp: now + ttl_s,
        subscribe,
        publish,
    };
    ring.sign(&claims)
        .map_err(|err| fail(1, format!("cannot sign: {err}")))
}

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// The token (JWT).
    pub token: String,
    /// Verify against the keys in this directory.
    #[arg(long, conflicts_with = "url")]
    pub keys_dir: Option<PathBuf>,
    /// Verify against the key set of the bus at this URL (`/v1/jwks`).
    #[arg(long, env = "EVENTBUS_URL")]
    pub url: Option<String>,
    #[command(flatten)]
    pub trust: eventbus_runtime::tls::Trust,
}

/// `eventbus token check`: prints `{"valid":…,"claims":…,"expires_in_s":…}`; see the exit codes
/// above.
pub async fn check(args: CheckArgs) -> Result<(), Failure> {
    let keys = match (&args.keys_dir, &args.url) {
        (Some(dir), _) => KeyRing::load(dir)
            .map_err(|err| fail(eventbus_runtime::EXIT_CONFIG, err.to_string()))?
            .jwks(),
        (None, Some(url)) => {
            let target = Target {
                url: url.clone(),
                token: None,
                api_key: None,
                trust: args.trust.clone(),
            };
            let answer = target
                .http()?
                .get(format!("{url}/v1/jwks"))
                .send()
                .await
                .map_err(|err| {
                    fail(
                        EXIT_UNAVAILABLE,
                        format!("cannot fetch {url}/v1/jwks: {err}"),
                    )
                })?;
            answer
                .json()
                .await
                .map_err(|err| fail(EXIT_UNAVAILABLE, format!("{url}/v1/jwks: {err}")))?
        }
        (None, None) => {
            return Err(fail(
                eventbus_runtime::EXIT_CONFIG,
                "give --keys-dir or --url (or EVENTBUS_URL)",
            ));
        }
    };
    // Shown even when invalid, marked as such: an operator wants to see what a token claims.
    let claims = unverified_claims(&args.token);
    let verified = Verifier::new(StaticKeys(keys)).verify(&args.token).await;
    let expires_in = claims["exp"]
        .as_u64()
        .map(|exp| exp as i64 - now_s() as i64);
    let report = |valid: bool, error: Option<String>| {
        let mut out = json!({"valid": valid, "claims": claims, "expires_in_s": expires_in});
        if let Some(error) = error {
            out["error"] = error.into();
        }
        println!("{out}");
    };
    match verified {
        Ok(_) => {
            report(true, None);
            Ok(())
        }
        Err(TokenError::Expired) => {
            report(false, Some(TokenError::Expired.to_string()));
            Err(fail(EXIT_EXPIRED, "the token has expired"))
        }
        Err(TokenError::KeysUnavailable(why)) => Err(fail(EXIT_UNAVAILABLE, why)),
        Err(err) => {
            report(false, Some(err.to_string()));
            Err(fail(EXIT_INVALID, format!("the token is not valid: {err}")))
        }
    }
}

/// The payload of a JWT, not verified (Null when it is not one).
fn unverified_claims(token: &str) -> Value {
    use base64::Engine;
    token
        .split('.')
        .nth(1)
        .and_then(|payload| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .ok()
        })
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or(Value::Null)
}
