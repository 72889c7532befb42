//! The idempotency window: which ids each channel has seen recently, and at which seq. Bounded in
//! time (ids older than the window are forgotten) and in count (the oldest go first), so memory is
//! bounded whatever the publishers do. Rebuilt from the log on start, so it survives restarts.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

pub struct Dedupe {
    window_ms: u64,
    max_ids: usize,
    /// `channel \n source \n id` ([`key`]) → seq. foldhash: fast on
    /// short strings and seeded per process, so publishers cannot aim collisions at it.
    seen: HashMap<Arc<str>, u64, foldhash::fast::RandomState>,
    /// Insertion order, for forgetting the oldest: (commit time, key, seq).
    order: VecDeque<(u64, Arc<str>, u64)>,
}

/// `channel \n source \n id`: an event's identity for idempotency, as CloudEvents defines it
/// (`source` + `id`), within its channel. No channel, source or id can hold a newline.
pub fn key(channel: &str, source: &str, id: &str) -> String {
    let mut key = String::with_capacity(channel.len() + source.len() + id.len() + 2);
    key.push_str(channel);
    key.push('\n');
    key.push_str(source);
    key.push('\n');
    key.push_str(id);
    key
}

impl Dedupe {
    pub fn new(window_ms: u64, max_ids: usize) -> Self {
        Self {
            window_ms,
            max_ids: max_ids.max(1),
            seen: HashMap::with_hasher(foldhash::fast::RandomState::default()),
            order: VecDeque::new(),
        }
    }

    #[cfg(test)]
    pub fn get(&self, channel: &str, id: &str) -> Option<u64> {
        self.seen.get(key(channel, "s", id).as_str()).copied()
    }

    pub fn insert(&mut self, channel: &str, source: &str, id: &str, seq: u64, time_ms: u64) {
        self.insert_key(key(channel, source, id), seq, time_ms);
    }

    /// The seq remembered for a key made by [`key`].
    pub fn get_key(&self, key: &str) -> Option<u64> {
        self.seen.get(key).copied()
    }

    pub fn insert_key(&mut self, key: String, seq: u64, time_ms: u64) {
        // Recovery reads records the checkpoint or the manifest may already have restored.
        if self.seen.get(key.as_str()) == Some(&seq) {
            return;
        }
        let key: Arc<str> = Arc::from(key);
        self.seen.insert(key.clone(), seq);
        self.order.push_back((time_ms, key, seq));
        while self.order.len() > self.max_ids {
            self.forget_oldest();
        }
    }

    /// Forgets ids committed before `now_ms - window`.
    pub fn expire(&mut self, now_ms: u64) {
        let horizon = now_ms.saturating_sub(self.window_ms);
        while self
            .order
            .front()
            .is_some_and(|(time, _, _)| *time < horizon)
        {
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) {
        if let Some((_, key, seq)) = self.order.pop_front() {
            // The same id may have been stored again after an earlier expiry; keep the newer one.
            if self.seen.get(&key) == Some(&seq) {
                self.seen.remove(&key);
            }
        }
    }

    /// What is remembered, oldest first: (commit time, `channel \n id`, seq), for the checkpoint.
    pub fn entries(&self) -> Vec<(u64, String, u64)> {
        self.order
            .iter()
            .filter(|(_, key, seq)| self.seen.get(key) == Some(seq))
            .map(|(time, key, seq)| (*time, key.to_string(), *seq))
            .collect()
    }

    /// Makes room for `n` more entries (a checkpoint being restored).
    pub fn reserve(&mut self, n: usize) {
        self.seen.reserve(n);
        self.order.reserve(n);
    }

    /// The entries of events below their channel's first retained seq (`firsts`; absent: 1),
    /// oldest first: what the retention manifest keeps of the events it lets go.
    pub fn entries_below(&self, firsts: &HashMap<String, u64>) -> Vec<(u64, Arc<str>, u64)> {
        self.order
            .iter()
            .filter(|(_, key, seq)| {
                self.seen.get(key) == Some(seq)
                    && key
                        .split_once('\n')
                        .and_then(|(channel, _)| firsts.get(channel))
                        .is_some_and(|first| seq < first)
            })
            .cloned()
            .collect()
    }

    /// Remembers an entry read back from a checkpoint or the retention manifest.
    pub fn restore(&mut self, time_ms: u64, key: Arc<str>, seq: u64) {
        if self.seen.get(&key) == Some(&seq) {
            return;
        }
        self.seen.insert(key.clone(), seq);
        self.order.push_back((time_ms, key, seq));
        while self.order.len() > self.max_ids {
            self.forget_oldest();
        }
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_by_count_and_by_time() {
        let mut dedupe = Dedupe::new(1000, 3);
        for (n, time) in [(1, 0), (2, 10), (3, 2000), (4, 2010)] {
            dedupe.insert("c", "s", &format!("id{n}"), n, time);
        }
        assert_eq!(
            dedupe.get("c", "id1"),
            None,
            "the oldest goes past the count bound"
        );
        assert_eq!(dedupe.get("c", "id2"), Some(2));
        assert_eq!(dedupe.get("other", "id2"), None, "ids are per channel");
        dedupe.expire(2500);
        assert_eq!(dedupe.get("c", "id2"), None, "older than the window");
        assert_eq!(dedupe.get("c", "id3"), Some(3));
        assert_eq!(dedupe.len(), 2);
    }
}
