//! Syntax of channel names and identities (docs/protocol.md §1, §2).

/// Longest channel name, in bytes (names are ASCII).
pub const MAX_CHANNEL_LEN: usize = 128;
/// Longest identity (`sub`), in bytes.
pub const MAX_IDENTITY_LEN: usize = 64;
/// Channels of this prefix are private inboxes: `inbox.<identity>`.
pub const INBOX_PREFIX: &str = "inbox.";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("longer than {0} characters")]
    TooLong(usize),
    #[error("has an empty token (two dots in a row, or a dot at an end)")]
    EmptyToken,
    #[error("may only hold tokens of A-Z, a-z, 0-9, '_' and '-' joined by '.'")]
    BadCharacter,
    #[error("may only hold A-Z, a-z, 0-9, '_' and '-'")]
    BadIdentityCharacter,
}

pub(crate) fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// A concrete channel: tokens of `[A-Za-z0-9_-]` joined by `.`, 1-128 characters.
pub fn validate_channel(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_CHANNEL_LEN {
        return Err(NameError::TooLong(MAX_CHANNEL_LEN));
    }
    for token in name.split('.') {
        if token.is_empty() {
            return Err(NameError::EmptyToken);
        }
        if !token.bytes().all(is_token_byte) {
            return Err(NameError::BadCharacter);
        }
    }
    Ok(())
}

/// A durable queue group's name: the syntax of an identity, so that its dead-letter channel
/// `dead.<group>` is always a channel.
pub fn validate_group(name: &str) -> Result<(), NameError> {
    validate_identity(name)
}

/// Dead-letter channels: `dead.<group>`.
pub const DEAD_PREFIX: &str = "dead.";

/// The channel where a durable group's dead events go.
pub fn dead_letters_of(group: &str) -> String {
    format!("{DEAD_PREFIX}{group}")
}

/// An identity: 1-64 characters of `[A-Za-z0-9_-]`, so that `inbox.<identity>` is always a channel.
pub fn validate_identity(identity: &str) -> Result<(), NameError> {
    if identity.is_empty() {
        return Err(NameError::Empty);
    }
    if identity.len() > MAX_IDENTITY_LEN {
        return Err(NameError::TooLong(MAX_IDENTITY_LEN));
    }
    if !identity.bytes().all(is_token_byte) {
        return Err(NameError::BadIdentityCharacter);
    }
    Ok(())
}

/// The private channel of one identity.
pub fn inbox_of(identity: &str) -> String {
    format!("{INBOX_PREFIX}{identity}")
}

/// Channels under this prefix carry the bus's own presence events: `presence.<channel>` says who
/// joins and leaves `<channel>`. Nobody publishes there but the bus.
pub const PRESENCE_PREFIX: &str = "presence.";

/// Channels under this prefix hold the bus's own state (webhook registrations, their delivery
/// positions, leases): services reach them through the store's internal API only. No token may
/// read or write them, and the store never puts them on the backbone.
pub const SYSTEM_PREFIX: &str = "_bus.";

/// Whether `channel` is one of the bus's own.
pub fn is_system(channel: &str) -> bool {
    channel.starts_with(SYSTEM_PREFIX)
}

/// The presence channel of `channel` (None when the name would be too long).
pub fn presence_of(channel: &str) -> Option<String> {
    let name = format!("{PRESENCE_PREFIX}{channel}");
    validate_channel(&name).ok().map(|()| name)
}

/// The channel whose presence channel `channel` is, if it is one.
pub fn presence_subject(channel: &str) -> Option<&str> {
    channel.strip_prefix(PRESENCE_PREFIX)
}

/// The identity whose inbox `channel` is, if it is an inbox.
pub fn inbox_owner(channel: &str) -> Option<&str> {
    channel
        .strip_prefix(INBOX_PREFIX)
        .filter(|rest| !rest.contains('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels() {
        for ok in ["orders", "chat.room-7", "a_b.C-1.x", &"a".repeat(128)] {
            assert_eq!(validate_channel(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_channel(""), Err(NameError::Empty));
        assert_eq!(
            validate_channel(&"a".repeat(129)),
            Err(NameError::TooLong(128))
        );
        assert_eq!(validate_channel("a..b"), Err(NameError::EmptyToken));
        assert_eq!(validate_channel(".a"), Err(NameError::EmptyToken));
        assert_eq!(validate_channel("a."), Err(NameError::EmptyToken));
        for bad in ["orders.*", "orders.>", "a b", "é", "a/b"] {
            assert_eq!(validate_channel(bad), Err(NameError::BadCharacter), "{bad}");
        }
    }

    #[test]
    fn identities_and_inboxes() {
        assert!(validate_identity("alice_01-x").is_ok());
        assert!(validate_identity("a.b").is_err());
        assert!(validate_identity("").is_err());
        assert!(validate_identity(&"a".repeat(65)).is_err());
        assert_eq!(inbox_of("alice"), "inbox.alice");
        assert_eq!(inbox_owner("inbox.alice"), Some("alice"));
        assert_eq!(inbox_owner("inbox.alice.x"), None);
        assert_eq!(inbox_owner("orders"), None);
    }

    #[test]
    fn presence_channels() {
        assert_eq!(
            presence_of("chat.room-1").as_deref(),
            Some("presence.chat.room-1")
        );
        assert_eq!(presence_of(&"a".repeat(128)), None);
        assert_eq!(presence_subject("presence.chat"), Some("chat"));
        assert_eq!(presence_subject("chat"), None);
    }
}
