//! Operator operations on a database: inspection (pools, stats, dead letters), redrive of
//! dead letters with an audit trail, and export / import as JSON lines. They go through the
//! same writer lock, transactions and state machine as the queue operations.

use std::io::{BufRead, Write};

use uuid::Uuid;

use crate::codec::{self, ExportLine};
use crate::engine::{corrupt_view, load_metrics, Queue, Txn};
use crate::error::{Error, InputError, Result};
use crate::keys::{self, TreeId};
use crate::machine::{self, Record, State};
use crate::metrics::Counter;
use crate::model::{CleanupKind, DeadLetter, Message, PoolStats, RedriveRecord};
use crate::store::decode_record_at;

/// Which dead letters to redrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedriveTarget {
    /// One message.
    Message(Uuid),
    /// Every dead letter of the pool.
    All,
}

/// Records per import transaction.
const IMPORT_BATCH: usize = 1000;
/// Dead letters redriven per transaction.
const REDRIVE_BATCH: usize = 1000;

impl Queue {
    /// Every pool that has ever been woken (every pool that ever had an enqueue).
    pub fn pools(&self) -> Result<Vec<Uuid>> {
        let store = &self.inner().store;
        let mut out = Vec::new();
        for item in store.range::<std::ops::RangeFull>(TreeId::Wakeups, ..) {
            let (k, _) = item?;
            out.push(
                keys::uuid_at(&k, 0)
                    .ok_or_else(|| Error::corrupted("wakeups", &k, "not a pool id"))?,
            );
        }
        Ok(out)
    }

    /// Counts and ages for one pool. Reads the pool's records once.
    pub fn pool_stats(&self, pool: Uuid) -> Result<PoolStats> {
        let mut s = PoolStats {
            work_pool_id: pool,
            wakeup_sequence: self.read_wakeup_sequence(pool)?,
            ..PoolStats::default()
        };
        self.for_each_record(Some(pool), |rec| {
            match &rec.state {
                State::Visible => {
                    s.visible += 1;
                    s.oldest_visible_at = Some(
                        s.oldest_visible_at
                            .map_or(rec.visible_at, |t| t.min(rec.visible_at)),
                    );
                }
                State::Reserved {
                    lease_expires_at, ..
                } => {
                    s.reserved += 1;
                    s.next_lease_expires_at = Some(
                        s.next_lease_expires_at
                            .map_or(*lease_expires_at, |t| t.min(*lease_expires_at)),
                    );
                }
                State::Dead { .. } => s.dead_lettered += 1,
                State::Acked { .. } => s.tombstones += 1,
            }
            Ok(true)
        })?;
        Ok(s)
    }

    /// Up to `limit` dead letters, optionally of one pool and one kind, in key order.
    pub fn dead_letters(
        &self,
        pool: Option<Uuid>,
        kind: Option<CleanupKind>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        self.for_each_record(pool, |rec| {
            if kind.is_none_or(|k| k == rec.kind) {
                if let Some(dl) = rec.dead_letter().map_err(|d| corrupt_view(rec, d))? {
                    out.push(dl);
                }
            }
            Ok(out.len() < limit)
        })?;
        Ok(out)
    }

    /// Moves dead letters of `pool` back to visible (at the back of the FIFO), records an
    /// audit entry per message (when, who, why, the dead letter as it was) and wakes the pool.
    /// `reset_count` sets the delivery count back to 0; without it a message whose count is
    /// still at the maximum goes straight back to the DLQ at its next reserve. Returns the
    /// redriven messages (empty when there was nothing to redrive).
    pub fn redrive(
        &self,
        pool: Uuid,
        target: RedriveTarget,
        reason: &str,
        actor: &str,
        reset_count: bool,
    ) -> Result<Vec<Message>> {
        if reason.is_empty() {
            return Err(InputError::EmptyRedriveReason.into());
        }
        let inner = self.inner();
        inner.check()?;
        let mut out = Vec::new();
        loop {
            let candidates: Vec<Record> = match target {
                RedriveTarget::Message(id) => {
                    inner.store.get_record(pool, id)?.into_iter().collect()
                }
                RedriveTarget::All => {
                    let mut v = Vec::new();
                    self.for_each_record(Some(pool), |rec| {
                        if matches!(rec.state, State::Dead { .. }) {
                            v.push(rec.clone());
                        }
                        Ok(v.len() < REDRIVE_BATCH)
                    })?;
                    v
                }
            };
            let mut writer = inner.lock_writer();
            let now = inner.clock.now();
            let mut txn = Txn::new(&inner.store, &mut writer);
            let mut batch = 0;
            for seen in candidates {
                // Re-read under the lock: only a record still dead is redriven.
                let rec = match inner.store.get_record(pool, seen.message_id)? {
                    Some(r) if matches!(r.state, State::Dead { .. }) => r,
                    _ => continue,
                };
                let dead_letter = rec
                    .dead_letter()
                    .map_err(|d| corrupt_view(&rec, d))?
                    .ok_or_else(|| corrupt_view(&rec, "not dead".into()))?;
                let seq = txn.seq();
                let new = machine::redrive(&rec, now, seq, reset_count);
                txn.put(Some(&rec), Some(&new))?;
                let audit = RedriveRecord {
                    redriven_at: now,
                    actor: actor.to_string(),
                    reason: reason.to_string(),
                    reset_count,
                    dead_letter,
                };
                txn.put_raw(
                    TreeId::Redrives,
                    keys::redrive(pool, rec.message_id, seq),
                    codec::encode_redrive(&audit).map_err(Error::Storage)?,
                );
                txn.count(Counter::op("redrive", "accepted"));
                txn.wake(pool)?;
                out.push(new.message().map_err(|d| corrupt_view(&new, d))?);
                batch += 1;
            }
            let committed = txn.commit()?;
            drop(writer);
            inner.finish(committed)?;
            if target != RedriveTarget::All || batch < REDRIVE_BATCH {
                return Ok(out);
            }
        }
    }

    /// The redrive audit trail of one message, oldest first.
    pub fn redrive_history(&self, pool: Uuid, id: Uuid) -> Result<Vec<RedriveRecord>> {
        let store = &self.inner().store;
        let mut out = Vec::new();
        for item in store.scan_prefix(TreeId::Redrives, &keys::message_id(pool, id)) {
            let (k, v) = item?;
            out.push(codec::decode_redrive(&v).map_err(|d| Error::corrupted("redrives", &k, d))?);
        }
        Ok(out)
    }

    /// Writes the whole state as JSON lines (no indexes: they follow from the records);
    /// returns the number of lines. Deterministic: the same state gives the same bytes.
    pub fn export(&self, out: &mut dyn Write) -> Result<u64> {
        let inner = self.inner();
        inner.check()?;
        // Hold the writer lock so the export is one consistent snapshot.
        let writer = inner.lock_writer();
        let store = &inner.store;
        let mut n = 0u64;
        let mut emit = |line: &ExportLine| -> Result<()> {
            serde_json::to_writer(&mut *out, line).map_err(|e| Error::Io(e.into()))?;
            out.write_all(b"\n")?;
            n += 1;
            Ok(())
        };
        emit(&ExportLine::Meta {
            format: codec::EXPORT_V1,
            next_seq: writer.next_seq,
        })?;
        for item in store.range::<std::ops::RangeFull>(TreeId::Messages, ..) {
            let (k, v) = item?;
            emit(&ExportLine::Message {
                record: decode_record_at(&k, &v)?,
            })?;
        }
        for item in store.range::<std::ops::RangeFull>(TreeId::Wakeups, ..) {
            let (k, v) = item?;
            emit(&ExportLine::Wakeup {
                work_pool_id: keys::uuid_at(&k, 0)
                    .ok_or_else(|| Error::corrupted("wakeups", &k, "not a pool id"))?,
                sequence: codec::decode_u64(&v).map_err(|d| Error::corrupted("wakeups", &k, d))?,
            })?;
        }
        for (counter, value) in &writer.metrics {
            emit(&ExportLine::Metric {
                counter: counter.clone(),
                value: *value,
            })?;
        }
        for item in store.range::<std::ops::RangeFull>(TreeId::Redrives, ..) {
            let (k, v) = item?;
            let bad = || Error::corrupted("redrives", &k, "key is not pool, id and seq");
            let seq_bytes: [u8; 8] = k
                .get(32..40)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(bad)?;
            emit(&ExportLine::Redrive {
                work_pool_id: keys::uuid_at(&k, 0).ok_or_else(bad)?,
                message_id: keys::uuid_at(&k, 16).ok_or_else(bad)?,
                seq: u64::from_be_bytes(seq_bytes),
                record: codec::decode_redrive(&v)
                    .map_err(|d| Error::corrupted("redrives", &k, d))?,
            })?;
        }
        drop(writer);
        out.flush()?;
        Ok(n)
    }

    /// Loads an export into an empty database, reproducing the state exactly; returns the
    /// number of lines read. Bad lines are rejected with their line number; records are
    /// written in transactions of 1,000, so a failed import leaves a partial state: import
    /// into a fresh directory and discard it on error. A failed import into an empty
    /// database also poisons this engine (every later call returns `Error::Poisoned`): the
    /// partial state may hold sequence numbers the engine would hand out again.
    pub fn import(&self, input: &mut dyn BufRead) -> Result<u64> {
        let inner = self.inner();
        inner.check()?;
        let result = self.import_into_empty(input);
        if let Err(e) = &result {
            if !matches!(e, Error::InvalidInput(InputError::ImportIntoNonEmpty)) {
                inner.poison(format!("an import failed part way: {e}"));
            }
        }
        result
    }

    fn import_into_empty(&self, input: &mut dyn BufRead) -> Result<u64> {
        let inner = self.inner();
        let mut writer = inner.lock_writer();
        let store = &inner.store;
        let empty = store
            .range::<std::ops::RangeFull>(TreeId::Messages, ..)
            .next()
            .is_none()
            && store
                .range::<std::ops::RangeFull>(TreeId::Wakeups, ..)
                .next()
                .is_none()
            && writer.next_seq == 0;
        if !empty {
            return Err(InputError::ImportIntoNonEmpty.into());
        }
        let mut line_no = 0u64;
        let mut next_seq = 0;
        // Records are stored by a position of their own (`born`), which exports leave out:
        // they are numbered afresh in file order (an export lists each pool's records in
        // storage order), and the next seq is raised above them.
        let mut born = 0u64;
        let mut seen = std::collections::HashSet::new();
        let mut txn = Txn::new(store, &mut writer);
        let mut in_batch = 0;
        let mut text = String::new();
        loop {
            text.clear();
            if input.read_line(&mut text)? == 0 {
                break;
            }
            line_no += 1;
            if text.trim().is_empty() {
                continue;
            }
            let bad = |detail: String| InputError::BadImportLine {
                line: line_no,
                detail,
            };
            let line: ExportLine = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
            match line {
                ExportLine::Meta {
                    format,
                    next_seq: s,
                } => {
                    if format != codec::EXPORT_V1 {
                        return Err(bad(format!("unsupported format {format}")).into());
                    }
                    next_seq = s;
                }
                ExportLine::Message { mut record } => {
                    record.born = born;
                    born += 1;
                    // The database was empty: only this input can repeat a message.
                    if !seen.insert((record.work_pool_id, record.message_id)) {
                        return Err(bad("message appears twice".into()).into());
                    }
                    record.message().map_err(bad)?;
                    txn.put(None, Some(&record))?;
                }
                ExportLine::Wakeup {
                    work_pool_id,
                    sequence,
                } => {
                    txn.put_raw(
                        TreeId::Wakeups,
                        keys::wakeup(work_pool_id),
                        codec::encode_u64(sequence),
                    );
                }
                ExportLine::Metric { counter, value } => {
                    txn.put_raw(
                        TreeId::Metrics,
                        keys::metric(&counter),
                        codec::encode_u64(value),
                    );
                }
                ExportLine::Redrive {
                    work_pool_id,
                    message_id,
                    seq,
                    record,
                } => {
                    txn.put_raw(
                        TreeId::Redrives,
                        keys::redrive(work_pool_id, message_id, seq),
                        codec::encode_redrive(&record).map_err(Error::Storage)?,
                    );
                }
            }
            in_batch += 1;
            if in_batch == IMPORT_BATCH {
                let committed = txn.commit()?;
                inner.store.wait_durable(committed.ticket)?;
                txn = Txn::new(store, &mut writer);
                in_batch = 0;
            }
        }
        let next_seq = next_seq.max(born);
        txn.put_raw(TreeId::Meta, keys::META_SEQ, codec::encode_u64(next_seq));
        let committed = txn.commit()?;
        inner.store.wait_durable(committed.ticket)?;
        // The caches follow the imported state.
        writer.next_seq = next_seq;
        writer.seq_limit = next_seq;
        writer.wake.clear();
        writer.metrics = load_metrics(store)?;
        writer.dirty.clear();
        drop(writer);
        for pool in self.pools()? {
            let seq = inner.stored_wakeup(pool)?;
            inner.wakeups.publish(pool, seq, || Ok(seq))?;
        }
        if let Some(first) = self.check_integrity()?.into_iter().next() {
            return Err(InputError::BadImportLine {
                line: line_no,
                detail: format!("the imported state is inconsistent: {first}"),
            }
            .into());
        }
        Ok(line_no)
    }

    /// Calls `f` on every record (of one pool, or all) in key order while it returns true.
    fn for_each_record(
        &self,
        pool: Option<Uuid>,
        mut f: impl FnMut(&Record) -> Result<bool>,
    ) -> Result<()> {
        let store = &self.inner().store;
        let prefix = pool
            .map(|p| keys::pool_prefix(p).to_vec())
            .unwrap_or_default();
        for item in store.scan_prefix(TreeId::Messages, &prefix) {
            let (k, v) = item?;
            if !f(&decode_record_at(&k, &v)?)? {
                break;
            }
        }
        Ok(())
    }
}
