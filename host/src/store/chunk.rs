//! Chunks: the messages of one queue with consecutive ids, appended
//! together, stored as one sled value.
//!
//! A sled insert costs the same for 100 bytes as for 100 KiB, and so does
//! a removal; one value per message made sled the broker's ceiling (about
//! 120k inserts/s here, and as many removals again for the acks). So an
//! append stores each run of consecutive ids of one queue as one value
//! under the key of its first id, and acks are kept as a bitmap per chunk
//! (next to the chunk's index entry, see below) that is rewritten once per
//! ack batch; the chunk, its index entry and its bitmap are removed in one
//! sled batch when the last message in it is acked.
//!
//! # Value format
//!
//! `0xC5`, count `n` (u32 LE), `n` end offsets (u32 LE, relative to the
//! data), then the messages' values back to back. A value that does not
//! start with `0xC5` is a single message (the per-message layout of
//! earlier versions, whose values start with a big-endian expiry and so
//! with a zero byte).
//!
//! # Index
//!
//! Next to each chunk, in a separate key space of the same tree (so one
//! atomic sled batch writes both), an *index entry* holds the size and
//! expiry of each message, and, once some are acked, the ack bitmap. Start
//! scans only these small entries, never the chunks: reading every payload
//! at start made sled's cache hold the whole backlog.
//!
//! [`Index`] keeps, per queue, every live chunk's first id, length, live
//! count and ack bitmap in memory, so that reads and acks find their chunk
//! without scanning. It is rebuilt by [`super::MessageStore::scan_queue`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Append, MsgId, QueueId, StoreError, key};

/// First byte of the index key space (queue ids never reach it: sled
/// allocates them from zero).
const INDEX: u8 = 0xFE;

/// Prefix of a queue's index entries and ack bitmaps.
pub(crate) fn index_prefix(queue: QueueId) -> [u8; 9] {
    let mut k = [INDEX; 9];
    k[1..].copy_from_slice(&queue.to_be_bytes());
    k
}

/// Key of a chunk's index entry (sizes and expiries of its messages).
pub(crate) fn index_key(queue: QueueId, first: MsgId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[..9].copy_from_slice(&index_prefix(queue));
    k[9..].copy_from_slice(&first.to_be_bytes());
    k
}

/// Key of a chunk's ack bitmap: its index key and one more byte, so it
/// sorts right after the index entry.
pub(crate) fn ack_key(queue: QueueId, first: MsgId) -> [u8; 18] {
    let mut k = [0u8; 18];
    k[..17].copy_from_slice(&index_key(queue, first));
    k[17] = 1;
    k
}

/// Encode a chunk's index entry: count, then (size u32, expiry u64) per
/// message, little-endian.
pub(crate) fn encode_index(entries: impl ExactSizeIterator<Item = (u32, u64)>) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + 12 * entries.len());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (size, expiry) in entries {
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&expiry.to_le_bytes());
    }
    out
}

/// Decode an index entry into (size, expiry) per message.
pub(crate) fn decode_index(value: &[u8]) -> Result<Vec<(u32, u64)>, StoreError> {
    let bad = || StoreError::Corrupt(format!("chunk index entry of {} bytes", value.len()));
    let count = value
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(bad)? as usize;
    if value.len() != 4 + 12 * count {
        return Err(bad());
    }
    Ok(value[4..]
        .chunks_exact(12)
        .map(|e| {
            let size = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            let mut x = [0u8; 8];
            x.copy_from_slice(&e[4..]);
            (size, u64::from_le_bytes(x))
        })
        .collect())
}

/// First byte of a chunk value.
const MAGIC: u8 = 0xC5;
/// Most messages in one chunk.
pub(crate) const MAX_MESSAGES: usize = 256;
/// Most value bytes in one chunk (a larger message gets a chunk of its own).
/// sled's page cache does not hold large values to its capacity: measured
/// here with 300 MB appended and a 64 MiB cache, RSS stayed at 57 MiB with
/// 4 KiB values, 83 MiB with 16 KiB, 170 MiB with 64 KiB and 316 MiB with
/// 256 KiB. 16 KiB keeps the backlog out of RAM and still turns a hundred
/// 100-byte messages into one sled operation.
pub(crate) const MAX_BYTES: usize = 16 << 10;

/// A chunk ready to be written: queue, first id, message count, value and
/// index entry.
pub(crate) struct NewChunk {
    pub queue: QueueId,
    pub first: MsgId,
    pub len: u32,
    pub value: Vec<u8>,
    pub index: Vec<u8>,
}

/// Cut `items` into chunks: sorted by (queue, id), split wherever the queue
/// changes, an id is not the previous one plus one, or a chunk is full.
pub(crate) fn build(mut items: Vec<Append>) -> Vec<NewChunk> {
    items.sort_by_key(|a| (a.queue, a.id));
    let mut out = Vec::new();
    let mut run: Vec<Append> = Vec::new();
    let mut bytes = 0usize;
    for item in items {
        let continues = run.last().is_some_and(|last| {
            last.queue == item.queue
                && last.id.checked_add(1) == Some(item.id)
                && run.len() < MAX_MESSAGES
                && bytes + item.value.len() <= MAX_BYTES
        });
        if !continues && !run.is_empty() {
            out.push(encode(std::mem::take(&mut run)));
            bytes = 0;
        }
        bytes += item.value.len();
        run.push(item);
    }
    if !run.is_empty() {
        out.push(encode(run));
    }
    out
}

fn encode(run: Vec<Append>) -> NewChunk {
    let data: usize = run.iter().map(|a| a.value.len()).sum();
    let mut value = Vec::with_capacity(5 + 4 * run.len() + data);
    value.push(MAGIC);
    value.extend_from_slice(&(run.len() as u32).to_le_bytes());
    let mut end = 0u32;
    for a in &run {
        end += a.value.len() as u32;
        value.extend_from_slice(&end.to_le_bytes());
    }
    for a in &run {
        value.extend_from_slice(&a.value);
    }
    let index = encode_index(run.iter().map(|a| {
        let size = u32::try_from(a.value.len()).unwrap_or(u32::MAX);
        (size, super::decode_expiry(&a.value).unwrap_or(0))
    }));
    NewChunk {
        queue: run[0].queue,
        first: run[0].id,
        len: run.len() as u32,
        value,
        index,
    }
}

/// A parsed chunk value, borrowing it.
pub(crate) struct View<'a> {
    ends: &'a [u8],
    data: &'a [u8],
    single: bool,
}

impl<'a> View<'a> {
    /// Parse a stored value; every offset is checked against its length.
    pub fn parse(value: &'a [u8]) -> Result<Self, StoreError> {
        if value.first() != Some(&MAGIC) {
            return Ok(View {
                ends: &[],
                data: value,
                single: true,
            });
        }
        let bad = |why: &str| StoreError::Corrupt(format!("message chunk: {why}"));
        let count = value
            .get(1..5)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or_else(|| bad("truncated header"))? as usize;
        let table_end = count
            .checked_mul(4)
            .and_then(|t| t.checked_add(5))
            .filter(|&t| t <= value.len())
            .ok_or_else(|| bad("offset table past the end"))?;
        let view = View {
            ends: &value[5..table_end],
            data: &value[table_end..],
            single: false,
        };
        let mut prev = 0;
        for i in 0..count {
            let end = view.end(i);
            if end < prev || end > view.data.len() {
                return Err(bad("offsets out of order or past the end"));
            }
            prev = end;
        }
        Ok(view)
    }

    /// Number of messages.
    pub fn len(&self) -> usize {
        if self.single { 1 } else { self.ends.len() / 4 }
    }

    fn end(&self, i: usize) -> usize {
        let b = &self.ends[4 * i..4 * i + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
    }

    /// The value of message `i`.
    pub fn get(&self, i: usize) -> Option<&'a [u8]> {
        if self.single {
            return (i == 0).then_some(self.data);
        }
        if i >= self.len() {
            return None;
        }
        let start = if i == 0 { 0 } else { self.end(i - 1) };
        Some(&self.data[start..self.end(i)])
    }
}

/// One live chunk in memory.
#[derive(Debug, Clone)]
pub(crate) struct ChunkState {
    /// Messages in the chunk.
    pub len: u32,
    /// Messages not acked yet.
    pub live: u32,
    /// Acked messages, one bit per message (empty until the first ack).
    pub acked: Vec<u8>,
}

impl ChunkState {
    pub fn new(len: u32, acked: Vec<u8>) -> Self {
        let done = (0..len as usize).filter(|&i| bit(&acked, i)).count() as u32;
        Self {
            len,
            live: len - done,
            acked,
        }
    }

    pub fn is_acked(&self, i: usize) -> bool {
        bit(&self.acked, i)
    }

    /// Mark message `i` acked; false if it already was.
    fn ack(&mut self, i: usize) -> bool {
        if self.is_acked(i) {
            return false;
        }
        if self.acked.is_empty() {
            self.acked = vec![0; (self.len as usize).div_ceil(8)];
        }
        self.acked[i / 8] |= 1 << (i % 8);
        self.live -= 1;
        true
    }
}

fn bit(bits: &[u8], i: usize) -> bool {
    bits.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

/// The live chunks of one queue, by first id.
#[derive(Debug)]
pub(crate) struct QueueChunks {
    id: QueueId,
    chunks: BTreeMap<MsgId, ChunkState>,
}

impl QueueChunks {
    /// The chunk holding `id`: (first id, state).
    pub fn find(&self, id: MsgId) -> Option<(MsgId, &ChunkState)> {
        let (first, c) = self.chunks.range(..=id).next_back()?;
        (id - first < u64::from(c.len)).then_some((*first, c))
    }

    pub fn insert(&mut self, first: MsgId, state: ChunkState) {
        self.chunks.insert(first, state);
    }

    /// Apply acks of `ids` and add the sled changes to `batch`: chunks that
    /// are now fully acked are removed with their bitmap, the others get
    /// their bitmap rewritten. Ids that are not live are ignored.
    pub(crate) fn ack(&mut self, ids: &[MsgId], batch: &mut super::Writes) {
        let mut touched: Vec<MsgId> = Vec::new();
        for &id in ids {
            let Some((first, _)) = self.find(id) else {
                continue;
            };
            let Some(c) = self.chunks.get_mut(&first) else {
                continue;
            };
            if c.ack((id - first) as usize) && touched.last() != Some(&first) {
                touched.push(first);
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for first in touched {
            let Some(c) = self.chunks.get(&first) else {
                continue;
            };
            if c.live == 0 {
                self.chunks.remove(&first);
                batch.remove(&key(self.id, first));
                batch.remove(&index_key(self.id, first));
                batch.remove(&ack_key(self.id, first));
            } else {
                batch.insert(&ack_key(self.id, first), c.acked.as_slice());
            }
        }
    }
}

/// Every queue's live chunks.
#[derive(Debug, Default)]
pub(crate) struct Index {
    queues: Mutex<HashMap<QueueId, Arc<Mutex<QueueChunks>>>>,
}

impl Index {
    /// The chunks of `queue`, locked. Operations on one queue are
    /// serialized (including their sled writes, so ack bitmaps are never
    /// written out of order); different queues do not wait for each other.
    pub fn queue(&self, queue: QueueId) -> Arc<Mutex<QueueChunks>> {
        let mut all = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        all.entry(queue)
            .or_insert_with(|| {
                Arc::new(Mutex::new(QueueChunks {
                    chunks: BTreeMap::new(),
                    id: queue,
                }))
            })
            .clone()
    }

    /// Forget every queue (the store's content was replaced).
    pub fn clear(&self) {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Forget `queue` (cleared or deleted).
    pub fn forget(&self, queue: QueueId) {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&queue);
    }
}

/// Lock a queue's chunks (a poisoned lock only means another thread
/// panicked mid-update of plain bookkeeping; carry on with it).
pub(crate) fn lock(q: &Mutex<QueueChunks>) -> MutexGuard<'_, QueueChunks> {
    q.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(queue: QueueId, id: MsgId, value: &[u8]) -> Append {
        Append {
            queue,
            id,
            value: value.to_vec(),
        }
    }

    #[test]
    fn runs_of_consecutive_ids_per_queue_become_chunks() {
        let chunks = build(vec![
            item(2, 10, b"c"),
            item(1, 5, b"a"),
            item(2, 11, b"d"),
            item(1, 6, b"bb"),
            item(1, 8, b"gap"),
        ]);
        let got: Vec<(QueueId, MsgId, u32)> =
            chunks.iter().map(|c| (c.queue, c.first, c.len)).collect();
        assert_eq!(got, vec![(1, 5, 2), (1, 8, 1), (2, 10, 2)]);
        let v = View::parse(&chunks[0].value).unwrap();
        assert_eq!(
            (v.len(), v.get(0), v.get(1), v.get(2)),
            (2, Some(&b"a"[..]), Some(&b"bb"[..]), None)
        );
    }

    #[test]
    fn chunks_are_capped_by_count_and_bytes() {
        let many: Vec<Append> = (0..600).map(|i| item(1, i, b"x")).collect();
        let lens: Vec<u32> = build(many).iter().map(|c| c.len).collect();
        assert_eq!(lens, vec![256, 256, 88]);
        let big = vec![0u8; MAX_BYTES / 2 + 1];
        let lens: Vec<u32> = build((0..3).map(|i| item(1, i, &big)).collect())
            .iter()
            .map(|c| c.len)
            .collect();
        assert_eq!(lens, vec![1, 1, 1]);
    }

    #[test]
    fn legacy_single_values_and_damaged_chunks() {
        let legacy = [0u8, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3];
        let v = View::parse(&legacy).unwrap();
        assert_eq!((v.len(), v.get(0)), (1, Some(&legacy[..])));
        assert!(View::parse(&[MAGIC, 1]).is_err(), "truncated header");
        assert!(
            View::parse(&[MAGIC, 200, 0, 0, 0, 1]).is_err(),
            "table past the end"
        );
        // One message claiming 9 bytes of data when there are 2.
        assert!(View::parse(&[MAGIC, 1, 0, 0, 0, 9, 0, 0, 0, 1, 2]).is_err());
    }

    #[test]
    fn index_entries_round_trip_and_refuse_bad_lengths() {
        let e = encode_index([(10u32, 0u64), (20, 99)].into_iter());
        assert_eq!(decode_index(&e).unwrap(), vec![(10, 0), (20, 99)]);
        assert!(decode_index(&e[..e.len() - 1]).is_err());
        assert!(decode_index(&[1, 0]).is_err());
        // Index keys sort apart from chunks, bitmaps right after their entry.
        assert!(index_key(1, 5)[..] < ack_key(1, 5)[..] && ack_key(1, 5)[..] < index_key(1, 6)[..]);
        assert!(key(u64::from(u32::MAX), 0)[..] < index_key(0, 0)[..]);
    }

    #[test]
    fn acks_write_bitmaps_then_remove_the_chunk() {
        let index = Index::default();
        let q = index.queue(7);
        let mut q = lock(&q);
        q.insert(100, ChunkState::new(10, Vec::new()));
        let mut batch = super::super::Writes::new(true);
        q.ack(&[100, 101, 101, 500], &mut batch);
        let (first, c) = q.find(105).unwrap();
        assert_eq!(
            (first, c.live, c.is_acked(1), c.is_acked(2)),
            (100, 8, true, false)
        );
        assert!(q.find(110).is_none() && q.find(99).is_none());
        q.ack(&(100..110).collect::<Vec<_>>(), &mut batch);
        assert!(q.find(105).is_none(), "fully acked chunks are dropped");
        // A chunk recovered with a bitmap counts its acked messages.
        assert_eq!(ChunkState::new(10, vec![0b0000_0111, 0]).live, 7);
    }
}
