//! Subscription patterns: a channel name in which a token may be `*` (exactly one token) and the last
//! token may be `>` (one or more tokens), as in NATS subjects.

use eventbus_model::names::{MAX_CHANNEL_LEN, NameError};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("'>' may only be the last token")]
    TailNotLast,
}

pub fn validate_pattern(pattern: &str) -> Result<(), PatternError> {
    if pattern.is_empty() {
        return Err(NameError::Empty.into());
    }
    if pattern.len() > MAX_CHANNEL_LEN {
        return Err(NameError::TooLong(MAX_CHANNEL_LEN).into());
    }
    let tokens: Vec<&str> = pattern.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        match *token {
            "" => return Err(NameError::EmptyToken.into()),
            "*" => {}
            ">" if i + 1 == tokens.len() => {}
            ">" => return Err(PatternError::TailNotLast),
            other => {
                if !other
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                {
                    return Err(NameError::BadCharacter.into());
                }
            }
        }
    }
    Ok(())
}

/// Whether the pattern holds wildcards (and so is not a single channel).
pub fn is_pattern(name: &str) -> bool {
    name.split('.').any(|t| t == "*" || t == ">")
}

/// Whether `channel` (a concrete channel) matches `pattern`.
pub fn matches(pattern: &str, channel: &str) -> bool {
    let mut channel_tokens = channel.split('.');
    for token in pattern.split('.') {
        match token {
            ">" => return channel_tokens.next().is_some(),
            "*" => {
                if channel_tokens.next().is_none() {
                    return false;
                }
            }
            literal => {
                if channel_tokens.next() != Some(literal) {
                    return false;
                }
            }
        }
    }
    channel_tokens.next().is_none()
}

/// Whether every channel that `inner` matches is also matched by `outer`.
pub fn covers(outer: &str, inner: &str) -> bool {
    let mut inner_tokens = inner.split('.');
    for token in outer.split('.') {
        match token {
            ">" => return inner_tokens.next().is_some(),
            "*" => match inner_tokens.next() {
                None | Some(">") => return false,
                Some(_) => {}
            },
            literal => {
                if inner_tokens.next() != Some(literal) {
                    return false;
                }
            }
        }
    }
    inner_tokens.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax() {
        for ok in ["orders", "orders.*", "orders.>", ">", "*.x.*", "a.*.>"] {
            assert_eq!(validate_pattern(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_pattern("a.>.b"), Err(PatternError::TailNotLast));
        assert!(validate_pattern("a..b").is_err());
        assert!(validate_pattern("a.b*").is_err());
        assert!(validate_pattern("").is_err());
    }

    #[test]
    fn matching() {
        assert!(matches("orders", "orders"));
        assert!(!matches("orders", "orders.eu"));
        assert!(matches("orders.*", "orders.eu"));
        assert!(!matches("orders.*", "orders"));
        assert!(!matches("orders.*", "orders.eu.x"));
        assert!(matches("orders.>", "orders.eu.x"));
        assert!(!matches("orders.>", "orders"));
        assert!(matches(">", "anything.at.all"));
        assert!(matches("*.b", "a.b"));
    }

    #[test]
    fn coverage() {
        assert!(covers(">", "orders.*"));
        assert!(covers("orders.>", "orders.*"));
        assert!(covers("orders.>", "orders.eu.>"));
        assert!(!covers("orders.*", "orders.>"));
        assert!(covers("orders.*", "orders.*"));
        assert!(covers("orders.*", "orders.eu"));
        assert!(!covers("orders.eu", "orders.*"));
        assert!(!covers("chat.*", "orders.x"));
    }
}
