//! The only module that touches sled: opening the trees, reading, committing write sets as
//! one multi-tree transaction, and group commit (many callers share one flush).
//!
//! Group commit works without a thread of its own: a caller whose write is not yet durable
//! either becomes the flush leader (notes how many transactions are applied, flushes once,
//! publishes that count as durable) or waits on a condvar for the leader in progress. A
//! lone caller flushes exactly once; a crowd shares one flush per round.

use std::fs::File;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use sled::transaction::{TransactionError, Transactional};
use uuid::Uuid;

use crate::codec;
use crate::error::{Error, Result};
use crate::keys::{self, TreeId};
use crate::machine::Record;

/// What "returned" means for a mutating call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Flush the log and `fdatasync` the data file before returning: survives process crash,
    /// kernel crash and power loss (on a disk that honours flushes). The default.
    Fsync,
    /// Flush the log to the OS (`pwrite` + `sync_file_range`) before returning: survives a
    /// process crash; a power loss may lose recent operations.
    Flush,
    /// Return at once; the storage library flushes and fsyncs in the background every
    /// `every`. A crash of any kind may lose the operations of the last interval.
    Buffered {
        /// The background flush interval (rounded up to whole milliseconds).
        every: Duration,
    },
}

/// Commit counts since a [`Queue`](crate::Queue) was opened
/// ([`Queue::commit_stats`](crate::Queue::commit_stats)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Atomic write steps applied: one per mutating step (a rejected operation writes none),
    /// whether a sled transaction or a one-key write, the layout write of a new database
    /// included.
    pub transactions: u64,
    /// Durability flushes attempted (`Flush` and `Fsync` modes; always 0 in `Buffered` mode,
    /// where the storage library flushes in the background).
    pub flushes: u64,
}

/// Where the database lives.
pub(crate) enum Location {
    Path(PathBuf),
    Temporary,
}

/// Store settings from the builder.
pub(crate) struct StoreConfig {
    pub location: Location,
    pub cache_capacity: u64,
    pub durability: Durability,
}

/// A set of puts and deletes applied as one atomic transaction.
#[derive(Default, Debug)]
pub(crate) struct WriteSet {
    ops: Vec<(TreeId, Vec<u8>, Option<Vec<u8>>)>,
}

impl WriteSet {
    pub fn put(&mut self, tree: TreeId, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push((tree, key.into(), Some(value.into())));
    }

    pub fn delete(&mut self, tree: TreeId, key: impl Into<Vec<u8>>) {
        self.ops.push((tree, key.into(), None));
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Replaces record `old` by `new` (either may be absent), with exactly the index changes
    /// that `keys::index_entries` implies.
    pub fn record(&mut self, old: Option<&Record>, new: Option<&Record>) -> Result<()> {
        let old_entries = old.map(keys::index_entries).unwrap_or_default();
        let new_entries = new.map(keys::index_entries).unwrap_or_default();
        for (tree, key, _) in &old_entries {
            if !new_entries.iter().any(|(t, k, _)| t == tree && k == key) {
                self.delete(*tree, key.clone());
            }
        }
        for entry in new_entries {
            if !old_entries.contains(&entry) {
                self.ops.push((entry.0, entry.1, Some(entry.2)));
            }
        }
        match (old, new) {
            (_, Some(n)) => {
                let bytes = codec::encode_record(n).map_err(Error::Storage)?;
                self.put(
                    TreeId::Messages,
                    keys::message(n.work_pool_id, n.message_id),
                    bytes,
                );
            }
            (Some(o), None) => self.delete(
                TreeId::Messages,
                keys::message(o.work_pool_id, o.message_id),
            ),
            (None, None) => {}
        }
        Ok(())
    }
}

struct FlushState {
    /// Every transaction with a ticket `<= durable` is on disk.
    durable: u64,
    /// A leader is flushing right now.
    flushing: bool,
    /// A flush failed: the disk may be behind memory for good.
    failed: Option<String>,
}

pub(crate) struct Store {
    db: sled::Db,
    trees: Vec<sled::Tree>,
    durability: Durability,
    /// The data file, for `fdatasync` in `Fsync` mode.
    sync_file: Option<File>,
    /// Tickets handed out: one per committed transaction, in commit order.
    applied: AtomicU64,
    /// Durability flushes done.
    flushes: AtomicU64,
    flush: Mutex<FlushState>,
    flushed: Condvar,
    path: Option<PathBuf>,
    /// Test-only failure injection.
    pub(crate) faults: crate::fault::Faults,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How long `Store::open` keeps retrying a database whose lock is held before it reports
/// `Error::InUse`.
const LOCK_RETRY: Duration = Duration::from_secs(1);

/// Segments large enough that no record is ever written as a separate blob file (sled
/// writes a node larger than a quarter segment as a blob, and does not fsync blobs).
const SEGMENT_SIZE: usize = 8 << 20;

impl Store {
    pub fn open(config: StoreConfig) -> Result<Store> {
        let mut sled_config = sled::Config::new()
            .cache_capacity(config.cache_capacity)
            .mode(sled::Mode::HighThroughput)
            .segment_size(SEGMENT_SIZE)
            .flush_every_ms(match config.durability {
                Durability::Buffered { every } => {
                    Some(u64::try_from(every.as_millis()).unwrap_or(u64::MAX).max(1))
                }
                _ => None,
            });
        let path = match &config.location {
            Location::Path(p) => {
                sled_config = sled_config.path(p);
                Some(p.clone())
            }
            Location::Temporary => {
                sled_config = sled_config.temporary(true);
                None
            }
        };
        // sled releases its file lock from a background IO thread shortly after the last
        // handle of a database is dropped (a pending log write or segment truncation owns
        // the file until it finishes), so a lock refusal right after a close in this or
        // another process is retried for a while before it counts as a second opener
        // (tests/second_opener.rs, reopening_right_after_drop_never_sees_in_use).
        let started = std::time::Instant::now();
        let db = loop {
            match sled_config.open() {
                Ok(db) => break db,
                Err(e) => match open_error(e, path.as_deref()) {
                    Error::InUse { .. } if started.elapsed() < LOCK_RETRY => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    other => return Err(other),
                },
            }
        };
        let trees = TreeId::ALL
            .iter()
            .map(|t| db.open_tree(t.name()))
            .collect::<sled::Result<Vec<_>>>()?;
        let sync_file = match (&path, config.durability) {
            (Some(p), Durability::Fsync) => Some(File::open(p.join("db"))?),
            _ => None,
        };
        let store = Store {
            db,
            trees,
            durability: config.durability,
            sync_file,
            applied: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            flush: Mutex::new(FlushState {
                durable: 0,
                flushing: false,
                failed: None,
            }),
            flushed: Condvar::new(),
            path,
            faults: Default::default(),
        };
        store.check_format()?;
        Ok(store)
    }

    /// Writes the layout byte into a new database and migrates layout 1; refuses any other.
    fn check_format(&self) -> Result<()> {
        match self.tree(TreeId::Meta).get(keys::META_FORMAT)? {
            Some(v) if v.as_ref() == [keys::LAYOUT] => Ok(()),
            Some(v) if v.as_ref() == [keys::LAYOUT_V1] => {
                // Layout 1 differs only by a derived index that layout 2 no longer keeps.
                // Dropping it first makes a crash in between harmless: the next open finds
                // layout 1 without the tree and drops nothing.
                self.db.drop_tree(keys::LAYOUT_V1_LEASES)?;
                self.write_layout()
            }
            Some(v) => Err(Error::corrupted(
                "meta",
                keys::META_FORMAT,
                format!("unsupported database format {:?}", v.as_ref()),
            )),
            None => self.write_layout(),
        }
    }

    fn write_layout(&self) -> Result<()> {
        let mut ws = WriteSet::default();
        ws.put(TreeId::Meta, keys::META_FORMAT, vec![keys::LAYOUT]);
        let ticket = self.commit(&ws)?;
        if let Durability::Buffered { .. } = self.durability {
            // On disk in every mode: a layout change must never be lost.
            self.db.flush()?;
        }
        self.wait_durable(ticket)
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn tree(&self, t: TreeId) -> &sled::Tree {
        &self.trees[t as usize]
    }

    pub fn get(&self, t: TreeId, key: &[u8]) -> Result<Option<sled::IVec>> {
        Ok(self.tree(t).get(key)?)
    }

    /// The record at `(pool, id)`, decoded.
    pub fn get_record(&self, pool: Uuid, id: Uuid) -> Result<Option<Record>> {
        let key = keys::message(pool, id);
        match self.get(TreeId::Messages, &key)? {
            None => Ok(None),
            Some(bytes) => decode_record_at(&key, &bytes).map(Some),
        }
    }

    /// A counter (`wakeups`, `meta/seq`), 0 when absent.
    pub fn get_u64(&self, t: TreeId, key: &[u8]) -> Result<u64> {
        match self.get(t, key)? {
            None => Ok(0),
            Some(v) => codec::decode_u64(&v).map_err(|d| Error::corrupted(t.name(), key, d)),
        }
    }

    pub fn range<R: RangeBounds<Vec<u8>>>(
        &self,
        t: TreeId,
        range: R,
    ) -> impl DoubleEndedIterator<Item = Result<(sled::IVec, sled::IVec)>> + use<R> {
        self.tree(t).range(range).map(|r| r.map_err(Error::from))
    }

    pub fn scan_prefix(
        &self,
        t: TreeId,
        prefix: &[u8],
    ) -> impl DoubleEndedIterator<Item = Result<(sled::IVec, sled::IVec)>> + use<> {
        self.tree(t)
            .scan_prefix(prefix)
            .map(|r| r.map_err(Error::from))
    }

    /// Applies `ws` as one transaction over all trees and returns its durability ticket.
    /// Callers serialise commits (the engine's writer lock), so tickets follow log order.
    pub fn commit(&self, ws: &WriteSet) -> Result<u64> {
        self.faults.before_write()?;
        if let [(tree, key, value)] = ws.ops.as_slice() {
            // One key is atomic on its own. A sled transaction (or batch) rolls the log's
            // IO buffer twice, which costs two background writes with `sync_file_range`;
            // a plain insert or remove does not (an explicit wake writes only its sequence).
            let tree = self.tree(*tree);
            match value {
                Some(v) => tree.insert(key.as_slice(), v.as_slice())?,
                None => tree.remove(key.as_slice())?,
            };
            return Ok(self.applied.fetch_add(1, Ordering::SeqCst) + 1);
        }
        let result: std::result::Result<(), TransactionError<()>> =
            self.trees[..].transaction(|views| {
                for (tree, key, value) in &ws.ops {
                    let view = &views[*tree as usize];
                    match value {
                        Some(v) => view.insert(key.as_slice(), v.as_slice())?,
                        None => view.remove(key.as_slice())?,
                    };
                }
                Ok(())
            });
        match result {
            Ok(()) => Ok(self.applied.fetch_add(1, Ordering::SeqCst) + 1),
            Err(TransactionError::Storage(e)) => Err(e.into()),
            Err(TransactionError::Abort(())) => Err(Error::Storage("transaction aborted".into())),
        }
    }

    /// The ticket of the last applied transaction: waiting for it makes everything a reader
    /// has seen durable.
    pub fn applied_ticket(&self) -> u64 {
        self.applied.load(Ordering::SeqCst)
    }

    pub fn commit_stats(&self) -> CommitStats {
        CommitStats {
            transactions: self.applied.load(Ordering::SeqCst),
            flushes: self.flushes.load(Ordering::SeqCst),
        }
    }

    /// Whether transaction `ticket` is already as durable as the mode promises (no waiting).
    pub fn is_durable(&self, ticket: u64) -> bool {
        match self.durability {
            Durability::Buffered { .. } => true,
            _ => lock(&self.flush).durable >= ticket,
        }
    }

    /// The failure of an earlier flush, if any.
    pub fn failure(&self) -> Option<String> {
        lock(&self.flush).failed.clone()
    }

    /// Whether waiting for `ticket` would start a flush of its own (no flush in progress
    /// covers it yet). The engine then lets the commit in progress finish first, so that one
    /// flush covers both.
    pub fn would_lead(&self, ticket: u64) -> bool {
        if let Durability::Buffered { .. } = self.durability {
            return false;
        }
        let st = lock(&self.flush);
        st.durable < ticket && !st.flushing && st.failed.is_none()
    }

    /// Returns once transaction `ticket` is as durable as the mode promises.
    pub fn wait_durable(&self, ticket: u64) -> Result<()> {
        if let Durability::Buffered { .. } = self.durability {
            return Ok(());
        }
        let mut st = lock(&self.flush);
        loop {
            if let Some(e) = &st.failed {
                return Err(Error::Poisoned(format!("a durability flush failed: {e}")));
            }
            if st.durable >= ticket {
                return Ok(());
            }
            if st.flushing {
                st = self.flushed.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            st.flushing = true;
            let target = self.applied.load(Ordering::SeqCst);
            drop(st);
            let r = self.flush_now();
            st = lock(&self.flush);
            st.flushing = false;
            match r {
                Ok(()) => st.durable = st.durable.max(target),
                Err(e) => st.failed = Some(e.to_string()),
            }
            self.flushed.notify_all();
        }
    }

    fn flush_now(&self) -> Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.faults.before_flush()?;
        self.db.flush()?;
        if let Some(f) = &self.sync_file {
            f.sync_data()?;
        }
        Ok(())
    }

    /// Bytes the database occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64> {
        Ok(self.db.size_on_disk()?)
    }
}

/// Decodes the record stored at `messages/key`, naming the key when the bytes are bad.
pub(crate) fn decode_record_at(key: &[u8], bytes: &[u8]) -> Result<Record> {
    let rec = codec::decode_record(bytes).map_err(|d| Error::corrupted("messages", key, d))?;
    if keys::message(rec.work_pool_id, rec.message_id) != key {
        return Err(Error::corrupted(
            "messages",
            key,
            "the record's pool and id do not match its key",
        ));
    }
    Ok(rec)
}

fn open_error(e: sled::Error, path: Option<&Path>) -> Error {
    match (&e, path) {
        (sled::Error::Io(io), Some(p)) if io.to_string().contains("could not acquire lock") => {
            Error::InUse {
                path: p.to_path_buf(),
            }
        }
        _ => Error::from(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes in the `messages` tree that do not decode (or decode to another key's record)
    /// surface as `Error::Corrupted` naming the tree and the key. (Through the file they
    /// cannot be produced: sled's checksums drop a damaged log entry first; see
    /// tests/corruption.rs.)
    #[test]
    fn undecodable_records_are_corrupted_errors_naming_tree_and_key() {
        let key = keys::message(Uuid::from_u128(1), Uuid::from_u128(2));
        for bytes in [
            &b""[..],
            &[codec::FORMAT_V1, 0xff, 0x00][..],
            &[9, 1, 2, 3][..],
        ] {
            match decode_record_at(&key, bytes) {
                Err(Error::Corrupted {
                    tree,
                    key: k,
                    detail,
                }) => {
                    assert_eq!(tree, "messages");
                    assert_eq!(k, crate::error::hex(&key));
                    assert!(!detail.is_empty());
                }
                other => panic!("{bytes:?} decoded as {other:?}"),
            }
        }
        let rec = Record::new_visible(
            Uuid::from_u128(1),
            Uuid::from_u128(3),
            "k".into(),
            crate::model::CleanupKind::PendingClaimTeardown,
            None,
            "{}".into(),
            "{}".into(),
            crate::clock::Timestamp::from_micros(0),
            0,
        );
        let bytes = codec::encode_record(&rec).expect("encode");
        let e = decode_record_at(&key, &bytes).expect_err("stored under another key");
        assert!(e.to_string().contains("do not match its key"), "{e}");
        assert!(e.to_string().contains("`messages`"), "{e}");
    }
}
