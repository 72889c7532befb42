//! The optional per-identity publish rate: a token bucket per identity (GCRA, from the
//! `governor` crate), shared by every way of publishing a process serves (HTTP and WebSocket), so
//! that one noisy publisher cannot take the log's throughput from the rest. Per process: with
//! several ingest replicas each enforces it on what it receives.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

#[derive(clap::Args, Debug, Clone, Default)]
#[group(id = "publish_rate")]
pub struct Args {
    /// Events per second one identity may publish (0: no limit); past it, 429 with Retry-After.
    #[arg(
        long = "publish-rate",
        env = "EVENTBUS_PUBLISH_RATE",
        default_value_t = 0
    )]
    pub per_second: u32,
    /// Events an identity may publish at once above the rate (default: one second's worth).
    #[arg(long = "publish-burst", env = "EVENTBUS_PUBLISH_BURST")]
    pub burst: Option<u32>,
}

/// Why a publish must wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Limited {
    /// Retry after this long.
    Wait(Duration),
    /// More events in one request than the burst allows: send smaller batches.
    TooMany { burst: u32 },
}

#[derive(Clone)]
pub struct PublishRate(Option<Arc<(DefaultKeyedRateLimiter<String>, u32)>>);

impl PublishRate {
    pub fn new(args: &Args) -> PublishRate {
        let Some(rate) = NonZeroU32::new(args.per_second) else {
            return PublishRate(None);
        };
        let burst = args.burst.and_then(NonZeroU32::new).unwrap_or(rate);
        let limiter = DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst));
        PublishRate(Some(Arc::new((limiter, burst.get()))))
    }

    /// Takes `events` from `identity`'s bucket, or says how long to wait.
    pub fn check(&self, identity: &str, events: usize) -> Result<(), Limited> {
        let Some(limits) = &self.0 else {
            return Ok(());
        };
        let (limiter, burst) = (&limits.0, limits.1);
        let n = NonZeroU32::new(u32::try_from(events.max(1)).unwrap_or(u32::MAX))
            .unwrap_or(NonZeroU32::MIN);
        // Forget identities that have been quiet, so the map stays as large as the active set.
        if limiter.len() > 10_000 {
            limiter.retain_recent();
        }
        match limiter.check_key_n(&identity.to_owned(), n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Limited::Wait(
                not_until.wait_time_from(DefaultClock::default().now()),
            )),
            Err(_) => Err(Limited::TooMany { burst }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_per_identity() {
        let rate = PublishRate::new(&Args {
            per_second: 2,
            burst: Some(3),
        });
        assert!(rate.check("a", 3).is_ok());
        assert!(matches!(rate.check("a", 1), Err(Limited::Wait(_))));
        assert!(
            rate.check("b", 1).is_ok(),
            "another identity has its own bucket"
        );
        assert_eq!(rate.check("b", 4), Err(Limited::TooMany { burst: 3 }));
        assert!(
            PublishRate::new(&Args::default())
                .check("a", 1_000_000)
                .is_ok()
        );
    }
}
