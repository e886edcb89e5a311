//! The migration of a layout 1–4 database to layout 5 (`keys::LAYOUT`), run by
//! `Store::open` after it has completed the old layout's journal and write-ahead log.
//!
//! Layouts 1–4 keyed each record by `(pool, id)` in the tree `messages`, and their indexes
//! held ids. Layout 5 keys records by `(pool, born)`, finds them by id through
//! `message_ids`, and its indexes hold `born`. The trees whose keys or values changed have
//! new names (`TreeId::sled_name`), so the migration builds them beside the old ones:
//!
//! 1. empty the new trees (a crash may have left them half built);
//! 2. give every old record the next `seq` as its `born` and write it and its index entries
//!    to the new trees (`idempotency` is the same in both layouts and stays as it is): the
//!    visible ones first, in the order of the old `visible_by_kind` index (so a migrated
//!    backlog is stored in the order reserve takes it), then the rest in key order; raise
//!    `meta/seq` above them;
//! 3. make it all durable, then record layout 5 (durably too);
//! 4. drop the old trees; every later open drops any a crash left.
//!
//! Until step 3 the old trees are untouched and the layout byte is the old one, so a crash
//! anywhere before it makes the next open start over, and a record that does not decode
//! stops the open with `Error::Corrupted` and leaves the database as it was.

use crate::codec;
use crate::error::{Error, Result};
use crate::keys::{self, TreeId};
use crate::machine::Record;
use crate::store::Store;

/// The trees that layout 5 built anew, by their current names.
const REBUILT: [TreeId; 6] = [
    TreeId::Messages,
    TreeId::MessageIds,
    TreeId::VisibleByKind,
    TreeId::VisibleByQueue,
    TreeId::LeasesByPool,
    TreeId::Tombstones,
];

/// Old trees that layout 5 no longer has: layout 4's versions of the rebuilt ones, and
/// layout 1's global lease index.
const DROPPED: [&str; 6] = [
    "messages",
    "visible_by_kind",
    "visible_by_queue",
    "leases_by_pool",
    "tombstones",
    keys::LAYOUT_V1_LEASES,
];

/// Records written per sled batch.
const BATCH: usize = 4096;

/// The layout-4 tree that index `t` named in a journal or log record of layouts 1–4
/// (`None`: those layouts had no tree `t`).
pub(crate) fn old_tree(db: &sled::Db, t: TreeId) -> Result<Option<sled::Tree>> {
    match keys::LAYOUT_V4_NAMES.get(t as usize) {
        Some(name) => Ok(Some(db.open_tree(name)?)),
        None => Ok(None),
    }
}

/// Steps 1–3 of the module comment, up to recording the layout (the caller's).
pub(crate) fn to_current_layout(store: &Store) -> Result<()> {
    let db = store.db();
    for t in REBUILT {
        store.tree(t).clear()?;
    }
    let old = db.open_tree("messages")?;
    let old_visible = db.open_tree("visible_by_kind")?;
    let mut out = Rebuild {
        store,
        next: store.get_u64(TreeId::Meta, keys::META_SEQ)?,
        batches: TreeId::ALL.iter().map(|_| sled::Batch::default()).collect(),
        pending: 0,
    };
    // Visible messages first, each pool's kinds in FIFO order, so that a migrated backlog
    // is stored in the order reserve takes it.
    for item in old_visible.iter() {
        let (k, v) = item?;
        let (Ok(id), Some(pool)) = (codec::decode_id(&v), keys::uuid_at(&k, 0)) else {
            continue; // a damaged entry: the record, if any, comes with the rest
        };
        let key = keys::message_id(pool, id);
        let Some(bytes) = old.get(key)? else {
            continue;
        };
        let rec = old_record(&key, &bytes)?;
        if visible_key(&rec).as_deref() == Some(k.as_ref()) {
            out.add(rec)?;
        }
    }
    // Then every other record, in key order.
    for item in old.iter() {
        let (k, v) = item?;
        let rec = old_record(&k, &v)?;
        if let Some(vk) = visible_key(&rec) {
            if old_visible.get(vk)?.as_deref() == Some(rec.message_id.as_bytes().as_slice()) {
                continue; // taken in FIFO order above
            }
        }
        out.add(rec)?;
    }
    out.flush()?;
    store
        .tree(TreeId::Meta)
        .insert(keys::META_SEQ, &codec::encode_u64(out.next))?;
    store.sync_sled()
}

/// A record of layouts 1–4, checked against its key.
fn old_record(key: &[u8], bytes: &[u8]) -> Result<Record> {
    let rec =
        codec::decode_legacy_record(bytes).map_err(|d| Error::corrupted("messages", key, d))?;
    if keys::parse_legacy_message(key) != Some((rec.work_pool_id, rec.message_id)) {
        return Err(Error::corrupted(
            "messages",
            key,
            "the record's pool and id do not match its key",
        ));
    }
    Ok(rec)
}

/// The `visible_by_kind` key of a visible record (the same in layouts 4 and 5).
fn visible_key(rec: &Record) -> Option<Vec<u8>> {
    keys::index_entries(rec)
        .into_iter()
        .find(|(t, _, _)| *t == TreeId::VisibleByKind)
        .map(|(_, k, _)| k)
}

/// The new trees being built, in batches.
struct Rebuild<'a> {
    store: &'a Store,
    next: u64,
    batches: Vec<sled::Batch>,
    pending: usize,
}

impl Rebuild<'_> {
    /// Gives `rec` the next `born` and writes it and its index entries (`idempotency` is
    /// the same in both layouts and stays).
    fn add(&mut self, mut rec: Record) -> Result<()> {
        rec.born = self.next;
        self.next += 1;
        let bytes = codec::encode_record(&rec).map_err(Error::Storage)?;
        self.batches[TreeId::Messages as usize]
            .insert(&keys::message(rec.work_pool_id, rec.born), bytes);
        for (t, key, value) in keys::index_entries(&rec) {
            if t != TreeId::Idempotency {
                self.batches[t as usize].insert(key, value);
            }
        }
        self.pending += 1;
        if self.pending == BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        for (t, batch) in TreeId::ALL.iter().zip(self.batches.iter_mut()) {
            self.store.tree(*t).apply_batch(std::mem::take(batch))?;
        }
        self.pending = 0;
        Ok(())
    }
}

/// Step 4 of the module comment: drops the old trees that are still there.
pub(crate) fn drop_old_trees(db: &sled::Db) -> Result<()> {
    let names = db.tree_names();
    for name in DROPPED {
        if names.iter().any(|n| n.as_ref() == name.as_bytes()) {
            db.drop_tree(name)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use uuid::Uuid;

    use super::*;
    use crate::{
        CleanupKind, ManualClock, NewMessage, OpStatus, Policy, Queue, RedriveTarget,
        ReserveFilter, Timestamp,
    };

    const MAX: u32 = 2;

    fn raw(path: &Path) -> sled::Db {
        let started = std::time::Instant::now();
        loop {
            match sled::Config::new().path(path).segment_size(8 << 20).open() {
                Ok(db) => return db,
                Err(e) if started.elapsed() < Duration::from_secs(5) => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("raw open: {e}"),
            }
        }
    }

    fn open(path: &Path, clock: &ManualClock) -> crate::Result<Queue> {
        Queue::builder(path)
            .clock(clock.clone())
            .sweep_interval(None)
            .policy(Policy {
                max_delivery_attempts: MAX,
                ..Policy::default()
            })
            .open()
    }

    fn new(pool: Uuid, key: &str, queue: Option<Uuid>) -> NewMessage {
        let m = NewMessage::new(
            pool,
            Uuid::new_v4(),
            key,
            CleanupKind::CancellingTimeoutTeardown,
            serde_json::json!({"k": key}),
        );
        match queue {
            Some(q) => m.work_queue(q),
            None => m,
        }
    }

    /// Every state in two pools, written by the engine: visible (with and without a queue),
    /// reserved, dead (released at the maximum), redriven, acked. Returns the pools, the
    /// reserved message with its token, and the ids visible in `a`, in FIFO order.
    struct World {
        a: Uuid,
        b: Uuid,
        reserved: (Uuid, String),
        visible_a: Vec<Uuid>,
    }

    fn populate(q: &Queue, clock: &ManualClock) -> World {
        let (a, b, queue) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let tick = || clock.advance(Duration::from_millis(1));
        let mut ids = Vec::new();
        // Pool `b` gets every third.
        for i in 0..40 {
            let pool = if i % 3 == 0 { b } else { a };
            let m = new(pool, &format!("m{i}"), (i % 2 == 0).then_some(queue));
            ids.push(q.enqueue(m).unwrap().message_id);
            tick();
        }
        let any = ReserveFilter::any();
        let r = q.reserve(a, &any).unwrap().unwrap();
        assert_eq!(
            q.ack(a, r.message.message_id, &r.reservation_token)
                .unwrap()
                .status,
            OpStatus::Accepted
        );
        tick();
        // A third pool: two messages released until both are dead (MAX = 2), then one
        // redriven back.
        let c = Uuid::new_v4();
        let (x, y) = (new(c, "x", None), new(c, "y", None));
        let y_id = y.message_id;
        q.enqueue(x).unwrap();
        q.enqueue(y).unwrap();
        for _ in 0..2 * MAX {
            let r = q.reserve(c, &any).unwrap().unwrap();
            q.release(c, r.message.message_id, &r.reservation_token, "boom")
                .unwrap();
            tick();
        }
        assert!(q.reserve(c, &any).unwrap().is_none());
        let redriven = q
            .redrive(c, RedriveTarget::Message(y_id), "fixed", "ops", true)
            .unwrap();
        assert_eq!(redriven.len(), 1);
        let r = q.reserve(a, &any).unwrap().unwrap();
        let reserved = (r.message.message_id, r.reservation_token);
        tick();
        // The rest of `a` is visible, in enqueue order (the first two of `a` were taken).
        let visible_a: Vec<Uuid> = ids
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 != 0)
            .map(|(_, id)| *id)
            .skip(2)
            .collect();
        assert_eq!(visible_a.len(), 40 - 14 - 2);
        World {
            a,
            b,
            reserved,
            visible_a,
        }
    }

    /// The export's lines except its first (`next_seq` rises in a migration), sorted (records
    /// are exported in storage order, which a migration renumbers).
    fn state(q: &Queue) -> (u64, Vec<String>) {
        let mut out = Vec::new();
        q.export(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        let meta: serde_json::Value = serde_json::from_str(&lines.remove(0)).unwrap();
        lines.sort();
        (meta["next_seq"].as_u64().unwrap(), lines)
    }

    /// Rewrites a closed layout-5 database as layout 4 stored it: records at `(pool, id)`
    /// without `born` in `messages`, indexes holding ids under the old names, no
    /// `message_ids`, layout byte 4, and the write-ahead log retired.
    fn downgrade(path: &Path) {
        let db = raw(path);
        let old = |name: &str| db.open_tree(name).unwrap();
        for item in db.open_tree(TreeId::Messages.sled_name()).unwrap().iter() {
            let (_, v) = item.unwrap();
            let rec = codec::decode_record(&v).unwrap();
            let id = rec.message_id.as_bytes().to_vec();
            old("messages")
                .insert(
                    keys::message_id(rec.work_pool_id, rec.message_id),
                    [&[codec::FORMAT_V1], &v[9..]].concat(),
                )
                .unwrap();
            for (t, k, _) in keys::index_entries(&rec) {
                match t {
                    TreeId::MessageIds | TreeId::Idempotency => {}
                    TreeId::Tombstones => {
                        old("tombstones")
                            .insert([&k[..24], &id].concat(), Vec::new())
                            .unwrap();
                    }
                    other => {
                        old(keys::LAYOUT_V4_NAMES[other as usize])
                            .insert(k, id.clone())
                            .unwrap();
                    }
                }
            }
        }
        for t in REBUILT {
            db.drop_tree(t.sled_name()).unwrap();
        }
        let meta = old("meta");
        meta.insert(keys::META_FORMAT, &[keys::LAYOUT_V4]).unwrap();
        // A generation of its own that the layout-5 log left in the file will not hold by
        // chance (a small one, like 7, can: the log holds big-endian numbers).
        meta.insert(keys::META_WAL, &0x5eed_0000_dead_0004u64.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }

    /// A populated database, downgraded to layout 4: its directory, path and clock.
    fn old_database() -> (tempfile::TempDir, std::path::PathBuf, ManualClock) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let clock = ManualClock::new(Timestamp::from_micros(0));
        {
            let q = open(&path, &clock).unwrap();
            populate(&q, &clock);
        }
        downgrade(&path);
        (dir, path, clock)
    }

    /// Leaves `writes` as the one record of a new generation of the old database's log, as
    /// a crash after logging them would have.
    fn log_old_batch(db: &sled::Db, path: &Path, writes: &[crate::store::Write<'_>]) {
        let payload = codec::encode_journal(writes.iter().copied()).unwrap();
        let generation = 0x5eed_0000_0000_0042u64;
        let mut log = Vec::new();
        codec::encode_wal_record(generation, &payload, &mut log).unwrap();
        std::fs::write(path.join(crate::wal::FILE_NAME), log).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert(keys::META_WAL, &generation.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }

    fn layout_and_trees(path: &Path) -> (Option<Vec<u8>>, Vec<String>) {
        let db = raw(path);
        let format = db
            .open_tree("meta")
            .unwrap()
            .get(keys::META_FORMAT)
            .unwrap()
            .map(|v| v.to_vec());
        let names = db
            .tree_names()
            .iter()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect();
        (format, names)
    }

    /// Builds a world, downgrades it, lets `alter` change the old database, reopens it:
    /// the state is what it was, and the queue works on.
    fn migrates(alter: impl FnOnce(&sled::Db, &Path)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let clock = ManualClock::new(Timestamp::from_micros(1_796_399_700_000_000));
        let (world, before) = {
            let q = open(&path, &clock).unwrap();
            let w = populate(&q, &clock);
            (w, state(&q))
        };
        downgrade(&path);
        alter(&raw(&path), &path);
        let q = open(&path, &clock).unwrap();
        assert_eq!(q.check_integrity().unwrap(), Vec::<String>::new());
        // The backlog is stored in the order reserve takes it (the old layout stored it by
        // id, which the downgrade's random ids scrambled).
        let stored: Vec<Uuid> = q
            .inner()
            .store
            .scan_prefix(TreeId::Messages, &keys::pool_prefix(world.a))
            .map(|item| {
                let (k, v) = item.unwrap();
                crate::store::decode_record_at(&k, &v).unwrap()
            })
            .filter(|r| r.state == crate::machine::State::Visible)
            .map(|r| r.message_id)
            .collect();
        assert_eq!(stored, world.visible_a);
        let after = state(&q);
        assert_eq!(after.1, before.1);
        assert!(after.0 >= before.0);
        // Its token still fences the reservation (its position prefix points at another
        // record now: the id decides).
        let (id, token) = &world.reserved;
        let wrong = format!("{}x", &token[..token.len() - 1]);
        assert_eq!(
            q.renew(world.a, *id, &wrong).unwrap().status,
            OpStatus::InvalidToken
        );
        assert_eq!(
            q.ack(world.a, *id, token).unwrap().status,
            OpStatus::Accepted
        );
        let any = ReserveFilter::any();
        let mut order = Vec::new();
        while let Some(r) = q.reserve(world.a, &any).unwrap() {
            order.push(r.message.message_id);
            assert_eq!(
                q.ack(world.a, r.message.message_id, &r.reservation_token)
                    .unwrap()
                    .status,
                OpStatus::Accepted
            );
        }
        assert_eq!(order, world.visible_a, "FIFO order survives");
        assert!(q.reserve(world.b, &any).unwrap().is_some());
        assert_eq!(q.check_integrity().unwrap(), Vec::<String>::new());
        drop(q);
        let (format, names) = layout_and_trees(&path);
        assert_eq!(format, Some(vec![keys::LAYOUT]));
        for name in DROPPED {
            assert!(!names.iter().any(|n| n == name), "{name} in {names:?}");
        }
    }

    #[test]
    fn a_layout_4_database_is_migrated_and_keeps_every_state() {
        migrates(|_, _| {});
    }

    /// Layout 3 never had a write-ahead log, layout 2 never a journal, layout 1 also kept a
    /// global lease index: each differs from layout 4 in nothing the migration reads.
    #[test]
    fn layouts_1_to_3_are_migrated_too() {
        for layout in [keys::LAYOUT_V3, keys::LAYOUT_V2, keys::LAYOUT_V1] {
            migrates(|db, path| {
                let meta = db.open_tree("meta").unwrap();
                meta.insert(keys::META_FORMAT, &[layout]).unwrap();
                if layout <= keys::LAYOUT_V3 {
                    meta.remove(keys::META_WAL).unwrap();
                    std::fs::remove_file(path.join(crate::wal::FILE_NAME)).unwrap();
                }
                if layout == keys::LAYOUT_V1 {
                    db.open_tree(keys::LAYOUT_V1_LEASES)
                        .unwrap()
                        .insert([0u8; 16], [0u8; 32].to_vec())
                        .unwrap();
                }
                db.flush().unwrap();
            });
        }
    }

    /// A crash during the rebuild leaves layout 4 with half-built new trees: the next open
    /// builds them again from the old ones.
    #[test]
    fn a_migration_interrupted_while_building_starts_over() {
        migrates(|db, _| {
            for t in REBUILT {
                db.open_tree(t.sled_name())
                    .unwrap()
                    .insert(b"half-built", b"junk".to_vec())
                    .unwrap();
            }
            db.flush().unwrap();
        });
    }

    /// A batch the layout-4 engine had logged but not applied (a crash) is applied to the
    /// old trees first, then migrated with the rest.
    #[test]
    fn a_layout_4_write_ahead_log_is_applied_before_migrating() {
        migrates(|db, path| {
            let old = db.open_tree("messages").unwrap();
            let (k, v) = old.iter().next().unwrap().unwrap();
            old.remove(&k).unwrap();
            log_old_batch(
                db,
                path,
                &[(TreeId::Messages, k.as_ref(), Some(v.as_ref()))],
            );
        });
    }

    /// A layout-4 log record that writes to a tree layout 4 did not have is damage: the
    /// open is refused naming the log, and none of that record's writes is applied.
    #[test]
    fn a_layout_4_log_record_naming_a_tree_layout_4_lacked_is_refused_whole() {
        let (_dir, path, clock) = old_database();
        let removed = {
            let db = raw(&path);
            let old = db.open_tree("messages").unwrap();
            let (k, v) = old.iter().next().unwrap().unwrap();
            old.remove(&k).unwrap();
            log_old_batch(
                &db,
                &path,
                &[
                    (TreeId::Messages, k.as_ref(), Some(v.as_ref())),
                    (TreeId::MessageIds, &b"k"[..], Some(&b"v"[..])),
                ],
            );
            k
        };
        match open(&path, &clock) {
            Err(Error::Corrupted { tree, detail, .. }) => {
                assert_eq!(tree, "(write-ahead log)");
                assert!(detail.contains("does not have"), "{detail}");
            }
            other => panic!("opened: {:?}", other.map(|_| ())),
        }
        {
            let db = raw(&path);
            assert!(db
                .open_tree("messages")
                .unwrap()
                .get(&removed)
                .unwrap()
                .is_none());
        }
        let (format, _) = layout_and_trees(&path);
        assert_eq!(format, Some(vec![keys::LAYOUT_V4]));
    }

    /// A crash after layout 5 was recorded but before the old trees were dropped: the next
    /// open drops them.
    #[test]
    fn old_trees_left_by_a_crash_after_the_migration_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let clock = ManualClock::new(Timestamp::from_micros(0));
        let before = {
            let q = open(&path, &clock).unwrap();
            populate(&q, &clock);
            state(&q)
        };
        {
            let db = raw(&path);
            for name in DROPPED {
                db.open_tree(name)
                    .unwrap()
                    .insert(b"old", b"junk".to_vec())
                    .unwrap();
            }
            db.flush().unwrap();
        }
        let q = open(&path, &clock).unwrap();
        assert_eq!(q.check_integrity().unwrap(), Vec::<String>::new());
        assert_eq!(state(&q).1, before.1);
        drop(q);
        let (_, names) = layout_and_trees(&path);
        for name in DROPPED {
            assert!(!names.iter().any(|n| n == name), "{name} in {names:?}");
        }
    }

    /// An old record that does not decode stops the open with an error naming it, and
    /// changes nothing: the database stays layout 4 with its old trees.
    #[test]
    fn an_undecodable_old_record_stops_the_migration_and_changes_nothing() {
        let (_dir, path, clock) = old_database();
        let key = keys::message_id(Uuid::from_u128(1), Uuid::from_u128(2));
        let count = {
            let db = raw(&path);
            let old = db.open_tree("messages").unwrap();
            old.insert(key, vec![codec::FORMAT_V1, 0xff]).unwrap();
            db.flush().unwrap();
            old.len()
        };
        for _ in 0..2 {
            match open(&path, &clock) {
                Err(Error::Corrupted { tree, key: k, .. }) => {
                    assert_eq!(tree, "messages");
                    assert_eq!(k, crate::error::hex(&key));
                }
                other => panic!("opened: {:?}", other.map(|_| ())),
            }
        }
        let (format, _) = layout_and_trees(&path);
        assert_eq!(format, Some(vec![keys::LAYOUT_V4]));
        assert_eq!(raw(&path).open_tree("messages").unwrap().len(), count);
    }
}
