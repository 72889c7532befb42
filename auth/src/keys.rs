//! Signing keys: Ed25519, kept in a directory so that tokens stay valid across restarts. The newest
//! key signs; every key in the directory is published in the key set, which is how a key is rotated
//! without rejecting tokens it signed (add a key, wait for the old tokens to expire, remove it).

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, Jwk, JwkSet, KeyAlgorithm, OctetKeyPairParameters,
    OctetKeyPairType, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot use key directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {0} is not a hex-encoded 32-byte Ed25519 seed")]
    BadKey(PathBuf),
    #[error("no signing key in {0} (add one with `eventbus keygen --keys-dir {0}`)")]
    NoKeys(PathBuf),
}

struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    public: [u8; 32],
}

pub struct KeyRing {
    /// Oldest first; the last one signs.
    keys: Vec<SigningKey>,
}

// PKCS#8 v1 wrapping of an Ed25519 seed (RFC 8410): the prefix is fixed, the seed follows.
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

impl KeyRing {
    /// Loads every `*.key` file of `dir`, creating a first key when there is none.
    pub fn load_or_create(dir: &Path) -> Result<Self, KeyError> {
        std::fs::create_dir_all(dir).map_err(|source| KeyError::Io {
            path: dir.to_owned(),
            source,
        })?;
        if key_files(dir)?.is_empty() {
            create_key(dir)?;
        }
        Self::load(dir)
    }

    /// Loads every `*.key` file of `dir`; none is an error (nothing is created).
    pub fn load(dir: &Path) -> Result<Self, KeyError> {
        let names = key_files(dir)?;
        if names.is_empty() {
            return Err(KeyError::NoKeys(dir.to_owned()));
        }
        let keys = names
            .iter()
            .map(|path| load_key(path))
            .collect::<Result<_, _>>()?;
        Ok(Self { keys })
    }

    /// Adds a new key to `dir` (created if need be): it signs from the next start of whoever
    /// loads the directory. Returns its file and its key id.
    pub fn add(dir: &Path) -> Result<(PathBuf, String), KeyError> {
        std::fs::create_dir_all(dir).map_err(|source| KeyError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let path = create_key(dir)?;
        let kid = load_key(&path)?.kid;
        Ok((path, kid))
    }

    /// The id of the key that signs.
    pub fn signing_kid(&self) -> &str {
        &self.keys.last().expect("a key ring always holds a key").kid
    }

    /// An in-memory ring with one fresh key, for tests.
    pub fn ephemeral() -> Self {
        Self {
            keys: vec![from_seed(rand::random())],
        }
    }

    pub fn sign<T: serde::Serialize>(
        &self,
        claims: &T,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let key = self.keys.last().expect("a key ring always holds a key");
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, claims, &key.encoding)
    }

    pub fn jwks(&self) -> JwkSet {
        JwkSet {
            keys: self
                .keys
                .iter()
                .map(|key| Jwk {
                    common: CommonParameters {
                        public_key_use: Some(PublicKeyUse::Signature),
                        key_algorithm: Some(KeyAlgorithm::EdDSA),
                        key_id: Some(key.kid.clone()),
                        ..Default::default()
                    },
                    algorithm: AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters {
                        key_type: OctetKeyPairType::OctetKeyPair,
                        curve: jsonwebtoken::jwk::EllipticCurve::Ed25519,
                        x: URL_SAFE_NO_PAD.encode(key.public),
                    }),
                })
                .collect(),
        }
    }
}

fn from_seed(seed: [u8; 32]) -> SigningKey {
    let public = ed25519_dalek::SigningKey::from_bytes(&seed)
        .verifying_key()
        .to_bytes();
    let mut der = PKCS8_ED25519_PREFIX.to_vec();
    der.extend_from_slice(&seed);
    SigningKey {
        // The key id is derived from the public key, so it is stable and says nothing secret.
        kid: URL_SAFE_NO_PAD.encode(&public[..9]),
        encoding: EncodingKey::from_ed_der(&der),
        public,
    }
}

/// The `*.key` files of `dir`, oldest first (names start with the creation time).
fn key_files(dir: &Path) -> Result<Vec<PathBuf>, KeyError> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| KeyError::Io {
            path: dir.to_owned(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "key"))
        .collect();
    names.sort();
    Ok(names)
}

fn load_key(path: &Path) -> Result<SigningKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: path.to_owned(),
        source,
    })?;
    let seed = decode_hex(text.trim()).ok_or_else(|| KeyError::BadKey(path.to_owned()))?;
    Ok(from_seed(seed))
}

fn create_key(dir: &Path) -> Result<PathBuf, KeyError> {
    let seed: [u8; 32] = rand::random();
    let mut millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    // Never replace a key: two added within one millisecond get consecutive names.
    while dir.join(format!("{millis:016}.key")).exists() {
        millis += 1;
    }
    let path = dir.join(format!("{millis:016}.key"));
    let tmp = dir.join(".new-key.tmp");
    let io = |source| KeyError::Io {
        path: path.clone(),
        source,
    };
    let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        file.write_all(hex.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, &path).map_err(io)?;
    tracing::info!(path = %path.display(), "created a new signing key");
    Ok(path)
}

fn decode_hex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    //! Signing here, verifying with the library ingest and gateways use: one round trip.
    use std::time::Duration;

    use super::*;
    use eventbus_auth_client::claims::{Claims, ISSUER, TokenError, now_s};
    use eventbus_auth_client::verifier::{StaticKeys, Verifier};
    use eventbus_router::Role;

    fn claims(exp: u64) -> Claims {
        Claims {
            sub: "alice".into(),
            role: Role::Client,
            iss: ISSUER.into(),
            iat: now_s(),
            exp,
            subscribe: vec!["orders".into()],
            publish: vec![],
        }
    }

    #[tokio::test]
    async fn verifies_own_tokens_and_refuses_the_rest() {
        let ring = KeyRing::ephemeral();
        let verifier = Verifier::new(StaticKeys(ring.jwks()));
        let token = ring.sign(&claims(now_s() + 60)).unwrap();
        let verified = verifier.verify(&token).await.unwrap();
        assert_eq!(verified.grant.identity, "alice");
        assert_eq!(verified.grant.subscribe, vec!["orders".to_string()]);

        let expired = ring.sign(&claims(now_s() - 1)).unwrap();
        assert_eq!(
            verifier.verify(&expired).await.unwrap_err(),
            TokenError::Expired
        );

        let other = KeyRing::ephemeral();
        let foreign = other.sign(&claims(now_s() + 60)).unwrap();
        assert_eq!(
            verifier.verify(&foreign).await.unwrap_err(),
            TokenError::UnknownKey
        );

        let mut tampered = token.clone();
        let payload_at = tampered.find('.').unwrap() + 2;
        tampered.replace_range(
            payload_at..payload_at + 1,
            if &token[payload_at..payload_at + 1] == "A" {
                "B"
            } else {
                "A"
            },
        );
        assert!(verifier.verify(&tampered).await.is_err());
        assert_eq!(
            verifier.verify("not a token").await.unwrap_err(),
            TokenError::Malformed
        );

        let mut bad_sub = claims(now_s() + 60);
        bad_sub.sub = "a.b".into();
        let bad = ring.sign(&bad_sub).unwrap();
        assert!(matches!(
            verifier.verify(&bad).await,
            Err(TokenError::InvalidClaims(_))
        ));
    }

    #[tokio::test]
    async fn a_remembered_token_still_dies_at_its_exp() {
        let ring = KeyRing::ephemeral();
        let verifier = Verifier::new(StaticKeys(ring.jwks()));
        let exp = now_s() + 1;
        let token = ring.sign(&claims(exp)).unwrap();
        assert!(verifier.verify(&token).await.is_ok());
        assert!(verifier.verify(&token).await.is_ok(), "from the cache");
        // Waiting for the clock itself, which is the condition under test.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while now_s() < exp {
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            verifier.verify(&token).await.unwrap_err(),
            TokenError::Expired
        );
    }

    #[test]
    fn keys_persist_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let first = KeyRing::load_or_create(dir.path()).unwrap();
        let second = KeyRing::load_or_create(dir.path()).unwrap();
        assert_eq!(
            first.jwks().keys[0].common.key_id,
            second.jwks().keys[0].common.key_id
        );
    }
}
