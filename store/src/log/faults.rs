//! Faults the fault-model test injects into the log: a crash at a chosen point of a write or of a
//! retention pass. Test builds only.

use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

#[derive(Default)]
pub struct Faults {
    /// Set by a simulated crash: the writer stops without the clean-stop checkpoint.
    pub crashed: AtomicBool,
    /// The next group commit writes only this many bytes of its records, never syncs, and fails.
    pub torn_write: Mutex<Option<usize>>,
    /// The next retention pass that deletes segments deletes only those whose bit is set (segment
    /// i of the pass: bit i % 64), skips the directory sync, and fails.
    pub delete_mask: Mutex<Option<u64>>,
}

impl Faults {
    pub fn take_torn_write(&self) -> Option<usize> {
        self.torn_write
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    pub fn take_delete_mask(&self) -> Option<u64> {
        self.delete_mask
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}
