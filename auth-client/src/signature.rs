//! The signatures of what the bus sends to other people's HTTP endpoints: webhooks and the
//! application's hooks (`X-Eventbus-Signature`), and WebSub content distribution
//! (`X-Hub-Signature`). One HMAC-SHA256, two header formats.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header of webhooks and application hooks.
pub const HEADER: &str = "X-Eventbus-Signature";

type HmacSha256 = Hmac<Sha256>;

fn hmac_hex(secret: &[u8], parts: &[&[u8]]) -> String {
    // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
    let mut mac = match HmacSha256::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    };
    for part in parts {
        mac.update(part);
    }
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `t=<unix s>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`: the timestamp is signed with the body
/// so that a receiver can refuse replays older than it cares to accept.
pub fn signature(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let t = timestamp.to_string();
    let hex = hmac_hex(secret.as_bytes(), &[t.as_bytes(), b".", body]);
    format!("t={timestamp},v1={hex}")
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`, the `X-Hub-Signature` of WebSub (W3C
/// Recommendation, §7: authenticated content distribution).
pub fn hub_signature(secret: &str, body: &[u8]) -> String {
    format!("sha256={}", hmac_hex(secret.as_bytes(), &[body]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_of_time_and_body() {
        let sig = signature("0123456789abcdef", 1700000000, br#"{"a":1}"#);
        // Computed with Python's hmac module.
        assert_eq!(
            sig,
            "t=1700000000,v1=9eb18f493f8ec135d9eb2dad817c369bb4e9cbfa818657897a7437c1cd8c3a23"
        );
        assert_ne!(
            sig,
            signature("0123456789abcdeX", 1700000000, br#"{"a":1}"#)
        );
    }

    #[test]
    fn hub_signatures_are_hmac_sha256_of_the_body() {
        // python3 -c 'import hmac,hashlib;print(hmac.new(b"s3cret",b"{\"a\":1}",hashlib.sha256).hexdigest())'
        assert_eq!(
            hub_signature("s3cret", br#"{"a":1}"#),
            "sha256=5910e62016ef5034272c926c27071992a465c2335cecf41851bda071577f4f6d"
        );
    }
}
