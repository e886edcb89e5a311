//! The bytes of every value on disk. Decoding never panics and never allocates more than
//! the input could describe.
//!
//! | value              | bytes |
//! |--------------------|-------|
//! | message record     | `FORMAT_V2` (1 byte), `born` (u64 BE), then bincode 1.3 (fixint, little-endian) of the rest of `machine::Record`. Layouts 1–4 stored `FORMAT_V1` (1 byte) then the same bincode, without `born`; only the migration to layout 5 reads those (`decode_legacy_record`) |
//! | id in `idempotency` | 16 raw bytes |
//! | `born` in `message_ids` and the visible, lease indexes | u64 BE |
//! | counters (`wakeups`, `meta/seq`) | u64 big-endian |
//! | `meta/format`      | one byte, the key layout (`keys::LAYOUT`) |
//! | `meta/journal`     | `JOURNAL_V1`, the number of writes (u32 BE), then per write: tree index (1), key length (u32 BE), key, then `0` (delete) or `1`, value length (u32 BE), value |
//! | `meta/wal`         | u64 BE, the id of the write-ahead log's current generation (`wal`; random, never 0) |
//! | a `wal` file record | payload length (u32 BE), CRC-32 of the length, the generation id and the payload (u32 BE), generation id (u64 BE), payload: a batch as in `meta/journal` |
//!
//! `target` and `data` are stored as JSON text inside the record: bincode cannot round-trip
//! `serde_json::Value`.

use bincode::Options;
use uuid::Uuid;

use crate::keys::TreeId;
use crate::machine::Record;

/// The record format of layouts 1–4 (no `born`).
pub(crate) const FORMAT_V1: u8 = 1;
/// The current record format: `born` first, then the body.
pub(crate) const FORMAT_V2: u8 = 2;
/// The export format (`Queue::export`): JSON lines; records without `born`, which an import
/// assigns afresh.
pub(crate) const EXPORT_V1: u8 = 1;

/// A record may be at most this large (target + data are limited well below it).
const MAX_RECORD: u64 = 16 << 20;

fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .reject_trailing_bytes()
        .with_limit(MAX_RECORD)
}

pub(crate) fn encode_record(rec: &Record) -> Result<Vec<u8>, String> {
    // Room for a typical record at once (its encoding grows the buffer otherwise).
    let mut out = Vec::with_capacity(512);
    out.push(FORMAT_V2);
    out.extend_from_slice(&rec.born.to_be_bytes());
    options()
        .serialize_into(&mut out, rec)
        .map_err(|e| format!("cannot encode record: {e}"))?;
    Ok(out)
}

/// Decodes a record; the error says what is wrong with the bytes.
pub(crate) fn decode_record(bytes: &[u8]) -> Result<Record, String> {
    match bytes.split_first() {
        None => Err("empty record".into()),
        Some((&FORMAT_V2, rest)) => {
            let Some((born, body)) = rest.split_first_chunk::<8>() else {
                return Err("record truncated inside its sequence".into());
            };
            let mut rec = decode_body(body)?;
            rec.born = u64::from_be_bytes(*born);
            Ok(rec)
        }
        Some((&FORMAT_V1, _)) => Err("record format version 1 (a layout 4 or older record)".into()),
        Some((v, _)) => Err(format!("unknown record format version {v}")),
    }
}

/// Decodes a record of layouts 1–4 (`born` is 0: the migration assigns it).
pub(crate) fn decode_legacy_record(bytes: &[u8]) -> Result<Record, String> {
    match bytes.split_first() {
        None => Err("empty record".into()),
        Some((&FORMAT_V1, body)) => decode_body(body),
        Some((v, _)) => Err(format!("unknown layout-4 record format version {v}")),
    }
}

fn decode_body(body: &[u8]) -> Result<Record, String> {
    // The limit is the input's own length: a corrupt length prefix fails instead of
    // allocating.
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .reject_trailing_bytes()
        .with_limit(body.len() as u64)
        .deserialize(body)
        .map_err(|e| format!("undecodable record: {e}"))
}

pub(crate) fn encode_u64(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

/// A counter (`wakeups`, `meta/seq`, `metrics`) or a `born` in an index.
pub(crate) fn decode_u64(bytes: &[u8]) -> Result<u64, String> {
    let b: [u8; 8] = bytes
        .try_into()
        .map_err(|_| format!("expected an 8-byte number, found {} bytes", bytes.len()))?;
    Ok(u64::from_be_bytes(b))
}

pub(crate) fn decode_id(bytes: &[u8]) -> Result<Uuid, String> {
    let b: [u8; 16] = bytes
        .try_into()
        .map_err(|_| format!("expected a 16-byte id, found {} bytes", bytes.len()))?;
    Ok(Uuid::from_bytes(b))
}

/// The current `meta/journal` format.
pub(crate) const JOURNAL_V1: u8 = 1;

/// One write as the journal holds it: tree, key, new value (`None`: delete).
pub(crate) type JournalWrite = (TreeId, Vec<u8>, Option<Vec<u8>>);

/// A batch of writes as stored in `meta/journal`.
pub(crate) fn encode_journal<'a>(
    writes: impl IntoIterator<Item = (TreeId, &'a [u8], Option<&'a [u8]>)>,
) -> Result<Vec<u8>, String> {
    let len = |n: usize| {
        u32::try_from(n)
            .map(u32::to_be_bytes)
            .map_err(|_| format!("{n} is too large for a journal"))
    };
    let mut out = vec![JOURNAL_V1, 0, 0, 0, 0];
    let mut count = 0;
    for (tree, key, value) in writes {
        count += 1;
        out.push(tree as u8);
        out.extend_from_slice(&len(key.len())?);
        out.extend_from_slice(key);
        match value {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                out.extend_from_slice(&len(v.len())?);
                out.extend_from_slice(v);
            }
        }
    }
    out[1..5].copy_from_slice(&len(count)?);
    Ok(out)
}

/// Decodes `meta/journal`; the error says what is wrong with the bytes.
pub(crate) fn decode_journal(bytes: &[u8]) -> Result<Vec<JournalWrite>, String> {
    fn take<'a>(rest: &mut &'a [u8], n: usize, what: &str) -> Result<&'a [u8], String> {
        if rest.len() < n {
            return Err(format!("journal truncated in a {what}"));
        }
        let (head, tail) = rest.split_at(n);
        *rest = tail;
        Ok(head)
    }
    fn len(rest: &mut &[u8], what: &str) -> Result<usize, String> {
        let n = take(rest, 4, what)?;
        Ok(u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize)
    }
    fn bytes_with_len(rest: &mut &[u8], what: &str) -> Result<Vec<u8>, String> {
        let n = len(rest, what)?;
        Ok(take(rest, n, what)?.to_vec())
    }
    let mut rest = match bytes.split_first() {
        None => return Err("empty journal".into()),
        Some((&JOURNAL_V1, body)) => body,
        Some((v, _)) => return Err(format!("unknown journal format version {v}")),
    };
    let count = len(&mut rest, "count")?;
    let mut out = Vec::new();
    for _ in 0..count {
        let t = take(&mut rest, 1, "tree")?[0];
        let tree = TreeId::from_index(t).ok_or_else(|| format!("unknown tree {t} in journal"))?;
        let key = bytes_with_len(&mut rest, "key")?;
        let value = match take(&mut rest, 1, "write kind")?[0] {
            0 => None,
            1 => Some(bytes_with_len(&mut rest, "value")?),
            k => return Err(format!("unknown write kind {k} in journal")),
        };
        out.push((tree, key, value));
    }
    if !rest.is_empty() {
        return Err(format!(
            "{} bytes after the journal's last write",
            rest.len()
        ));
    }
    Ok(out)
}

/// One slot of the checkpoint mark (`crate::mark`): a tag, the checkpoint count, a CRC-32 of
/// both.
pub(crate) const MARK_SLOT: usize = 20;
const MARK_TAG: &[u8; 8] = b"cqmark01";

pub(crate) fn encode_mark(count: u64) -> [u8; MARK_SLOT] {
    let mut out = [0u8; MARK_SLOT];
    out[..8].copy_from_slice(MARK_TAG);
    out[8..16].copy_from_slice(&count.to_be_bytes());
    let crc = crc32fast::hash(&out[..16]);
    out[16..].copy_from_slice(&crc.to_be_bytes());
    out
}

/// The count in a mark slot; `None` for anything else (zeros, a torn or damaged slot).
pub(crate) fn decode_mark(slot: &[u8]) -> Option<u64> {
    let slot = slot.get(..MARK_SLOT)?;
    if &slot[..8] != MARK_TAG || crc32fast::hash(&slot[..16]).to_be_bytes() != slot[16..] {
        return None;
    }
    Some(u64::from_be_bytes(slot[8..16].try_into().ok()?))
}

/// The bytes before a write-ahead log record's payload: its length, its CRC-32, its
/// generation id.
pub(crate) const WAL_HEADER: usize = 16;

fn wal_crc(len: &[u8], generation: &[u8], payload: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(len);
    crc.update(generation);
    crc.update(payload);
    crc.finalize()
}

/// Appends one write-ahead log record holding `payload` to `out`.
pub(crate) fn encode_wal_record(
    generation: u64,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let len = u32::try_from(payload.len())
        .map_err(|_| format!("a batch of {} bytes is too large to log", payload.len()))?
        .to_be_bytes();
    let generation = generation.to_be_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&wal_crc(&len, &generation, payload).to_be_bytes());
    out.extend_from_slice(&generation);
    out.extend_from_slice(payload);
    Ok(())
}

/// The valid record of generation `generation` at `at`, if there is one: its payload, and
/// where the next record starts.
fn wal_record_at(bytes: &[u8], at: usize, generation: u64) -> Option<(&[u8], usize)> {
    let header = bytes.get(at..)?.get(..WAL_HEADER)?;
    if header[8..] != generation.to_be_bytes() {
        return None;
    }
    let word =
        |i: usize| u32::from_be_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let start = at + WAL_HEADER;
    let end = start.checked_add(word(0) as usize)?;
    let payload = bytes.get(start..end)?;
    (wal_crc(&header[..4], &header[8..], payload) == word(4)).then_some((payload, end))
}

/// The payloads of the records of generation `generation` at the start of a write-ahead
/// log, in order.
///
/// The log ends at the first offset that does not hold a valid record of the generation:
/// zeros where nothing was written yet, a record (or the middle of one) of an earlier
/// generation, or a record torn by a crash while it was written (never acknowledged). Each
/// generation has a random id, so neither stale bytes nor payloads hold one by chance.
/// Since every record is on disk before the next is written, a valid record of the
/// generation anywhere after the end means the end is damage inside the log, not a torn
/// tail: that is an error, as replaying past it or stopping at it would both lose
/// acknowledged operations silently. Id 0 is never used, so a zero-filled file is empty.
pub(crate) fn decode_wal(bytes: &[u8], generation: u64) -> Result<Vec<&[u8]>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some((payload, next)) = wal_record_at(bytes, at, generation) {
        out.push(payload);
        at = next;
    }
    // The random id never occurs after the end by chance, so every offset holding it there
    // is damage (or a forgery): checking a few bounds the checksum work on any input.
    let id = generation.to_be_bytes();
    let candidates =
        (at + 1..bytes.len().saturating_sub(WAL_HEADER - 1)).filter(|o| bytes[o + 8..o + 16] == id);
    for (checked, o) in candidates.enumerate() {
        if wal_record_at(bytes, o, generation).is_some() {
            return Err(format!(
                "the log holds no valid record at offset {at}, yet a valid one at offset {o}"
            ));
        }
        if checked + 1 == MAX_WAL_CANDIDATES {
            return Err(format!(
                "the log ends at offset {at}, yet {MAX_WAL_CANDIDATES} damaged headers of its \
                 generation follow"
            ));
        }
    }
    Ok(out)
}

/// How many headers of the current generation `decode_wal` checks after the log's end
/// before it refuses the file.
const MAX_WAL_CANDIDATES: usize = 16;

/// One line of an export file (JSON lines). Indexes are not exported: they follow from
/// the records.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ExportLine {
    Meta {
        format: u8,
        next_seq: u64,
    },
    Message {
        record: Record,
    },
    Wakeup {
        work_pool_id: Uuid,
        sequence: u64,
    },
    Metric {
        counter: crate::metrics::Counter,
        value: u64,
    },
    Redrive {
        work_pool_id: Uuid,
        message_id: Uuid,
        seq: u64,
        record: crate::model::RedriveRecord,
    },
}

/// A redrive audit record as stored (JSON text: it is a log, read by people and tools).
pub(crate) fn encode_redrive(r: &crate::model::RedriveRecord) -> Result<Vec<u8>, String> {
    serde_json::to_vec(r).map_err(|e| format!("cannot encode redrive record: {e}"))
}

pub(crate) fn decode_redrive(bytes: &[u8]) -> Result<crate::model::RedriveRecord, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("undecodable redrive record: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::clock::Timestamp;
    use crate::machine::State;
    use crate::model::CleanupKind;

    fn wal(generation: u64, payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            encode_wal_record(generation, p, &mut out).expect("encode");
        }
        out
    }

    #[test]
    fn write_ahead_logs_end_at_another_generation_or_a_torn_last_record() {
        let payloads: [&[u8]; 3] = [b"first", b"", b"third batch"];
        let mut bytes = wal(7, &payloads);
        assert_eq!(decode_wal(&bytes, 7).expect("decode"), payloads);
        assert_eq!(
            decode_wal(&bytes, 8).expect("other generation"),
            Vec::<&[u8]>::new()
        );
        assert_eq!(decode_wal(&[], 7).expect("empty"), Vec::<&[u8]>::new());
        assert_eq!(
            decode_wal(&[0; 64], 7).expect("zeros"),
            Vec::<&[u8]>::new(),
            "zeros"
        );
        // Zeros after the end, or a record of an earlier generation, end the log.
        let full = bytes.len();
        bytes.extend_from_slice(&[0; 40]);
        assert_eq!(decode_wal(&bytes, 7).expect("zeros after").len(), 3);
        bytes.truncate(full);
        bytes.extend(wal(6, &[b"stale"]));
        assert_eq!(decode_wal(&bytes, 7).expect("stale after").len(), 3);
        bytes.truncate(full);
        // Every cut inside the last record drops that record only.
        let last = full - WAL_HEADER - payloads[2].len();
        for cut in last..full {
            assert_eq!(
                decode_wal(&bytes[..cut], 7).expect("torn").len(),
                2,
                "{cut}"
            );
        }
        // A damaged last record (the tail of a torn write) is dropped, even with stale
        // bytes after it.
        let mut torn = bytes.clone();
        torn[full - 1] ^= 1;
        torn.extend(wal(6, &[b"stale"]));
        assert_eq!(decode_wal(&torn, 7).expect("damaged tail").len(), 2);
    }

    /// Damage anywhere before the last valid record is refused, however it hits: a
    /// checksum, a length (the next header is then looked for in the wrong place), a
    /// generation id, or a span of zeros across several records.
    #[test]
    fn damage_inside_a_write_ahead_log_is_an_error() {
        const ID: u64 = 0x5eed_1234_abcd_0007;
        let payloads: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 10 + usize::from(i)]).collect();
        let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        let clean = wal(ID, &refs);
        assert_eq!(decode_wal(&clean, ID).expect("clean").len(), 20);
        let third = (0..3).map(|i| WAL_HEADER + refs[i].len()).sum::<usize>();
        let fourth = third + WAL_HEADER + refs[3].len();
        // Each damages `b` at the third record (at `t`) or across it and the fourth (at `f`).
        type Damage = (&'static str, fn(&mut [u8], usize, usize));
        let damages: [Damage; 5] = [
            ("payload", |b, t, _| b[t + WAL_HEADER] ^= 0x20),
            ("checksum", |b, t, _| b[t + 4] ^= 1),
            ("length", |b, t, _| b[t + 3] ^= 2),
            ("generation", |b, t, _| b[t + 15] ^= 1),
            ("zeros", |b, _, f| b[f - 5..f + WAL_HEADER + 3].fill(0)),
        ];
        for (what, damage) in &damages {
            let mut bytes = clean.clone();
            damage(&mut bytes, third, fourth);
            let e = decode_wal(&bytes, ID).expect_err(what);
            assert!(
                e.contains(&format!("no valid record at offset {third}")),
                "{what}: {e}"
            );
        }
        // Headers of the generation after the end whose records do not check out: a few are
        // checked, then the file is refused (a forged file cannot make the scan quadratic).
        let mut forged = clean[..third].to_vec();
        let mut header = [0u8; WAL_HEADER];
        header[..4].copy_from_slice(&(1u32 << 20).to_be_bytes());
        header[8..].copy_from_slice(&ID.to_be_bytes());
        for _ in 0..(4 << 20) / WAL_HEADER {
            forged.extend_from_slice(&header);
        }
        let started = std::time::Instant::now();
        let e = decode_wal(&forged, ID).expect_err("forged");
        assert!(
            e.contains("damaged headers of its generation follow"),
            "{e}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // The same damage to the last record is a torn tail: the others are replayed.
        let last = clean.len() - WAL_HEADER - refs[19].len();
        let mut bytes = clean.clone();
        bytes[last + 3] ^= 2;
        assert_eq!(decode_wal(&bytes, ID).expect("torn length").len(), 19);
    }

    #[test]
    fn journals_round_trip_and_damaged_ones_are_errors() {
        let writes = vec![
            (TreeId::Messages, b"k1".to_vec(), Some(b"v1".to_vec())),
            (TreeId::Redrives, Vec::new(), Some(Vec::new())),
            (TreeId::Meta, b"seq".to_vec(), None),
        ];
        let bytes = encode_journal(
            writes
                .iter()
                .map(|(t, k, v)| (*t, k.as_slice(), v.as_deref())),
        )
        .expect("encode");
        assert_eq!(decode_journal(&bytes).expect("decode"), writes);
        let empty = [JOURNAL_V1, 0, 0, 0, 0];
        assert_eq!(decode_journal(&empty).expect("empty batch"), vec![]);
        // Every proper prefix is truncated somewhere, and nothing may follow the last write.
        for cut in 1..bytes.len() {
            let e = decode_journal(&bytes[..cut]).expect_err("truncated");
            assert!(e.contains("truncated"), "{cut}: {e}");
        }
        assert!(decode_journal(&[]).is_err());
        assert!(decode_journal(&[9])
            .expect_err("version")
            .contains("version 9"));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_journal(&longer)
            .expect_err("trailing")
            .contains("after"));
        let bad_tree = [JOURNAL_V1, 0, 0, 0, 1, 200];
        assert!(decode_journal(&bad_tree)
            .expect_err("tree")
            .contains("tree 200"));
        let mut bad_kind = bytes.clone();
        bad_kind[5 + 1 + 4 + 2] = 7;
        assert!(decode_journal(&bad_kind)
            .expect_err("kind")
            .contains("kind 7"));
        // Huge counts and length prefixes fail instead of allocating.
        let huge = [JOURNAL_V1, 0xff, 0xff, 0xff, 0xff, 0];
        assert!(decode_journal(&huge)
            .expect_err("huge")
            .contains("truncated"));
        let huge = [JOURNAL_V1, 0, 0, 0, 1, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(decode_journal(&huge)
            .expect_err("huge")
            .contains("truncated"));
    }

    fn sample() -> Record {
        Record {
            state: State::Dead {
                reason: "max_delivery_attempts_reached".into(),
                moved_at: Timestamp::from_micros(9),
                final_delivery_count: 3,
                reservation_token: Some("tok".into()),
                lease_expires_at: None,
                release_reason: Some("boom".into()),
            },
            ..Record::new_visible(
                Uuid::from_u128(1),
                Uuid::from_u128(2),
                "key".into(),
                CleanupKind::PendingClaimTeardown,
                Some(Uuid::from_u128(3)),
                r#"{"a":1}"#.into(),
                "{}".into(),
                Timestamp::from_micros(-4),
                7,
            )
        }
    }

    #[test]
    fn round_trips() {
        let r = Record {
            born: 0x0102_0304_0506_0708,
            ..sample()
        };
        let bytes = encode_record(&r).unwrap();
        assert_eq!(bytes[0], FORMAT_V2);
        assert_eq!(bytes[1..9], r.born.to_be_bytes());
        assert_eq!(decode_record(&bytes).unwrap(), r);
    }

    /// A layout-4 record is the current body without `born`: only the migration reads it.
    #[test]
    fn legacy_records_decode_only_as_legacy() {
        let r = sample();
        let mut legacy = vec![FORMAT_V1];
        legacy.extend_from_slice(&encode_record(&r).unwrap()[9..]);
        assert_eq!(
            decode_legacy_record(&legacy).unwrap(),
            Record {
                born: 0,
                ..r.clone()
            }
        );
        assert!(decode_record(&legacy).unwrap_err().contains("version 1"));
        let current = encode_record(&r).unwrap();
        assert!(decode_legacy_record(&current).is_err());
        for n in 0..legacy.len() {
            assert!(
                decode_legacy_record(&legacy[..n]).is_err(),
                "prefix {n} decoded"
            );
        }
    }

    #[test]
    fn every_truncation_and_bad_version_is_an_error() {
        let bytes = encode_record(&sample()).unwrap();
        for n in 0..bytes.len() {
            assert!(decode_record(&bytes[..n]).is_err(), "prefix {n} decoded");
        }
        let mut v3 = bytes.clone();
        v3[0] = 3;
        assert!(decode_record(&v3).unwrap_err().contains("version 3"));
        let mut long = bytes;
        long.push(0);
        assert!(decode_record(&long).is_err());
    }

    #[test]
    fn huge_length_prefix_does_not_allocate() {
        // version, pool(16 with u64 length prefix in fixint? uuid serializes as 16 bytes + len)
        let mut bytes = vec![FORMAT_V2];
        bytes.extend_from_slice(&7u64.to_be_bytes());
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        bytes.extend_from_slice(&[0xff; 64]);
        assert!(decode_record(&bytes).is_err());
    }
}
