//! `check_integrity`: every record decodes and sits at its own key, every index entry is
//! exactly one a record implies (`keys::index_entries`), and the per-record invariants hold.
//! Reads each tree once (the records twice when an entry is missing); never panics; reports
//! violations as sentences.
//!
//! The entries the records imply are held as 128-bit fingerprints (two SipHash values under
//! two random keys per check), 16 bytes each instead of the entry itself: checking 1M messages holds
//! about 3M of them, tens of MiB instead of the ~600 MiB the entries took. Two different
//! entries share a fingerprint with a probability near 2^-128 per pair.

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::{BuildHasher, Hash, Hasher};

use crate::codec;
use crate::error::{hex, Result};
use crate::keys::{self, TreeId};
use crate::machine::State;
use crate::store::Store;

pub(crate) fn check(store: &Store) -> Result<Vec<String>> {
    let mut bad = Vec::new();
    let fingerprint = Fingerprint::new();
    let mut expected: HashSet<u128> = HashSet::new();
    let next_seq = match store.get_u64(TreeId::Meta, keys::META_SEQ) {
        Ok(v) => v,
        Err(e) => {
            bad.push(e.to_string());
            u64::MAX
        }
    };
    for item in store.range::<std::ops::RangeFull>(TreeId::Messages, ..) {
        let (k, v) = item?;
        if keys::parse_message(&k).is_none() {
            bad.push(format!(
                "messages: key {} is not pool and sequence",
                hex(&k)
            ));
            continue;
        }
        let rec = match crate::store::decode_record_at(&k, &v) {
            Ok(r) => r,
            Err(e) => {
                bad.push(e.to_string());
                continue;
            }
        };
        let at = format!("message {} in pool {}", rec.message_id, rec.work_pool_id);
        if rec.seq >= next_seq && matches!(rec.state, State::Visible | State::Reserved { .. }) {
            bad.push(format!(
                "{at}: seq {} is not below the next seq {next_seq}",
                rec.seq
            ));
        }
        if rec.born >= next_seq {
            bad.push(format!(
                "{at}: enqueue sequence {} is not below the next seq {next_seq}",
                rec.born
            ));
        }
        if rec.idempotency_key.is_empty() {
            bad.push(format!("{at}: empty idempotency key"));
        }
        if let Err(e) = rec.message() {
            bad.push(format!("{at}: {e}"));
        }
        match &rec.state {
            State::Reserved { token, .. } => {
                if rec.delivery_count == 0 {
                    bad.push(format!("{at}: reserved with delivery count 0"));
                }
                if token.len() <= 32 {
                    bad.push(format!("{at}: reservation token too short"));
                }
            }
            State::Dead {
                final_delivery_count,
                ..
            } => {
                if *final_delivery_count != rec.delivery_count {
                    bad.push(format!(
                        "{at}: final delivery count differs from the message's"
                    ));
                }
                // Only a delivered message reaches the DLQ (max attempts is at least 1).
                if rec.delivery_count == 0 {
                    bad.push(format!("{at}: dead-lettered with delivery count 0"));
                }
            }
            State::Acked { .. } if rec.delivery_count == 0 => {
                bad.push(format!("{at}: acked with delivery count 0"));
            }
            _ => {}
        }
        for (tree, k, v) in keys::index_entries(&rec) {
            if !expected.insert(fingerprint.of(tree, &k, &v)) {
                bad.push(format!(
                    "{at}: index entry {}/{} is claimed twice",
                    tree.name(),
                    hex(&k)
                ));
            }
        }
    }
    for tree in TreeId::INDEXES {
        for item in store.range::<std::ops::RangeFull>(tree, ..) {
            let (k, v) = item?;
            if !expected.remove(&fingerprint.of(tree, &k, &v)) {
                bad.push(format!(
                    "{}: entry {} -> {} belongs to no record",
                    tree.name(),
                    hex(&k),
                    hex(&v)
                ));
            }
        }
    }
    if !expected.is_empty() {
        // Name the missing entries: find them again among the records' (a record that no
        // longer decodes was reported above).
        let mut missing = Vec::new();
        for item in store.range::<std::ops::RangeFull>(TreeId::Messages, ..) {
            let (k, v) = item?;
            let Ok(rec) = crate::store::decode_record_at(&k, &v) else {
                continue;
            };
            for (tree, k, v) in keys::index_entries(&rec) {
                if expected.remove(&fingerprint.of(tree, &k, &v)) {
                    missing.push((tree, k));
                }
            }
        }
        missing.sort();
        for (tree, k) in missing {
            bad.push(format!("{}: entry {} is missing", tree.name(), hex(&k)));
        }
        if !expected.is_empty() {
            bad.push(format!(
                "{} index entries are missing whose records changed during the check",
                expected.len()
            ));
        }
    }
    for item in store.range::<std::ops::RangeFull>(TreeId::Wakeups, ..) {
        let (k, v) = item?;
        if k.len() != 16 {
            bad.push(format!("wakeups: key {} is not a pool id", hex(&k)));
        }
        match codec::decode_u64(&v) {
            Err(e) => bad.push(format!("wakeups: {}: {e}", hex(&k))),
            // A sequence is only ever stored by a wake, so it is at least 1.
            Ok(0) => bad.push(format!("wakeups: {}: stored sequence 0", hex(&k))),
            Ok(_) => {}
        }
    }
    match store.get(TreeId::Meta, keys::META_FORMAT) {
        Ok(Some(v)) if v.as_ref() == [keys::LAYOUT] => {}
        Ok(other) => bad.push(format!(
            "meta: format is {:?}, expected [{}]",
            other.as_deref(),
            keys::LAYOUT
        )),
        Err(e) => bad.push(e.to_string()),
    }
    Ok(bad)
}

/// 128-bit fingerprints of index entries, from two differently keyed hashes.
struct Fingerprint(RandomState, RandomState);

impl Fingerprint {
    fn new() -> Fingerprint {
        Fingerprint(RandomState::new(), RandomState::new())
    }

    fn of(&self, tree: TreeId, key: &[u8], value: &[u8]) -> u128 {
        let half = |state: &RandomState| {
            let mut h = state.build_hasher();
            tree.hash(&mut h);
            key.hash(&mut h);
            value.hash(&mut h);
            h.finish()
        };
        (u128::from(half(&self.0)) << 64) | u128::from(half(&self.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CleanupKind, NewMessage};
    use crate::{Queue, ReserveFilter};
    use uuid::Uuid;

    /// A pool with a visible and a reserved message, checked clean.
    fn queue() -> Queue {
        let q = Queue::temporary()
            .sweep_interval(None)
            .open()
            .expect("open");
        let pool = Uuid::from_u128(1);
        for n in 1..=2u128 {
            q.enqueue(NewMessage::new(
                pool,
                Uuid::from_u128(n),
                format!("k{n}"),
                CleanupKind::CancellingTimeoutTeardown,
                serde_json::json!({}),
            ))
            .expect("enqueue");
        }
        q.reserve(pool, &ReserveFilter::any())
            .expect("reserve")
            .expect("a message");
        q.wait_applied().expect("applied");
        assert_eq!(
            check(&q.inner().store).expect("check"),
            Vec::<String>::new()
        );
        q
    }

    fn first(q: &Queue, tree: TreeId) -> (sled::IVec, sled::IVec) {
        q.inner()
            .store
            .tree(tree)
            .iter()
            .next()
            .expect("an entry")
            .expect("read")
    }

    fn report(q: &Queue) -> String {
        check(&q.inner().store).expect("check").join("\n")
    }

    #[test]
    fn a_missing_entry_is_named() {
        let q = queue();
        let (k, _) = first(&q, TreeId::MessageIds);
        q.inner()
            .store
            .tree(TreeId::MessageIds)
            .remove(&k)
            .expect("remove");
        let r = report(&q);
        assert_eq!(r, format!("message_ids: entry {} is missing", hex(&k)));
    }

    #[test]
    fn an_entry_with_another_value_is_extra_and_its_own_is_missing() {
        let q = queue();
        let (k, v) = first(&q, TreeId::VisibleByKind);
        let mut other = v.to_vec();
        other[0] ^= 1;
        q.inner()
            .store
            .tree(TreeId::VisibleByKind)
            .insert(&k, other.clone())
            .expect("insert");
        let r = report(&q);
        assert!(
            r.contains(&format!("{} belongs to no record", hex(&other))),
            "{r}"
        );
        assert!(r.contains(&format!("entry {} is missing", hex(&k))), "{r}");
    }

    #[test]
    fn an_entry_without_a_record_is_reported() {
        let q = queue();
        let (k, v) = first(&q, TreeId::LeasesByPool);
        let mut extra = k.to_vec();
        *extra.last_mut().expect("a key") ^= 1;
        q.inner()
            .store
            .tree(TreeId::LeasesByPool)
            .insert(&extra, v.clone())
            .expect("insert");
        assert_eq!(
            report(&q),
            format!(
                "{}: entry {} -> {} belongs to no record",
                TreeId::LeasesByPool.name(),
                hex(&extra),
                hex(&v)
            )
        );
    }
}
