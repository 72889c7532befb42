//! The in-memory index: per channel, where each retained seq sits on disk, and the newest seq of
//! each key (for compacted reads); per segment, what it holds (for retention). It only ever holds
//! committed (fsync'd) records.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// Where one record sits: segment number, byte offset, length on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub segment: u32,
    pub offset: u64,
    pub len: u32,
}

#[derive(Debug)]
pub struct ChannelIndex {
    /// The first retained seq: reads below it are refused as truncated.
    pub first: u64,
    /// `locations[seq - first]` for every retained seq; seqs have no gaps.
    pub locations: VecDeque<Location>,
    /// Bytes on disk of the retained events.
    pub bytes: u64,
    /// Newest seq per key, and whether that newest event deleted the key.
    pub keys: HashMap<String, (u64, bool)>,
    /// The seqs of `keys` that are live (newest of their key, not a deletion), in order: a
    /// compacted read is a ranged scan of these and `keyless`, never a sort of every key.
    pub live: BTreeSet<u64>,
    /// Seqs of events without a key, in order: a compacted read keeps them all.
    pub keyless: VecDeque<u64>,
}

impl ChannelIndex {
    /// A channel whose first record on disk has seq `first` (1 unless retention removed older ones).
    pub fn starting_at(first: u64) -> Self {
        Self {
            first,
            locations: VecDeque::new(),
            bytes: 0,
            keys: HashMap::new(),
            live: BTreeSet::new(),
            keyless: VecDeque::new(),
        }
    }

    /// Rebuilds `live` from `keys` (after a checkpoint is loaded).
    pub fn rebuild_live(&mut self) {
        self.live = self
            .keys
            .values()
            .filter(|(_, deleted)| !deleted)
            .map(|(seq, _)| *seq)
            .collect();
    }

    pub fn head(&self) -> u64 {
        self.first + self.locations.len() as u64 - 1
    }

    pub fn location(&self, seq: u64) -> Option<Location> {
        seq.checked_sub(self.first)
            .and_then(|i| self.locations.get(i as usize))
            .copied()
    }

    pub fn push(&mut self, seq: u64, location: Location, key: Option<&str>, deleted: bool) {
        debug_assert_eq!(seq, self.head() + 1);
        self.locations.push_back(location);
        self.bytes += location.len as u64;
        match key {
            Some(key) => {
                let before = match self.keys.get_mut(key) {
                    Some(entry) => std::mem::replace(entry, (seq, deleted)),
                    None => {
                        self.keys.insert(key.to_owned(), (seq, deleted));
                        (0, true)
                    }
                };
                if !before.1 {
                    self.live.remove(&before.0);
                }
                if !deleted {
                    self.live.insert(seq);
                }
            }
            None => self.keyless.push_back(seq),
        }
    }

    /// Forgets every seq below `first`. Keys whose newest event goes are forgotten too: a key
    /// whose history is gone is as good as never written.
    pub fn truncate_below(&mut self, first: u64) {
        let first = first.min(self.head() + 1);
        if first <= self.first {
            return;
        }
        for _ in self.first..first {
            if let Some(location) = self.locations.pop_front() {
                self.bytes -= location.len as u64;
            }
        }
        self.first = first;
        self.keys.retain(|_, (seq, _)| *seq >= first);
        self.live = self.live.split_off(&first);
        while self.keyless.front().is_some_and(|seq| *seq < first) {
            self.keyless.pop_front();
        }
    }

    /// Up to `limit` seqs after `after`, in order.
    pub fn range(&self, after: u64, limit: usize) -> Vec<(u64, Location)> {
        let start = after.max(self.first - 1) + 1;
        let end = (start + limit as u64).min(self.head() + 1);
        (start..end)
            .filter_map(|seq| self.location(seq).map(|l| (seq, l)))
            .collect()
    }

    /// Up to `limit` seqs after `after` of the compacted channel: the newest event of each live key,
    /// and every event without a key.
    /// Both are ordered, so this is a merge of two ranged scans: O(limit), whatever the number
    /// of keys.
    pub fn compacted_range(&self, after: u64, limit: usize) -> Vec<(u64, Location)> {
        let mut keyed = self
            .live
            .range(after.saturating_add(1)..)
            .copied()
            .peekable();
        let first_keyless = self.keyless.partition_point(|seq| *seq <= after);
        let mut keyless = self.keyless.range(first_keyless..).copied().peekable();
        let mut out = Vec::with_capacity(limit.min(1024));
        while out.len() < limit {
            let next = match (keyed.peek(), keyless.peek()) {
                (Some(a), Some(b)) if a < b => keyed.next(),
                (Some(_), None) => keyed.next(),
                (_, Some(_)) => keyless.next(),
                (None, None) => None,
            };
            let Some(seq) = next else { break };
            if let Some(location) = self.location(seq) {
                out.push((seq, location));
            }
        }
        out
    }
}

/// What one segment holds: enough to know when retention may delete it whole.
#[derive(Debug, Default, Clone)]
pub struct SegmentInfo {
    /// Commit time of its newest record, in Unix milliseconds.
    pub newest_ms: u64,
    /// The largest seq of each channel in it.
    pub last_seq: HashMap<String, u64>,
}

#[derive(Debug, Default)]
pub struct Index {
    pub channels: HashMap<String, ChannelIndex>,
    /// Every channel's name, in order: listing by prefix is a ranged scan, never a sort.
    pub names: BTreeSet<String>,
    pub segments: BTreeMap<u32, SegmentInfo>,
    /// Counts channels added: whoever keeps a list of channels knows when to look again.
    pub added: u64,
}

impl Index {
    pub fn head(&self, channel: &str) -> u64 {
        self.channels.get(channel).map_or(0, ChannelIndex::head)
    }

    /// Records one committed (or recovered) record.
    pub fn add(
        &mut self,
        channel: &str,
        seq: u64,
        location: Location,
        key: Option<&str>,
        deleted: bool,
        time_ms: u64,
    ) {
        let index = match self.channels.get_mut(channel) {
            Some(index) => index,
            None => {
                self.names.insert(channel.to_owned());
                self.added += 1;
                self.channels
                    .entry(channel.to_owned())
                    .or_insert_with(|| ChannelIndex::starting_at(seq))
            }
        };
        index.push(seq, location, key, deleted);
        let segment = self.segments.entry(location.segment).or_default();
        segment.newest_ms = segment.newest_ms.max(time_ms);
        match segment.last_seq.get_mut(channel) {
            Some(last) => *last = seq,
            None => {
                segment.last_seq.insert(channel.to_owned(), seq);
            }
        }
    }

    /// Up to `limit` channels whose name starts with `prefix` and sorts after `after`, with their
    /// heads: a ranged scan of the ordered names, O(log n + limit).
    pub fn list(&self, prefix: &str, after: &str, limit: usize) -> Vec<(String, u64)> {
        use std::ops::Bound;
        let from = if after >= prefix {
            Bound::Excluded(after)
        } else {
            Bound::Included(prefix)
        };
        self.names
            .range::<str, _>((from, Bound::Unbounded))
            .take_while(|name| name.starts_with(prefix))
            .filter_map(|name| {
                let head = self.channels.get(name)?.head();
                (head > 0).then(|| (name.clone(), head))
            })
            .take(limit)
            .collect()
    }

    /// Forgets everything known of `channel`, whose next record has seq `seq`: recovery found
    /// the seqs in between gone with segments retention deleted.
    pub fn restart_channel(&mut self, channel: &str, seq: u64) {
        if let Some(index) = self.channels.get_mut(channel) {
            *index = ChannelIndex::starting_at(seq);
        }
    }

    /// Sealed segments none of whose records is retained any more.
    pub fn dead_segments(&self, active: u32) -> Vec<u32> {
        self.segments
            .iter()
            .filter(|(number, _)| **number != active)
            .filter(|(_, info)| {
                info.last_seq.iter().all(|(channel, last)| {
                    self.channels.get(channel).is_none_or(|c| *last < c.first)
                })
            })
            .map(|(number, _)| *number)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(offset: u64) -> Location {
        Location {
            segment: 0,
            offset,
            len: 10,
        }
    }

    #[test]
    fn compacted_range_keeps_newest_live_key_and_keyless() {
        let mut channel = ChannelIndex::starting_at(1);
        channel.push(1, at(1), Some("a"), false);
        channel.push(2, at(2), Some("b"), false);
        channel.push(3, at(3), None, false);
        channel.push(4, at(4), Some("a"), false);
        channel.push(5, at(5), Some("b"), true);
        let seqs = |channel: &ChannelIndex, after, limit| {
            channel
                .compacted_range(after, limit)
                .into_iter()
                .map(|(s, _)| s)
                .collect::<Vec<_>>()
        };
        assert_eq!(seqs(&channel, 0, 10), vec![3, 4]);
        assert_eq!(seqs(&channel, 3, 10), vec![4]);
        assert_eq!(seqs(&channel, 0, 1), vec![3]);
        assert_eq!(channel.range(3, 10).len(), 2);
        assert_eq!(channel.range(5, 10).len(), 0);

        channel.truncate_below(4);
        assert_eq!((channel.first, channel.head(), channel.bytes), (4, 5, 20));
        assert_eq!(seqs(&channel, 0, 10), vec![4]);
        assert_eq!(
            channel
                .range(0, 10)
                .iter()
                .map(|(s, _)| *s)
                .collect::<Vec<_>>(),
            vec![4, 5]
        );
        assert_eq!(channel.location(3), None);
    }

    #[test]
    fn listing_is_a_ranged_scan_in_name_order() {
        let mut index = Index::default();
        for (n, name) in ["b.2", "a.1", "b.1", "c", "b.10", "ba"].iter().enumerate() {
            index.add(name, 1, at(n as u64), None, false, 0);
        }
        let names = |prefix: &str, after: &str, limit| {
            index
                .list(prefix, after, limit)
                .into_iter()
                .map(|(n, _)| n)
                .collect::<Vec<_>>()
        };
        assert_eq!(names("b.", "", 10), ["b.1", "b.10", "b.2"]);
        assert_eq!(names("b.", "b.1", 10), ["b.10", "b.2"]);
        assert_eq!(names("b.", "", 2), ["b.1", "b.10"]);
        assert_eq!(names("", "b.2", 10), ["ba", "c"]);
        assert!(names("nomatch", "", 10).is_empty());
        assert_eq!(names("b", "a.9", 10), ["b.1", "b.10", "b.2", "ba"]);
    }

    #[test]
    fn a_segment_dies_when_every_channel_in_it_moved_past_it() {
        let mut index = Index::default();
        let loc = |segment| Location {
            segment,
            offset: 0,
            len: 1,
        };
        index.add("a", 1, loc(0), None, false, 10);
        index.add("b", 1, loc(0), None, false, 10);
        index.add("a", 2, loc(1), None, false, 20);
        index.add("b", 2, loc(2), None, false, 30);
        assert!(index.dead_segments(2).is_empty());
        index.channels.get_mut("a").unwrap().truncate_below(2);
        assert!(index.dead_segments(2).is_empty(), "b still needs segment 0");
        index.channels.get_mut("b").unwrap().truncate_below(2);
        assert_eq!(index.dead_segments(2), vec![0]);
    }
}
