//! One replica of a service acts at a time (hooks delivering webhooks, auth writing presence
//! events): the holder of a lease kept in one of the bus's own channels in the store.
//!
//! The lease channel is a list of claims `{holder, at_ms, until_ms, prev}`. A claim counts when
//! `prev` is the seq just before its own (its author had read the whole channel: the store's
//! contiguous seqs make this a compare-and-set), and the lease it replaces had run out at `at_ms`
//! or was the author's own. Every replica reads the same claims in the same order and so agrees on
//! the holder. The holder renews well before `until_ms`; a standby claims once it has run out, so
//! a holder that dies is replaced within the lease's length plus one look. A holder delivers only
//! while its lease has a margin left, so two replicas deliver at once only if their clocks differ
//! by more than that margin.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{StoreClient, StoreError};

/// How long a claim lasts.
pub const LENGTH: Duration = Duration::from_secs(10);
/// A holder stops delivering this long before its lease runs out, and renews at half its length.
pub const MARGIN: Duration = Duration::from_secs(3);
/// How often every replica looks at the lease.
pub const LOOK_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Claim {
    holder: String,
    at_ms: u64,
    until_ms: u64,
    prev: u64,
}

/// One replica's view of the lease.
pub struct Lease {
    me: String,
    channel: String,
    /// The last seq of the lease channel applied.
    last: u64,
    holder: Option<(String, u64)>,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Lease {
    /// The lease kept on `channel`, as replica `me` sees it.
    pub fn new(me: String, channel: &str) -> Lease {
        Lease {
            me,
            channel: channel.to_owned(),
            last: 0,
            holder: None,
        }
    }

    /// Applies the claim at `seq`.
    fn apply(&mut self, seq: u64, claim: Option<Claim>) {
        if let Some(claim) = claim
            && claim.prev + 1 == seq
            && self
                .holder
                .as_ref()
                .is_none_or(|(holder, until)| *holder == claim.holder || *until < claim.at_ms)
        {
            self.holder = Some((claim.holder, claim.until_ms));
        }
        self.last = seq;
    }

    /// Reads what was claimed since the last look.
    async fn catch_up(&mut self, store: &StoreClient) -> Result<(), StoreError> {
        loop {
            let page = match store.read(&self.channel, self.last, 1000, false).await {
                Ok(page) => page,
                Err(StoreError::OutOfRange(_)) => return Ok(()),
                Err(err) => return Err(err),
            };
            for event in &page.events {
                let claim = serde_json::from_slice::<serde_json::Value>(&event.json)
                    .ok()
                    .and_then(|v| serde_json::from_value(v["data"].clone()).ok());
                self.apply(event.seq, claim);
            }
            if page.events.len() < 1000 {
                return Ok(());
            }
        }
    }

    /// Looks at the lease, claims or renews it when due; whether this replica may deliver now.
    pub async fn look(&mut self, store: &StoreClient) -> Result<bool, StoreError> {
        self.catch_up(store).await?;
        let now = now_ms();
        let due = match &self.holder {
            None => true,
            Some((holder, until)) if *holder == self.me => {
                until.saturating_sub(now) < LENGTH.as_millis() as u64 / 2
            }
            Some((_, until)) => *until < now,
        };
        if due {
            self.claim(store, now, now + LENGTH.as_millis() as u64)
                .await?;
            self.catch_up(store).await?;
        }
        Ok(self.holds(now_ms()))
    }

    /// Who holds the lease now, as far as the claims written so far say (without claiming it).
    pub async fn holder(&mut self, store: &StoreClient) -> Result<Option<String>, StoreError> {
        self.catch_up(store).await?;
        let now = now_ms();
        Ok(self
            .holder
            .as_ref()
            .filter(|(_, until)| *until > now)
            .map(|(holder, _)| holder.clone()))
    }

    /// Gives the lease up at once if this replica holds it (a clean stop), so that another takes
    /// over at its next look rather than when the lease runs out.
    pub async fn release(&mut self, store: &StoreClient) -> Result<(), StoreError> {
        self.catch_up(store).await?;
        if !matches!(&self.holder, Some((holder, _)) if *holder == self.me) {
            return Ok(());
        }
        let now = now_ms();
        // A lease of its own that ends as it is claimed.
        self.claim(store, now, now).await
    }

    /// Appends this replica's claim, made at `at_ms` having read up to `self.last`.
    async fn claim(
        &self,
        store: &StoreClient,
        at_ms: u64,
        until_ms: u64,
    ) -> Result<(), StoreError> {
        let claim = Claim {
            holder: self.me.clone(),
            at_ms,
            until_ms,
            prev: self.last,
        };
        let data = serde_json::to_value(&claim).unwrap_or_default();
        store
            .append_own(&self.channel, "eventbus.lease", None, data, false)
            .await
            .map(|_| ())
    }

    /// Until when this replica may deliver: the end of its lease less the margin (0 when it does
    /// not hold it).
    pub fn deliver_until(&self) -> u64 {
        match &self.holder {
            Some((holder, until)) if *holder == self.me => {
                until.saturating_sub(MARGIN.as_millis() as u64)
            }
            _ => 0,
        }
    }

    /// Whether this replica holds the lease at `now` with the margin left.
    pub fn holds(&self, now: u64) -> bool {
        matches!(&self.holder, Some((holder, until))
            if *holder == self.me && until.saturating_sub(now) > MARGIN.as_millis() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(holder: &str, at_ms: u64, prev: u64) -> Option<Claim> {
        Some(Claim {
            holder: holder.into(),
            at_ms,
            until_ms: at_ms + 10_000,
            prev,
        })
    }

    #[test]
    fn the_first_complete_claim_wins_and_a_racing_one_does_not() {
        let mut view = Lease::new("b".into(), "_bus.test.lease");
        view.apply(1, claim("a", 1_000, 0));
        // b claimed having read up to 0 too: it lands at 2, after a's, and does not count.
        view.apply(2, claim("b", 1_001, 0));
        assert_eq!(view.holder, Some(("a".into(), 11_000)));
        assert!(!view.holds(2_000));
    }

    #[test]
    fn a_live_lease_is_kept_and_an_expired_one_taken_over() {
        let mut view = Lease::new("b".into(), "_bus.test.lease");
        view.apply(1, claim("a", 1_000, 0));
        view.apply(2, claim("b", 5_000, 1));
        assert_eq!(
            view.holder.as_ref().map(|h| h.0.as_str()),
            Some("a"),
            "a's runs to 11 000"
        );
        view.apply(3, claim("a", 8_000, 2));
        assert_eq!(view.holder, Some(("a".into(), 18_000)), "a renews its own");
        view.apply(4, claim("b", 18_500, 3));
        assert_eq!(
            view.holder,
            Some(("b".into(), 28_500)),
            "a stopped renewing: b takes over"
        );
        assert!(view.holds(20_000));
        assert!(!view.holds(26_000), "within the margin of its end");
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        let mut view = Lease::new("b".into(), "_bus.test.lease");
        view.apply(1, claim("a", 1_000, 0));
        view.apply(
            2,
            Some(Claim {
                holder: "a".into(),
                at_ms: 2_000,
                until_ms: 2_000,
                prev: 1,
            }),
        );
        view.apply(3, claim("b", 2_001, 2));
        assert!(view.holds(3_000));
    }

    #[test]
    fn what_is_not_a_claim_is_skipped() {
        let mut view = Lease::new("a".into(), "_bus.test.lease");
        view.apply(1, None);
        view.apply(2, claim("a", 1_000, 1));
        assert!(view.holds(2_000));
    }
}
