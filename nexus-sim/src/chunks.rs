//! Full maps as a run of zstd frames, most of them kept from an earlier full map that held the
//! same peer entries.
//!
//! A member's first map (and every reconnect's) holds its whole org: 7.3 MB of JSON at 10,000
//! members, about 1.2 MB compressed, and compressing it (zstd level 1) cost nexus-sim 12–17 ms
//! per map. Two members' maps differ only in their own entry, node and filter; the org's other entries
//! are the same bytes (the entry cache hands out one `Bytes` per node record). RFC 8878 lets a
//! body be several frames back to back, decoded as the concatenation of their contents (libzstd
//! and the Go decoder Tailscale uses both read it so). So the peer list is cut into chunks,
//! each compressed as a frame of its own and kept, and the next full map copies every chunk
//! whose entries are the same `Bytes`: a join or an endpoint change compresses the chunks
//! around the changed entries and the viewer's own, not the org.
//!
//! Where a chunk ends depends only on its last entry (a hash of the entry's address), not on
//! its position: leaving a viewer's own entry out, or a new member at the end, changes the
//! chunks holding those entries and no others. Written here because no crate cuts a JSON array
//! into reusable compressed pieces.

use bytes::Bytes;
use std::collections::HashMap;

/// Entries per chunk on average (about 95 KB of JSON, 18 KB compressed at 10,000 members).
const MEAN_ENTRIES: u64 = 128;
/// A chunk ends after this many entries even where no entry ends one.
const MAX_ENTRIES: usize = 1024;

/// Compressed chunks of peer lists, by their entries.
#[derive(Default)]
pub struct ChunkCache {
    inner: parking_lot::Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    chunks: HashMap<u64, Chunk>,
    /// Entries the kept chunks hold, to bound them.
    entries: usize,
}

struct Chunk {
    /// The entries, held so their addresses are not reused while the chunk is kept: the same
    /// address and length is then the same bytes.
    entries: Vec<Bytes>,
    /// Their zstd frame: each entry followed by a comma.
    frame: Bytes,
}

/// Whether a chunk ends after `e`.
fn ends_chunk(e: &Bytes) -> bool {
    let a = e.as_ptr() as u64;
    (a.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40).is_multiple_of(MEAN_ENTRIES)
}

fn key_of(entries: &[Bytes]) -> u64 {
    entries.iter().fold(entries.len() as u64, |h, e| {
        (h.rotate_left(23) ^ e.as_ptr() as u64 ^ (e.len() as u64) << 48).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    })
}

fn same(a: &[Bytes], b: &[Bytes]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.as_ptr() == y.as_ptr() && x.len() == y.len())
}

impl ChunkCache {
    /// The zstd body of a map whose JSON is `prefix`, then `entries` joined by commas, then
    /// `suffix`: a frame for the prefix, one per chunk of entries (kept ones copied), and one
    /// for the last entry and the suffix. `bound` caps the entries the kept chunks hold (a few
    /// times the nodes there are); past it they are all dropped and come back on use.
    pub fn body(&self, prefix: &[u8], entries: &[Bytes], suffix: &[u8], bound: usize) -> Vec<u8> {
        let Some((last, rest)) = entries.split_last() else {
            return crate::control::zstd_frame(&[prefix, suffix].concat());
        };
        let mut ranges = vec![];
        let mut start = 0;
        for (i, e) in rest.iter().enumerate() {
            if ends_chunk(e) || i + 1 - start >= MAX_ENTRIES || i + 1 == rest.len() {
                ranges.push(start..i + 1);
                start = i + 1;
            }
        }
        // Keys are computed and missing frames compressed outside the lock.
        let keys: Vec<u64> = ranges.iter().map(|r| key_of(&rest[r.clone()])).collect();
        let mut frames: Vec<Option<Bytes>> = {
            let kept = self.inner.lock();
            ranges
                .iter()
                .zip(&keys)
                .map(|(r, k)| {
                    kept.chunks.get(k).filter(|c| same(&c.entries, &rest[r.clone()])).map(|c| c.frame.clone())
                })
                .collect()
        };
        let mut made = vec![];
        for ((r, f), key) in ranges.iter().zip(&mut frames).zip(&keys) {
            if f.is_none() {
                let chunk = &rest[r.clone()];
                let mut json = Vec::with_capacity(chunk.iter().map(|e| e.len() + 1).sum());
                for e in chunk {
                    json.extend_from_slice(e);
                    json.push(b',');
                }
                let frame = Bytes::from(crate::control::zstd_frame(&json));
                made.push((*key, Chunk { entries: chunk.to_vec(), frame: frame.clone() }));
                *f = Some(frame);
            }
        }
        if !made.is_empty() {
            let mut kept = self.inner.lock();
            for (key, c) in made {
                kept.entries += c.entries.len();
                if let Some(old) = kept.chunks.insert(key, c) {
                    kept.entries -= old.entries.len();
                }
            }
            if kept.entries > bound {
                *kept = Kept::default();
            }
        }
        let mut body = crate::control::zstd_frame(prefix);
        for f in frames.iter().flatten() {
            body.extend_from_slice(f);
        }
        body.extend_from_slice(&crate::control::zstd_frame(&[&last[..], suffix].concat()));
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use citadel_proto::tailcfg::{decode_map_body, MapResponse, Node};

    fn entry(id: i64, endpoint: u16) -> Bytes {
        let n = Node {
            id,
            name: format!("node{id}.example."),
            endpoints: vec![format!("127.0.0.1:{endpoint}")],
            ..Default::default()
        };
        Bytes::from(serde_json::to_vec(&n).unwrap())
    }

    fn decode(body: &[u8]) -> MapResponse {
        decode_map_body(body, true).expect("the chunked body decodes")
    }

    /// A chunked body decodes to the same message as the plain JSON, for lists of every length
    /// around the chunk sizes; the next map with one entry changed reuses the other chunks.
    #[test]
    fn chunked_full_maps_decode_whole_and_reuse_unchanged_chunks() {
        let cache = ChunkCache::default();
        let prefix = br#"{"Domain":"example.","Peers":["#;
        for n in [0, 1, 2, 3, 127, 128, 129, 1500, 3000] {
            let entries: Vec<Bytes> = (0..n).map(|i| entry(i, 1000)).collect();
            let body = cache.body(prefix, &entries, b"]}", 1 << 20);
            let m = decode(&body);
            assert_eq!(m.domain, "example.");
            let ids: Vec<i64> = m.peers.unwrap_or_default().iter().map(|p| p.id).collect();
            assert_eq!(ids, (0..n).collect::<Vec<_>>(), "{n} entries");
        }
        // One entry changed: only its chunk (and the last one) are compressed again.
        let mut entries: Vec<Bytes> = (0..3000).map(|i| entry(i, 1000)).collect();
        cache.body(prefix, &entries, b"]}", 1 << 20);
        entries[1700] = entry(1700, 2000);
        let kept_before = cache.inner.lock().chunks.len();
        let second = cache.body(prefix, &entries, b"]}", 1 << 20);
        let m = decode(&second);
        assert_eq!(m.peers.as_ref().unwrap()[1700].endpoints, vec!["127.0.0.1:2000".to_string()]);
        assert_eq!(m.peers.unwrap().len(), 3000);
        assert_eq!(cache.inner.lock().chunks.len(), kept_before + 1, "only the changed entry's chunk made again");
    }

    /// Leaving one entry out (the viewer's own) changes only the chunks around it.
    #[test]
    fn a_viewer_left_out_changes_only_its_chunk() {
        let cache = ChunkCache::default();
        let entries: Vec<Bytes> = (0..4000).map(|i| entry(i, 1000)).collect();
        cache.body(b"{\"Peers\":[", &entries, b"]}", 1 << 20);
        let kept = cache.inner.lock().chunks.len();
        let mut without = entries.clone();
        without.remove(2100);
        let m = decode(&cache.body(b"{\"Peers\":[", &without, b"]}", 1 << 20));
        assert_eq!(m.peers.unwrap().len(), 3999);
        assert_eq!(cache.inner.lock().chunks.len(), kept + 1);
    }

    /// Past the bound every kept chunk is dropped; maps stay whole.
    #[test]
    fn kept_chunks_are_bounded() {
        let cache = ChunkCache::default();
        for round in 0..5 {
            let entries: Vec<Bytes> = (0..2000).map(|i| entry(i, 1000 + round)).collect();
            let m = decode(&cache.body(b"{\"Peers\":[", &entries, b"]}", 3000));
            assert_eq!(m.peers.unwrap().len(), 2000);
            assert!(cache.inner.lock().entries <= 3000);
        }
    }
}
