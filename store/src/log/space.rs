//! The low-space watermark: appends are refused (with a clear error, nothing half-written) while
//! the file system holding the log has less than `min_free` bytes available, and accepted again by
//! themselves once space is freed. The free space is read (statvfs) at most every
//! [`REFRESH`], and in between lowered by what each admitted append brings, so a burst between two
//! readings cannot run past the watermark unnoticed; an append is refused only on a fresh reading.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::LogError;

const REFRESH: Duration = Duration::from_millis(100);

pub struct Watch {
    dir: PathBuf,
    /// 0: no watermark.
    min_free: u64,
    started: Instant,
    /// Milliseconds since `started` of the last reading, plus one (0: never read).
    read_at: AtomicU64,
    /// Bytes available at the last reading, less what was admitted since.
    free: AtomicU64,
    /// The size of the last append refused (0 once one is admitted): readiness stays down until
    /// it would fit.
    refused: AtomicU64,
}

impl Watch {
    pub fn new(dir: PathBuf, min_free: u64) -> Self {
        Watch {
            dir,
            min_free,
            started: Instant::now(),
            read_at: AtomicU64::new(0),
            free: AtomicU64::new(u64::MAX),
            refused: AtomicU64::new(0),
        }
    }

    fn refresh(&self) {
        let now = self.started.elapsed().as_millis() as u64 + 1;
        let last = self.read_at.load(Ordering::Acquire);
        if last != 0 && now.saturating_sub(last) < REFRESH.as_millis() as u64 {
            return;
        }
        if self
            .read_at
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return; // another caller is reading it
        }
        self.read();
    }

    fn read(&self) {
        // A file system that cannot tell is not refused for it.
        let free = rustix::fs::statvfs(&self.dir)
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
            .unwrap_or(u64::MAX);
        self.free.store(free, Ordering::Release);
    }

    /// Whether the log is below its watermark now (or the last append refused would still not fit).
    pub fn is_low(&self) -> bool {
        if self.min_free == 0 {
            return false;
        }
        self.refresh();
        let wanted = self
            .min_free
            .saturating_add(self.refused.load(Ordering::Relaxed));
        self.free.load(Ordering::Acquire) < wanted
    }

    /// Admits an append of about `bytes`, or refuses it while space is low.
    pub fn admit(&self, bytes: u64) -> Result<(), LogError> {
        if self.min_free == 0 {
            return Ok(());
        }
        self.refresh();
        let mut free = self.free.load(Ordering::Acquire);
        if free < self.min_free.saturating_add(bytes) {
            // The estimate errs low (an append written over the zeros the writer keeps ahead takes
            // no new space): refuse only on a reading, so that readiness, which reads too, agrees.
            self.read();
            free = self.free.load(Ordering::Acquire);
        }
        if free < self.min_free.saturating_add(bytes) {
            self.refused.store(bytes, Ordering::Relaxed);
            return Err(LogError::LowSpace {
                free,
                min: self.min_free,
            });
        }
        self.refused.store(0, Ordering::Relaxed);
        // Relaxed is enough: an estimate between two readings.
        let _ = self
            .free
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| {
                Some(f.saturating_sub(bytes))
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_below_the_watermark_and_never_without_one() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            Watch::new(dir.path().to_owned(), 0)
                .admit(u64::MAX / 2)
                .is_ok()
        );
        let watch = Watch::new(dir.path().to_owned(), u64::MAX / 2);
        assert!(matches!(watch.admit(1), Err(LogError::LowSpace { .. })));
        assert!(watch.is_low());
        let roomy = Watch::new(dir.path().to_owned(), 1);
        assert!(roomy.admit(1).is_ok());
        assert!(!roomy.is_low());
    }
}
