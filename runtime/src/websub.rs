//! Which channels are public to WebSub, and their URLs: a topic is a channel's history URL
//! (`<base>/v1/channels/<channel>/events`), the hub is `<base>/v1/websub`. The hooks service
//! (the hub) and ingest (which advertises the hub on a topic's responses, for discovery) read
//! the same settings.

use axum::http::HeaderMap;

/// The hub's path on the bus's public listener.
pub const HUB_PATH: &str = "/v1/websub";

#[derive(clap::Args, Debug, Clone, Default)]
#[group(id = "websub")]
pub struct Args {
    /// Channels (patterns, comma separated) anyone may follow through the WebSub hub, with no
    /// account (default: none; the hub refuses every topic).
    #[arg(
        long = "websub-channels",
        env = "EVENTBUS_WEBSUB_CHANNELS",
        value_delimiter = ','
    )]
    pub channels: Vec<String>,
    /// The bus's public base URL (`https://bus.example.com`), for the hub and topic URLs it
    /// advertises; by default the request's `Host` (and `X-Forwarded-Proto`).
    #[arg(long = "public-url", env = "EVENTBUS_PUBLIC_URL")]
    pub public_url: Option<String>,
}

impl Args {
    /// Whether `channel` is public to WebSub (never the bus's own channels, nor an inbox).
    pub fn public(&self, channel: &str) -> bool {
        eventbus_model::names::validate_channel(channel).is_ok()
            && !eventbus_model::names::is_system(channel)
            && eventbus_model::names::inbox_owner(channel).is_none()
            && self
                .channels
                .iter()
                .any(|p| eventbus_router::pattern::matches(p, channel))
    }

    /// The base URL requests with these headers reached: the configured one, or the `Host`'s.
    pub fn base(&self, headers: &HeaderMap, tls: bool) -> Option<String> {
        if let Some(url) = &self.public_url {
            return Some(url.trim_end_matches('/').to_owned());
        }
        let host = headers.get("host")?.to_str().ok()?;
        let scheme = headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .filter(|p| matches!(*p, "http" | "https"))
            .unwrap_or(if tls { "https" } else { "http" });
        Some(format!("{scheme}://{host}"))
    }

    /// The `Link` header of a public channel's responses: the hub and the topic (W3C WebSub §4).
    pub fn links(&self, headers: &HeaderMap, tls: bool, channel: &str) -> Option<String> {
        if !self.public(channel) {
            return None;
        }
        let base = self.base(headers, tls)?;
        Some(format!(
            "<{base}{HUB_PATH}>; rel=\"hub\", <{}>; rel=\"self\"",
            topic_url(&base, channel)
        ))
    }
}

/// A channel's topic URL under `base`.
pub fn topic_url(base: &str, channel: &str) -> String {
    format!("{base}/v1/channels/{channel}/events")
}

/// The channel a topic URL names, if it is one of a bus's channels (any host: the bus may be
/// reached under several names).
pub fn topic_channel(topic: &str) -> Option<String> {
    let rest = topic
        .strip_prefix("https://")
        .or_else(|| topic.strip_prefix("http://"))?;
    let path = &rest[rest.find('/')?..];
    let path = path.split(['?', '#']).next().unwrap_or(path);
    let channel = path
        .strip_prefix("/v1/channels/")?
        .strip_suffix("/events")?;
    eventbus_model::names::validate_channel(channel).ok()?;
    Some(channel.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_name_channels() {
        assert_eq!(
            topic_channel("https://bus.example/v1/channels/news.a/events").as_deref(),
            Some("news.a")
        );
        assert_eq!(
            topic_channel("http://127.0.0.1:8/v1/channels/x/events?after=3").as_deref(),
            Some("x")
        );
        for bad in [
            "ftp://h/v1/channels/x/events",
            "https://h/v1/channels/x",
            "https://h/v1/channels/a..b/events",
            "https://h/v1/channels/a/b/events",
            "https://h",
        ] {
            assert_eq!(topic_channel(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_configured_channels_are_public_and_never_the_bus_own() {
        let args = Args {
            channels: vec!["news.>".into(), ">".into()],
            public_url: None,
        };
        assert!(args.public("news.a"));
        assert!(!args.public("_bus.hooks.lease"));
        assert!(!args.public("inbox.alice"));
        assert!(!Args::default().public("news.a"));
    }
}
