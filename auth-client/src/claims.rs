//! What a token says, and what verifying one yields.

use eventbus_router::{Grant, Role};
use serde::{Deserialize, Serialize};

/// The `iss` of every token this bus issues.
pub const ISSUER: &str = "eventbus";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    pub iss: String,
    pub iat: u64,
    pub exp: u64,
    #[serde(default)]
    pub subscribe: Vec<String>,
    #[serde(default)]
    pub publish: Vec<String>,
}

/// A verified token.
#[derive(Debug, Clone)]
pub struct Verified {
    pub grant: Grant,
    /// Unix seconds after which the token is no longer valid.
    pub expires_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no token")]
    Missing,
    #[error("the token is malformed")]
    Malformed,
    #[error("the token was signed by an unknown key")]
    UnknownKey,
    #[error("the token's signature is invalid")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token's claims are invalid: {0}")]
    InvalidClaims(String),
    #[error("the signing keys cannot be fetched: {0}")]
    KeysUnavailable(String),
}

impl TokenError {
    /// A stable code for WebSocket error frames.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Expired => "token_expired",
            TokenError::KeysUnavailable(_) => "unavailable",
            _ => "unauthorized",
        }
    }
}

/// A token refusal, the same status on every HTTP endpoint: 503 while the signing keys cannot be
/// fetched (retry), 401 otherwise.
impl From<TokenError> for eventbus_runtime::problem::Problem {
    fn from(err: TokenError) -> Self {
        use eventbus_runtime::problem::{Kind, Problem};
        match err {
            TokenError::KeysUnavailable(_) => Problem::new(Kind::Unavailable, err.to_string()),
            other => Problem::new(Kind::Unauthorized, other.to_string()),
        }
    }
}

pub fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Claims {
    pub fn into_verified(self) -> Result<Verified, TokenError> {
        eventbus_model::validate_identity(&self.sub)
            .map_err(|err| TokenError::InvalidClaims(format!("sub {err}")))?;
        for pattern in self.subscribe.iter().chain(&self.publish) {
            eventbus_router::validate_pattern(pattern)
                .map_err(|err| TokenError::InvalidClaims(format!("pattern {pattern:?}: {err}")))?;
        }
        Ok(Verified {
            expires_at: self.exp,
            grant: Grant {
                identity: self.sub,
                role: self.role,
                subscribe: self.subscribe,
                publish: self.publish,
            },
        })
    }
}
