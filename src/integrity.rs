//! `check_integrity`: every record decodes and sits at its own key, every index entry is
//! exactly one a record implies (`keys::index_entries`), and the per-record invariants hold.
//! Reads each tree once; never panics; reports violations as sentences.

use std::collections::HashSet;

use crate::codec;
use crate::error::{hex, Result};
use crate::keys::{self, TreeId};
use crate::machine::State;
use crate::store::Store;

pub(crate) fn check(store: &Store) -> Result<Vec<String>> {
    let mut bad = Vec::new();
    let mut expected: HashSet<(TreeId, Vec<u8>, Vec<u8>)> = HashSet::new();
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
        for entry in keys::index_entries(&rec) {
            if !expected.insert(entry.clone()) {
                bad.push(format!(
                    "{at}: index entry {}/{} is claimed twice",
                    entry.0.name(),
                    hex(&entry.1)
                ));
            }
        }
    }
    for tree in TreeId::INDEXES {
        for item in store.range::<std::ops::RangeFull>(tree, ..) {
            let (k, v) = item?;
            if !expected.remove(&(tree, k.to_vec(), v.to_vec())) {
                bad.push(format!(
                    "{}: entry {} -> {} belongs to no record",
                    tree.name(),
                    hex(&k),
                    hex(&v)
                ));
            }
        }
    }
    let mut missing: Vec<_> = expected.into_iter().collect();
    missing.sort();
    for (tree, k, _) in missing {
        bad.push(format!("{}: entry {} is missing", tree.name(), hex(&k)));
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
