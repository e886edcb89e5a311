//! Every sled key the engine writes, built here and nowhere else.
//!
//! All integers are big-endian so that byte order is numeric order. Timestamps (`ts`) are
//! `i64` microseconds with the sign bit flipped, so negative instants sort first. `seq` is the
//! engine-wide monotonic stamp of a record's last transition; it makes every index key unique
//! and breaks ties FIFO.
//!
//! | tree               | key                                              | value         | what for |
//! |--------------------|--------------------------------------------------|---------------|----------|
//! | `messages`         | pool(16) born(8)                                 | record        | every message in every state: one record, so one state; `born` is the `seq` of its enqueue, so records sit in enqueue order and FIFO work reads neighbouring keys |
//! | `message_ids`      | pool(16) id(16)                                  | born(8)       | a message by its id |
//! | `idempotency`      | pool(16) key-bytes                               | id(16)        | duplicate detection by `(pool, idempotency_key)` |
//! | `visible_by_kind`  | pool(16) kind(1) visible_at(8) seq(8)            | born(8)       | reserve without a queue preference, FIFO per kind |
//! | `visible_by_queue` | pool(16) queue(16) kind(1) visible_at(8) seq(8)  | born(8)       | reserve restricted to preferred queues |
//! | `leases_by_pool`   | pool(16) lease_expires_at(8) seq(8)              | born(8)       | expiry, most overdue first: of one pool by one range; across pools by one range per pool that holds leases |
//! | `tombstones`       | completed_at(8) pool(16) born(8)                 | empty         | pruning acked messages past retention, oldest first |
//! | `wakeups`          | pool(16)                                         | u64           | per-pool wakeup sequence |
//! | `meta`             | `b"format"` / `b"seq"` / `b"journal"` / `b"wal"` / `b"checkpoint"` | u8 / u64 / batch / u64 / u64 | layout version (`LAYOUT`); the next `seq`; a batch being applied (`codec::encode_journal`); the write-ahead log's generation; checkpoints completed (`crate::mark`) |
//! | `metrics`          | family `\0` label `\0` label (`op`, `dlq`, `exp`)  | u64           | persisted counters |
//! | `redrives`         | pool(16) id(16) seq(8)                           | audit JSON    | who redrove a dead letter, when and why |
//!
//! A tree's name above is the one errors use; on disk, the trees whose keys or values layout
//! 5 changed have new names ([`TreeId::sled_name`]), so that a migration builds them beside
//! the old ones and a crash in between leaves the old ones whole.
//!
//! Which index entries a record owns is decided by [`index_entries`] alone: the engine
//! writes the difference between a record's old and new entries, and `check_integrity`
//! recomputes them from the records.

use uuid::Uuid;

use crate::clock::Timestamp;
use crate::machine::{Record, State};
use crate::metrics::Counter;
use crate::model::CleanupKind;

/// The trees, in the order the store opens them (the index into its tree list).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum TreeId {
    Messages = 0,
    Idempotency,
    VisibleByKind,
    VisibleByQueue,
    LeasesByPool,
    Tombstones,
    Wakeups,
    Meta,
    Metrics,
    Redrives,
    MessageIds,
}

impl TreeId {
    /// In the order of their index in journal and log records (layouts 1–4 had the first
    /// ten, with the names of [`LAYOUT_V4_NAMES`]).
    pub const ALL: [TreeId; 11] = [
        TreeId::Messages,
        TreeId::Idempotency,
        TreeId::VisibleByKind,
        TreeId::VisibleByQueue,
        TreeId::LeasesByPool,
        TreeId::Tombstones,
        TreeId::Wakeups,
        TreeId::Meta,
        TreeId::Metrics,
        TreeId::Redrives,
        TreeId::MessageIds,
    ];

    /// The trees whose keys end in the `seq` of the transition that wrote them (the visible
    /// and lease indexes): each key is put at most once, so a put always creates the key,
    /// and a delete that follows a put not yet in sled leaves nothing for sled to do.
    pub const CREATED_ONCE: [TreeId; 3] = [
        TreeId::VisibleByKind,
        TreeId::VisibleByQueue,
        TreeId::LeasesByPool,
    ];

    /// The name errors use.
    pub const fn name(self) -> &'static str {
        match self {
            TreeId::Messages => "messages",
            TreeId::Idempotency => "idempotency",
            TreeId::VisibleByKind => "visible_by_kind",
            TreeId::VisibleByQueue => "visible_by_queue",
            TreeId::LeasesByPool => "leases_by_pool",
            TreeId::Tombstones => "tombstones",
            TreeId::Wakeups => "wakeups",
            TreeId::Meta => "meta",
            TreeId::Metrics => "metrics",
            TreeId::Redrives => "redrives",
            TreeId::MessageIds => "message_ids",
        }
    }

    /// The sled tree's name: layout 5 renamed the trees whose keys or values it changed.
    pub const fn sled_name(self) -> &'static str {
        match self {
            TreeId::Messages => "messages.5",
            TreeId::VisibleByKind => "visible_by_kind.5",
            TreeId::VisibleByQueue => "visible_by_queue.5",
            TreeId::LeasesByPool => "leases_by_pool.5",
            TreeId::Tombstones => "tombstones.5",
            other => other.name(),
        }
    }

    /// The tree with index `i` in [`TreeId::ALL`].
    pub fn from_index(i: u8) -> Option<TreeId> {
        TreeId::ALL.get(usize::from(i)).copied()
    }

    /// The trees that are pure functions of the `messages` tree.
    pub const INDEXES: [TreeId; 6] = [
        TreeId::MessageIds,
        TreeId::Idempotency,
        TreeId::VisibleByKind,
        TreeId::VisibleByQueue,
        TreeId::LeasesByPool,
        TreeId::Tombstones,
    ];
}

pub(crate) const META_FORMAT: &[u8] = b"format";
pub(crate) const META_SEQ: &[u8] = b"seq";
/// Present only while a batch of writes is being applied (`Store::apply`).
pub(crate) const META_JOURNAL: &[u8] = b"journal";
/// The write-ahead log's current generation (`Store::recover_wal`).
pub(crate) const META_WAL: &[u8] = b"wal";
/// How many checkpoints completed (`Store::advance_generation`), matched against the
/// checkpoint mark on open (`crate::mark`).
pub(crate) const META_CHECKPOINT: &[u8] = b"checkpoint";

/// The key layout in `meta/format`. Layout 5 keys records by `(pool, born)` and finds them
/// by id through `message_ids`; layouts 1–4 keyed them by `(pool, id)` in the tree `messages`
/// and their indexes held ids. Layout 4 may have a write-ahead log (the `wal` file and
/// `meta/wal`) whose records must be applied on open; layout 3 never has, and older engines,
/// which would not apply them, refuse layout 4. Layouts 3 and up may hold `meta/journal`,
/// which must be replayed on open; layout 2 never does. Layout 1 also kept a global `leases`
/// index (`lease_expires_at seq -> pool id`). Opening a layout 1–4 database migrates it
/// (`Store::open`, `crate::migrate`).
pub(crate) const LAYOUT: u8 = 5;
/// The layouts that `Store::open` migrates from, and the tree layout 1 also had.
pub(crate) const LAYOUT_V4: u8 = 4;
pub(crate) const LAYOUT_V3: u8 = 3;
pub(crate) const LAYOUT_V2: u8 = 2;
pub(crate) const LAYOUT_V1: u8 = 1;
pub(crate) const LAYOUT_V1_LEASES: &str = "leases";
/// The sled names of layouts 1–4's trees, by their index in a journal or log record.
pub(crate) const LAYOUT_V4_NAMES: [&str; 10] = [
    "messages",
    "idempotency",
    "visible_by_kind",
    "visible_by_queue",
    "leases_by_pool",
    "tombstones",
    "wakeups",
    "meta",
    "metrics",
    "redrives",
];

/// A timestamp as 8 bytes that sort like the instants.
pub(crate) fn ts(t: Timestamp) -> [u8; 8] {
    ((t.as_micros() as u64) ^ (1 << 63)).to_be_bytes()
}

/// Concatenates byte pieces into one key.
fn cat<const N: usize>(parts: &[&[u8]]) -> [u8; N] {
    let mut out = [0u8; N];
    let mut at = 0;
    for p in parts {
        out[at..at + p.len()].copy_from_slice(p);
        at += p.len();
    }
    out
}

/// A `messages` key.
pub(crate) fn message(pool: Uuid, born: u64) -> [u8; 24] {
    cat(&[pool.as_bytes(), &born.to_be_bytes()])
}

/// A `message_ids` key; also the prefix of a message's `redrives` keys.
pub(crate) fn message_id(pool: Uuid, id: Uuid) -> [u8; 32] {
    cat(&[pool.as_bytes(), id.as_bytes()])
}

pub(crate) fn pool_prefix(pool: Uuid) -> [u8; 16] {
    *pool.as_bytes()
}

pub(crate) fn idempotency(pool: Uuid, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(16 + key.len());
    k.extend_from_slice(pool.as_bytes());
    k.extend_from_slice(key.as_bytes());
    k
}

pub(crate) fn visible_by_kind_prefix(pool: Uuid, kind: CleanupKind) -> [u8; 17] {
    cat(&[pool.as_bytes(), &[kind.code()]])
}

pub(crate) fn visible_by_queue_prefix(pool: Uuid, queue: Uuid, kind: CleanupKind) -> [u8; 33] {
    cat(&[pool.as_bytes(), queue.as_bytes(), &[kind.code()]])
}

pub(crate) fn wakeup(pool: Uuid) -> [u8; 16] {
    *pool.as_bytes()
}

/// The position at the end of every visible-index key (`visible_at(8) seq(8)`, FIFO order)
/// and of every `leases_by_pool` key (`lease_expires_at(8) seq(8)`, most overdue first).
pub(crate) fn fifo_suffix(key: &[u8]) -> Option<&[u8]> {
    key.len().checked_sub(16).map(|at| &key[at..])
}

/// The greatest `leases_by_pool` key of `pool` due at `now` (inclusive upper bound).
pub(crate) fn lease_by_pool_due_bound(pool: Uuid, now: Timestamp) -> [u8; 32] {
    cat(&[pool.as_bytes(), &ts(now), &u64::MAX.to_be_bytes()])
}

/// The first key of the pool after `pool` in any pool-prefixed tree (`None` after the last).
pub(crate) fn next_pool(pool: Uuid) -> Option<[u8; 16]> {
    pool.as_u128().checked_add(1).map(u128::to_be_bytes)
}

/// The greatest `tombstones` key completed at or before `t` (inclusive upper bound).
pub(crate) fn tombstone_bound(t: Timestamp) -> [u8; 32] {
    cat(&[&ts(t), &[0xff; 24]])
}

/// A `metrics` key.
pub(crate) fn metric(c: &Counter) -> Vec<u8> {
    let parts: Vec<&str> = match c {
        Counter::Operation { operation, status } => vec!["op", operation, status],
        Counter::DeadLetter { kind, reason } => vec!["dlq", kind, reason],
        Counter::LeaseExpiration { result } => vec!["exp", result],
    };
    parts.join("\0").into_bytes()
}

/// The counter a `metrics` key names.
pub(crate) fn parse_metric(key: &[u8]) -> Option<Counter> {
    let text = std::str::from_utf8(key).ok()?;
    let parts: Vec<&str> = text.split('\0').collect();
    match parts.as_slice() {
        ["op", a, b] => Some(Counter::op(a, b)),
        ["dlq", a, b] => Some(Counter::DeadLetter {
            kind: a.to_string(),
            reason: b.to_string(),
        }),
        ["exp", a] => Some(Counter::LeaseExpiration {
            result: a.to_string(),
        }),
        _ => None,
    }
}

/// A `redrives` key.
pub(crate) fn redrive(pool: Uuid, id: Uuid, seq: u64) -> [u8; 40] {
    cat(&[pool.as_bytes(), id.as_bytes(), &seq.to_be_bytes()])
}

/// Every index entry `(tree, key, value)` that `rec` owns.
pub(crate) fn index_entries(rec: &Record) -> Vec<(TreeId, Vec<u8>, Vec<u8>)> {
    let pool = rec.work_pool_id.as_bytes();
    let born = rec.born.to_be_bytes();
    let mut out = vec![
        (
            TreeId::MessageIds,
            message_id(rec.work_pool_id, rec.message_id).to_vec(),
            born.to_vec(),
        ),
        (
            TreeId::Idempotency,
            idempotency(rec.work_pool_id, &rec.idempotency_key),
            rec.message_id.as_bytes().to_vec(),
        ),
    ];
    let seq = rec.seq.to_be_bytes();
    match &rec.state {
        State::Visible => {
            let at = ts(rec.visible_at);
            let kind = [rec.kind.code()];
            out.push((
                TreeId::VisibleByKind,
                [pool.as_slice(), &kind, &at, &seq].concat(),
                born.to_vec(),
            ));
            if let Some(queue) = rec.work_queue_id {
                out.push((
                    TreeId::VisibleByQueue,
                    [pool.as_slice(), queue.as_bytes(), &kind, &at, &seq].concat(),
                    born.to_vec(),
                ));
            }
        }
        State::Reserved {
            lease_expires_at, ..
        } => {
            let lease = ts(*lease_expires_at);
            out.push((
                TreeId::LeasesByPool,
                [pool.as_slice(), &lease, &seq].concat(),
                born.to_vec(),
            ));
        }
        State::Acked { completed_at } => out.push((
            TreeId::Tombstones,
            [ts(*completed_at).as_slice(), pool, &born].concat(),
            Vec::new(),
        )),
        State::Dead { .. } => {}
    }
    out
}

/// A 16-byte id from a key or value slice.
pub(crate) fn uuid_at(bytes: &[u8], at: usize) -> Option<Uuid> {
    let b: [u8; 16] = bytes.get(at..at + 16)?.try_into().ok()?;
    Some(Uuid::from_bytes(b))
}

/// A `messages` key: `(pool, born)`.
pub(crate) fn parse_message(key: &[u8]) -> Option<(Uuid, u64)> {
    parse_pool_born(key, 0)
}

/// A `(pool, born)` pair at `at` that ends `bytes` (a `messages` key, a `tombstones` key's
/// tail).
pub(crate) fn parse_pool_born(bytes: &[u8], at: usize) -> Option<(Uuid, u64)> {
    (bytes.len() == at + 24).then_some(())?;
    let born: [u8; 8] = bytes.get(at + 16..)?.try_into().ok()?;
    Some((uuid_at(bytes, at)?, u64::from_be_bytes(born)))
}

/// A layout-4 `messages` key: `(pool, id)`.
pub(crate) fn parse_legacy_message(key: &[u8]) -> Option<(Uuid, Uuid)> {
    (key.len() == 32).then_some(())?;
    Some((uuid_at(key, 0)?, uuid_at(key, 16)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_sort_like_instants() {
        let xs = [i64::MIN, -5, -1, 0, 1, 7, i64::MAX];
        for w in xs.windows(2) {
            let (a, b) = (Timestamp::from_micros(w[0]), Timestamp::from_micros(w[1]));
            assert!(ts(a) < ts(b));
        }
    }

    #[test]
    fn metric_keys_round_trip() {
        for c in [
            Counter::op("ack", "accepted"),
            Counter::DeadLetter {
                kind: "pending_claim_teardown.v1".into(),
                reason: "max_delivery_attempts_reached".into(),
            },
            Counter::LeaseExpiration {
                result: "redelivered".into(),
            },
        ] {
            assert_eq!(parse_metric(&metric(&c)), Some(c));
        }
        assert_eq!(parse_metric(b"op\0only-one"), None);
        assert_eq!(parse_metric(&[0xff, 0xfe]), None);
    }

    #[test]
    fn parsers_reject_wrong_lengths() {
        assert!(parse_message(&[0; 23]).is_none());
        assert!(parse_message(&[0; 25]).is_none());
        assert!(parse_pool_born(&[0; 32], 8).is_some());
        assert!(parse_pool_born(&[0; 31], 8).is_none());
        assert!(parse_legacy_message(&[0; 32]).is_some());
        assert!(parse_legacy_message(&[0; 24]).is_none());
    }

    #[test]
    fn message_keys_sort_by_pool_then_enqueue_order_and_parse_back() {
        let (p, q) = (Uuid::from_u128(1), Uuid::from_u128(2));
        assert!(message(p, 255) < message(p, 256));
        assert!(message(p, u64::MAX) < message(q, 0));
        assert_eq!(parse_message(&message(q, 77)), Some((q, 77)));
        let tomb_tail = [[0u8; 8].as_slice(), &message(q, 9)].concat();
        assert_eq!(parse_pool_born(&tomb_tail, 8), Some((q, 9)));
    }

    #[test]
    fn every_tree_has_its_own_sled_name_and_layout_4_names_are_not_reused_for_new_contents() {
        let names: std::collections::HashSet<&str> =
            TreeId::ALL.iter().map(|t| t.sled_name()).collect();
        assert_eq!(names.len(), TreeId::ALL.len());
        for t in [
            TreeId::Messages,
            TreeId::VisibleByKind,
            TreeId::VisibleByQueue,
            TreeId::LeasesByPool,
            TreeId::Tombstones,
            TreeId::MessageIds,
        ] {
            assert!(!LAYOUT_V4_NAMES.contains(&t.sled_name()), "{t:?}");
        }
        for t in &TreeId::ALL[..LAYOUT_V4_NAMES.len()] {
            assert_eq!(t.name(), LAYOUT_V4_NAMES[*t as usize]);
        }
    }
}
