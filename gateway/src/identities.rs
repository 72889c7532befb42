//! Connections per identity: a gateway lets one identity hold at most so many connections, so a
//! leaked token cannot take every socket (the listener's connection cap bounds them all).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Clone)]
pub struct Identities {
    /// 0: no limit.
    max: usize,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

/// One connection's place; released when dropped.
pub struct Slot {
    identity: String,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

impl Identities {
    pub fn new(max: usize) -> Self {
        Identities {
            max,
            open: Arc::default(),
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// A place for one more connection of `identity`, or `None` when it holds `max` already.
    pub fn take(&self, identity: &str) -> Option<Slot> {
        if self.max == 0 {
            return Some(Slot {
                identity: String::new(),
                open: Arc::default(),
            });
        }
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(identity.to_owned()).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(Slot {
            identity: identity.to_owned(),
            open: self.open.clone(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.identity) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.identity);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_max_per_identity_and_released_on_drop() {
        let identities = Identities::new(2);
        let a = identities.take("alice").unwrap();
        let _b = identities.take("alice").unwrap();
        assert!(identities.take("alice").is_none());
        assert!(identities.take("bob").is_some());
        drop(a);
        assert!(identities.take("alice").is_some());
        assert!(
            identities.open.lock().unwrap().get("bob").is_none(),
            "forgotten when gone"
        );
        let unlimited = Identities::new(0);
        let many: Vec<_> = (0..100).filter_map(|_| unlimited.take("alice")).collect();
        assert_eq!(many.len(), 100);
    }
}
