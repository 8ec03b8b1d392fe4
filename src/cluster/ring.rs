//! The peers' Ketama ring, keyed by the peers' names as written (`cluster.peers`), not by the
//! addresses they resolve to: a pod that comes back under the same name with another address
//! keeps its shards, and every node builds the same ring from the same list whatever its
//! resolver says.
//!
//! The points are nginx's (`hash $key consistent`) and `pingora-ketama`'s: for each node,
//! 160 points, each the CRC32 of `host "\0" port` followed by the previous point's hash (0
//! for the first); a key goes to the first point at or after its CRC32, wrapping around.
//! `pingora-ketama` takes `SocketAddr`s only (it hashes the IP's text), so the ring is built
//! here over the names with the same arithmetic; for names that are IP addresses the test
//! below checks that both rings choose the same node for every key.

/// Points per node (nginx's and pingora-ketama's `DEFAULT_POINT_MULTIPLE`, weight 1).
const POINTS_PER_NODE: u32 = 160;

/// A ring over at most `u16::MAX` names (the configuration allows far fewer).
pub struct Ring {
    /// (hash, node index), sorted by hash, one point per hash.
    points: Box<[(u32, u16)]>,
    nodes: usize,
}

impl Ring {
    /// The ring of `names` (`host:port`), each of weight 1.
    pub fn new(names: &[String]) -> Ring {
        let mut points = Vec::with_capacity(names.len() * POINTS_PER_NODE as usize);
        for (i, name) in names.iter().enumerate().take(u16::MAX as usize) {
            let (host, port) = match name.rsplit_once(':') {
                Some((h, p)) => (h, p),
                None => (name.as_str(), ""),
            };
            // An IPv6 peer is written `[::1]:8080`; nginx and pingora-ketama hash the address
            // without brackets.
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            let mut base = crc32fast::Hasher::new();
            base.update(host.as_bytes());
            base.update(b"\0");
            base.update(port.as_bytes());
            let mut prev: u32 = 0;
            for _ in 0..POINTS_PER_NODE {
                let mut h = base.clone();
                h.update(&prev.to_le_bytes());
                let hash = h.finalize();
                points.push((hash, i as u16));
                prev = hash;
            }
        }
        // As pingora-ketama: sorted by hash, the first of equal hashes kept (a stable sort,
        // so the earlier name wins a collision on every node alike).
        points.sort_by_key(|p| p.0);
        points.dedup_by_key(|p| p.0);
        Ring {
            points: points.into_boxed_slice(),
            nodes: names.len().min(u16::MAX as usize),
        }
    }

    /// The nodes in the order the ring offers them for `key`: its owner first, then each
    /// other node once, in the order of their next points (where the key's shard goes when
    /// the nodes before are down).
    pub fn walk(&self, key: &[u8]) -> Vec<usize> {
        let mut order = Vec::with_capacity(self.nodes);
        if self.points.is_empty() {
            return order;
        }
        let hash = crc32fast::hash(key);
        let start = self.points.partition_point(|p| p.0 < hash) % self.points.len();
        let mut seen = vec![false; self.nodes];
        for i in 0..self.points.len() {
            let node = self.points[(start + i) % self.points.len()].1 as usize;
            if !seen[node] {
                seen[node] = true;
                order.push(node);
                if order.len() == self.nodes {
                    break;
                }
            }
        }
        order
    }

    /// The owner of `key`.
    pub fn owner(&self, key: &[u8]) -> Option<usize> {
        self.walk(key).first().copied()
    }
}

/// The ring key of the shard holding byte `offset` of the object with cache key `object`:
/// the key, `#`, the shard's index.
pub fn shard_key(object: &str, offset: u64, shard_size: u64) -> Vec<u8> {
    let shard = offset / shard_size.max(1);
    let mut k = Vec::with_capacity(object.len() + 21);
    k.extend_from_slice(object.as_bytes());
    k.push(b'#');
    k.extend_from_slice(itoa::Buffer::new().format(shard).as_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{}:8080", i + 1)).collect()
    }

    #[test]
    fn chooses_as_pingora_ketama_does_for_ip_names() {
        let names = names(5);
        let buckets: Vec<_> = names
            .iter()
            .map(|n| pingora_ketama::Bucket::new(n.parse().unwrap(), 1))
            .collect();
        let theirs = pingora_ketama::Continuum::new(&buckets);
        let ours = Ring::new(&names);
        for i in 0..5000 {
            let key = format!("/objects/{i}#{}", i % 7);
            let want = theirs.node(key.as_bytes()).unwrap().to_string();
            let got = &names[ours.owner(key.as_bytes()).unwrap()];
            assert_eq!(*got, want, "key {key}");
            // The walk's order is theirs too (each node at its first appearance).
            let mut their_order: Vec<String> = Vec::new();
            for a in theirs.node_iter(key.as_bytes()) {
                let a = a.to_string();
                if !their_order.contains(&a) {
                    their_order.push(a);
                }
                if their_order.len() == names.len() {
                    break;
                }
            }
            let our_order: Vec<String> = ours
                .walk(key.as_bytes())
                .into_iter()
                .map(|i| names[i].clone())
                .collect();
            assert_eq!(our_order, their_order, "key {key}");
        }
    }

    #[test]
    fn names_not_addresses_place_the_points() {
        let a = Ring::new(&["edge-0.edges:8080".into(), "edge-1.edges:8080".into()]);
        let b = Ring::new(&["edge-0.edges:8080".into(), "edge-1.edges:8080".into()]);
        let c = Ring::new(&["edge-1.edges:8080".into(), "edge-0.edges:8080".into()]);
        for i in 0..200 {
            let k = format!("k{i}");
            assert_eq!(a.owner(k.as_bytes()), b.owner(k.as_bytes()));
            // The order the names are written in does not move a shard.
            assert_eq!(a.owner(k.as_bytes()), c.owner(k.as_bytes()).map(|o| 1 - o));
        }
    }

    #[test]
    fn shards_spread_over_every_node() {
        let ring = Ring::new(&names(3));
        let mut counts = [0usize; 3];
        for i in 0..3000 {
            counts[ring.owner(&shard_key("/big", i * 16, 16)).unwrap()] += 1;
        }
        assert!(counts.iter().all(|&c| c > 600), "{counts:?}");
    }

    #[test]
    fn an_empty_ring_has_no_owner() {
        assert_eq!(Ring::new(&[]).owner(b"x"), None);
        assert!(Ring::new(&[]).walk(b"x").is_empty());
    }

    #[test]
    fn shard_key_is_the_window_of_the_offset() {
        assert_eq!(shard_key("/a", 0, 16), b"/a#0");
        assert_eq!(shard_key("/a", 15, 16), b"/a#0");
        assert_eq!(shard_key("/a", 16, 16), b"/a#1");
    }

    proptest! {
        /// A node joining moves only the keys it takes (Ketama): every key keeps its owner or
        /// goes to the new node; a node leaving moves only its own keys.
        #[test]
        fn joining_or_leaving_moves_only_that_nodes_shards(n in 2usize..8, keys in proptest::collection::vec(any::<u32>(), 1..200)) {
            let before = names(n);
            let mut after = before.clone();
            after.push("10.0.9.9:8080".into());
            let (r1, r2) = (Ring::new(&before), Ring::new(&after));
            for k in &keys {
                let k = k.to_le_bytes();
                let (o1, o2) = (r1.owner(&k).unwrap(), r2.owner(&k).unwrap());
                prop_assert!(o1 == o2 || o2 == n);
                // Leaving: the walk without the node is the walk with it, minus it.
                let walk: Vec<usize> = r2.walk(&k).into_iter().filter(|&i| i != n).collect();
                prop_assert_eq!(walk, r1.walk(&k));
            }
        }
    }
}
