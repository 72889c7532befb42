//! Channel names to backbone subjects. Channel syntax is a subset of NATS subject syntax, so the
//! mapping is a prefix: `orders.eu` travels on `<prefix>.orders.eu`, a pattern keeps its wildcards.

/// The default subject prefix; deployments sharing one NATS give each bus its own.
pub const DEFAULT_PREFIX: &str = "eventbus.ch";

pub fn for_channel(prefix: &str, channel_or_pattern: &str) -> String {
    format!("{prefix}.{channel_or_pattern}")
}

/// The subject of the services' messages on `topic`: beside the channels' subjects, never under
/// them, so that no channel pattern (not even `>`) matches it.
pub fn internal(prefix: &str, topic: &str) -> String {
    format!("{prefix}-internal.{topic}")
}

/// The channel of a subject, if the subject belongs to this prefix.
pub fn channel_of<'a>(prefix: &str, subject: &'a str) -> Option<&'a str> {
    subject.strip_prefix(prefix)?.strip_prefix('.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let subject = for_channel(DEFAULT_PREFIX, "chat.room-7");
        assert_eq!(subject, "eventbus.ch.chat.room-7");
        assert_eq!(channel_of(DEFAULT_PREFIX, &subject), Some("chat.room-7"));
        assert_eq!(channel_of(DEFAULT_PREFIX, "other.x"), None);
        let internal = internal(DEFAULT_PREFIX, "presence.reports");
        assert_eq!(channel_of(DEFAULT_PREFIX, &internal), None);
    }
}
