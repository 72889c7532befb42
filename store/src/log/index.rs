//! The in-memory index: per channel, where each seq sits on disk, and the newest seq of each key
//! (for compacted reads). It only ever holds committed (fsync'd) records.

use std::collections::HashMap;

/// Where one record sits: segment number, byte offset, length on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub segment: u32,
    pub offset: u64,
    pub len: u32,
}

#[derive(Debug, Default)]
pub struct ChannelIndex {
    /// `locations[seq - 1]`: seqs start at 1 and have no gaps.
    pub locations: Vec<Location>,
    /// Newest seq per key, and whether that newest event deleted the key.
    pub keys: HashMap<String, (u64, bool)>,
    /// Seqs of events without a key, in order: a compacted read keeps them all.
    pub keyless: Vec<u64>,
}

impl ChannelIndex {
    pub fn head(&self) -> u64 {
        self.locations.len() as u64
    }

    pub fn push(&mut self, seq: u64, location: Location, key: Option<&str>, deleted: bool) {
        debug_assert_eq!(seq, self.head() + 1);
        self.locations.push(location);
        match key {
            Some(key) => match self.keys.get_mut(key) {
                Some(entry) => *entry = (seq, deleted),
                None => {
                    self.keys.insert(key.to_owned(), (seq, deleted));
                }
            },
            None => self.keyless.push(seq),
        }
    }

    /// Up to `limit` seqs after `after`, in order.
    pub fn range(&self, after: u64, limit: usize) -> Vec<(u64, Location)> {
        let start = after as usize;
        let end = (start + limit).min(self.locations.len());
        (start..end)
            .map(|i| (i as u64 + 1, self.locations[i]))
            .collect()
    }

    /// Up to `limit` seqs after `after` of the compacted channel: the newest event of each live key,
    /// and every event without a key.
    pub fn compacted_range(&self, after: u64, limit: usize) -> Vec<(u64, Location)> {
        let mut seqs: Vec<u64> = self
            .keys
            .values()
            .filter(|(seq, deleted)| *seq > after && !deleted)
            .map(|(seq, _)| *seq)
            .collect();
        let first_keyless = self.keyless.partition_point(|seq| *seq <= after);
        seqs.extend_from_slice(&self.keyless[first_keyless..]);
        seqs.sort_unstable();
        seqs.truncate(limit);
        seqs.into_iter()
            .map(|seq| (seq, self.locations[(seq - 1) as usize]))
            .collect()
    }
}

#[derive(Debug, Default)]
pub struct Index {
    pub channels: HashMap<String, ChannelIndex>,
}

impl Index {
    pub fn head(&self, channel: &str) -> u64 {
        self.channels.get(channel).map_or(0, ChannelIndex::head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(offset: u64) -> Location {
        Location {
            segment: 0,
            offset,
            len: 1,
        }
    }

    #[test]
    fn compacted_range_keeps_newest_live_key_and_keyless() {
        let mut channel = ChannelIndex::default();
        channel.push(1, at(1), Some("a"), false);
        channel.push(2, at(2), Some("b"), false);
        channel.push(3, at(3), None, false);
        channel.push(4, at(4), Some("a"), false);
        channel.push(5, at(5), Some("b"), true);
        let seqs = |after, limit| {
            channel
                .compacted_range(after, limit)
                .into_iter()
                .map(|(s, _)| s)
                .collect::<Vec<_>>()
        };
        assert_eq!(seqs(0, 10), vec![3, 4]);
        assert_eq!(seqs(3, 10), vec![4]);
        assert_eq!(seqs(0, 1), vec![3]);
        assert_eq!(channel.range(3, 10).len(), 2);
        assert_eq!(channel.range(5, 10).len(), 0);
    }
}
