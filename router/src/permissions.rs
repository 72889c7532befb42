//! Who may receive or publish what (docs/protocol.md §2).

use eventbus_model::names::{inbox_owner, presence_subject, validate_channel};
use serde::{Deserialize, Serialize};

use crate::pattern::{covers, is_pattern, matches, validate_pattern};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A browser or native app: literal channels its token names, and its own inbox.
    Client,
    /// Backend code: patterns, queue groups, and every channel its token names.
    Service,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Service => "service",
        }
    }
}

/// What a verified token lets its holder do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub identity: String,
    pub role: Role,
    pub subscribe: Vec<String>,
    pub publish: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("invalid channel {channel:?}: {reason}")]
    InvalidChannel { channel: String, reason: String },
    #[error("only services may subscribe to patterns")]
    PatternNotAllowed,
    #[error("{0:?} is another identity's inbox")]
    ForeignInbox(String),
    #[error("the token does not allow subscribing to {0:?}")]
    NotSubscribable(String),
    #[error("the token does not allow publishing to {0:?}")]
    NotPublishable(String),
    #[error("only services may join queue groups")]
    GroupNotAllowed,
    #[error("{0:?} is the bus's own (presence events, internal state)")]
    Reserved(String),
}

impl Denied {
    /// A stable code for error frames and problem documents.
    pub fn code(&self) -> &'static str {
        match self {
            Denied::InvalidChannel { .. } => "invalid_channel",
            Denied::PatternNotAllowed => "pattern_not_allowed",
            Denied::ForeignInbox(_)
            | Denied::NotSubscribable(_)
            | Denied::NotPublishable(_)
            | Denied::Reserved(_) => "forbidden",
            Denied::GroupNotAllowed => "group_not_allowed",
        }
    }
}

impl Grant {
    /// The private channel of the holder, to which it is subscribed as soon as it is authenticated.
    pub fn inbox(&self) -> String {
        eventbus_model::names::inbox_of(&self.identity)
    }

    /// May the holder subscribe to `target` (a channel, or for services a pattern)?
    pub fn check_subscribe(&self, target: &str) -> Result<(), Denied> {
        let invalid = |reason: String| Denied::InvalidChannel {
            channel: target.to_owned(),
            reason,
        };
        if is_pattern(target) {
            validate_pattern(target).map_err(|err| invalid(err.to_string()))?;
            if self.role != Role::Service {
                return Err(Denied::PatternNotAllowed);
            }
            return if self.subscribe.iter().any(|allowed| covers(allowed, target)) {
                Ok(())
            } else {
                Err(Denied::NotSubscribable(target.to_owned()))
            };
        }
        validate_channel(target).map_err(|err| invalid(err.to_string()))?;
        if eventbus_model::names::is_system(target) {
            return Err(Denied::Reserved(target.to_owned()));
        }
        if let Some(owner) = inbox_owner(target) {
            if owner == self.identity {
                return Ok(());
            }
            // Guarantee 4: a client never reads another identity's inbox, whatever its patterns say.
            if self.role == Role::Client {
                return Err(Denied::ForeignInbox(target.to_owned()));
            }
        }
        if self
            .subscribe
            .iter()
            .any(|allowed| matches(allowed, target))
        {
            return Ok(());
        }
        // Who is in a channel is visible to whoever may read the channel.
        match presence_subject(target) {
            Some(subject) if self.check_subscribe(subject).is_ok() => Ok(()),
            _ => Err(Denied::NotSubscribable(target.to_owned())),
        }
    }

    /// May the holder publish to `channel` (a concrete, already validated channel)?
    pub fn check_publish(&self, channel: &str) -> Result<(), Denied> {
        if presence_subject(channel).is_some() || eventbus_model::names::is_system(channel) {
            return Err(Denied::Reserved(channel.to_owned()));
        }
        if self.publish.iter().any(|allowed| matches(allowed, channel)) {
            Ok(())
        } else {
            Err(Denied::NotPublishable(channel.to_owned()))
        }
    }

    pub fn check_group(&self) -> Result<(), Denied> {
        if self.role == Role::Service {
            Ok(())
        } else {
            Err(Denied::GroupNotAllowed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(role: Role, subscribe: &[&str], publish: &[&str]) -> Grant {
        Grant {
            identity: "alice".into(),
            role,
            subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
            publish: publish.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn presence_follows_the_channel_and_nobody_publishes_there() {
        let client = grant(Role::Client, &["chat.*"], &["presence.>", "chat.*"]);
        assert_eq!(client.check_subscribe("presence.chat.a"), Ok(()));
        assert!(matches!(
            client.check_subscribe("presence.orders"),
            Err(Denied::NotSubscribable(_))
        ));
        assert_eq!(client.check_subscribe("presence.inbox.alice"), Ok(()));
        assert!(client.check_subscribe("presence.inbox.bob").is_err());
        assert!(matches!(
            client.check_publish("presence.chat.a"),
            Err(Denied::Reserved(_))
        ));
        let service = grant(Role::Service, &[">"], &[">"]);
        assert!(service.check_publish("presence.chat").is_err());
        assert_eq!(service.check_subscribe("presence.>"), Ok(()));
    }

    #[test]
    fn the_bus_own_channels_are_nobody_s() {
        let service = grant(Role::Service, &[">"], &[">"]);
        assert!(matches!(
            service.check_subscribe("_bus.hooks.registrations"),
            Err(Denied::Reserved(_))
        ));
        assert!(matches!(
            service.check_publish("_bus.hooks.lease"),
            Err(Denied::Reserved(_))
        ));
        assert_eq!(service.check_subscribe("bus.x"), Ok(()));
    }

    #[test]
    fn clients_get_literal_channels_and_their_inbox() {
        let client = grant(Role::Client, &["orders", "chat.*", ">"], &["chat.*"]);
        assert_eq!(client.check_subscribe("orders"), Ok(()));
        assert_eq!(client.check_subscribe("chat.room-1"), Ok(()));
        assert_eq!(client.check_subscribe("inbox.alice"), Ok(()));
        assert_eq!(
            client.check_subscribe("inbox.bob"),
            Err(Denied::ForeignInbox("inbox.bob".into()))
        );
        assert_eq!(
            client.check_subscribe("chat.*"),
            Err(Denied::PatternNotAllowed)
        );
        assert!(matches!(
            client.check_subscribe("bad..name"),
            Err(Denied::InvalidChannel { .. })
        ));
        assert_eq!(client.check_publish("chat.x"), Ok(()));
        assert!(client.check_publish("orders").is_err());
        assert!(client.check_group().is_err());

        let narrow = grant(Role::Client, &["orders"], &[]);
        assert_eq!(
            narrow.check_subscribe("payments"),
            Err(Denied::NotSubscribable("payments".into()))
        );
        assert_eq!(narrow.check_subscribe("inbox.alice"), Ok(()));
    }

    #[test]
    fn services_get_patterns_within_their_grant() {
        let service = grant(Role::Service, &["orders.>"], &[">"]);
        assert_eq!(service.check_subscribe("orders.*"), Ok(()));
        assert_eq!(service.check_subscribe("orders.eu"), Ok(()));
        assert!(service.check_subscribe(">").is_err());
        assert!(service.check_subscribe("payments").is_err());
        let all = grant(Role::Service, &[">"], &[">"]);
        assert_eq!(all.check_subscribe(">"), Ok(()));
        assert_eq!(all.check_subscribe("inbox.bob"), Ok(()));
        assert_eq!(all.check_group(), Ok(()));
    }
}
