//! Retention rules: per channel pattern, how much history to keep. The first rule whose pattern
//! matches a channel applies; a channel no rule matches keeps everything.

use std::str::FromStr;

use super::index::Index;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub pattern: String,
    pub max_age_ms: Option<u64>,
    pub max_events: Option<u64>,
    pub max_bytes: Option<u64>,
}

impl FromStr for Rule {
    type Err = String;

    /// `pattern:max_age_s=N:max_events=N:max_bytes=N`, any of the limits optional.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut parts = text.trim().split(':');
        let pattern = parts.next().unwrap_or_default().to_owned();
        eventbus_router::validate_pattern(&pattern)
            .map_err(|err| format!("retention pattern {pattern:?}: {err}"))?;
        let mut rule = Rule {
            pattern,
            max_age_ms: None,
            max_events: None,
            max_bytes: None,
        };
        for limit in parts {
            let (name, value) = limit
                .split_once('=')
                .ok_or_else(|| format!("retention limit {limit:?} is not name=value"))?;
            let value: u64 = value
                .parse()
                .map_err(|_| format!("retention limit {name} needs a whole number"))?;
            match name {
                "max_age_s" => rule.max_age_ms = Some(value.saturating_mul(1000)),
                "max_events" if value >= 1 => rule.max_events = Some(value),
                "max_bytes" => rule.max_bytes = Some(value),
                "max_events" => return Err("max_events must be at least 1".into()),
                other => {
                    return Err(format!(
                        "unknown retention limit {other:?} (max_age_s, max_events, max_bytes)"
                    ));
                }
            }
        }
        Ok(rule)
    }
}

/// Moves every channel's first retained seq forward as its rule says; returns how many events were
/// let go. Keeps at least the newest event of a channel, so its head stays known.
///
/// Age goes by whole sealed segments (a segment's newest record), as the deletion does: the
/// segment being written (`active`) still grows, so nothing in it is let go by age. That keeps the
/// first retained seq a function of what is on disk, so a restart recomputes no earlier one.
pub fn apply(index: &mut Index, rules: &[Rule], now_ms: u64, active: u32) -> u64 {
    if rules.is_empty() {
        return 0;
    }
    let mut dropped = 0;
    let Index {
        channels, segments, ..
    } = index;
    for (name, channel) in channels.iter_mut() {
        let Some(rule) = rules
            .iter()
            .find(|rule| eventbus_router::matches(&rule.pattern, name))
        else {
            continue;
        };
        let head = channel.head();
        let mut first = channel.first;
        if let Some(max) = rule.max_events {
            first = first.max(head.saturating_sub(max) + 1);
        }
        if let Some(max) = rule.max_bytes {
            let mut bytes = channel.bytes;
            let mut seq = channel.first;
            while seq < head && bytes > max {
                bytes -= channel.location(seq).map_or(0, |l| l.len as u64);
                seq += 1;
            }
            first = first.max(seq);
        }
        if let Some(max_age) = rule.max_age_ms {
            let horizon = now_ms.saturating_sub(max_age);
            while first < head {
                let old = channel
                    .location(first)
                    .filter(|l| l.segment != active)
                    .and_then(|l| segments.get(&l.segment))
                    .is_some_and(|segment| segment.newest_ms < horizon);
                if !old {
                    break;
                }
                first += 1;
            }
        }
        let first = first.min(head);
        if first > channel.first {
            dropped += first - channel.first;
            channel.truncate_below(first);
        }
    }
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rules() {
        let rule: Rule = "chat.*:max_age_s=60:max_events=10:max_bytes=1000"
            .parse()
            .unwrap();
        assert_eq!(rule.max_age_ms, Some(60_000));
        assert_eq!(rule.max_events, Some(10));
        assert_eq!(rule.max_bytes, Some(1000));
        assert_eq!(">".parse::<Rule>().unwrap().max_events, None);
        assert!("a..b:max_events=1".parse::<Rule>().is_err());
        assert!("a:max_events=0".parse::<Rule>().is_err());
        assert!("a:colour=1".parse::<Rule>().is_err());
        assert!("a:max_events=x".parse::<Rule>().is_err());
    }
}
