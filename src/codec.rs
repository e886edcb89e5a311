//! The bytes of every value on disk. Decoding never panics and never allocates more than
//! the input could describe.
//!
//! | value              | bytes |
//! |--------------------|-------|
//! | message record     | `FORMAT_V1` (1 byte) then bincode 1.3 (fixint, little-endian) of `machine::Record` |
//! | id in an index     | 16 raw bytes |
//! | counters (`wakeups`, `meta/seq`) | u64 big-endian |
//! | `meta/format`      | one byte, the key layout (`keys::LAYOUT`) |
//! | `meta/journal`     | `JOURNAL_V1`, the number of writes (u32 BE), then per write: tree index (1), key length (u32 BE), key, then `0` (delete) or `1`, value length (u32 BE), value |
//!
//! `target` and `data` are stored as JSON text inside the record: bincode cannot round-trip
//! `serde_json::Value`.

use bincode::Options;
use uuid::Uuid;

use crate::keys::TreeId;
use crate::machine::Record;

/// The current record format.
pub(crate) const FORMAT_V1: u8 = 1;

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
    let mut out = vec![FORMAT_V1];
    options()
        .serialize_into(&mut out, rec)
        .map_err(|e| format!("cannot encode record: {e}"))?;
    Ok(out)
}

/// Decodes a record; the error says what is wrong with the bytes.
pub(crate) fn decode_record(bytes: &[u8]) -> Result<Record, String> {
    match bytes.split_first() {
        None => Err("empty record".into()),
        Some((&FORMAT_V1, body)) => {
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
        Some((v, _)) => Err(format!("unknown record format version {v}")),
    }
}

pub(crate) fn encode_u64(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

pub(crate) fn decode_u64(bytes: &[u8]) -> Result<u64, String> {
    let b: [u8; 8] = bytes
        .try_into()
        .map_err(|_| format!("expected 8 bytes for a counter, found {}", bytes.len()))?;
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
        let r = sample();
        let bytes = encode_record(&r).unwrap();
        assert_eq!(bytes[0], FORMAT_V1);
        assert_eq!(decode_record(&bytes).unwrap(), r);
    }

    #[test]
    fn every_truncation_and_bad_version_is_an_error() {
        let bytes = encode_record(&sample()).unwrap();
        for n in 0..bytes.len() {
            assert!(decode_record(&bytes[..n]).is_err(), "prefix {n} decoded");
        }
        let mut v2 = bytes.clone();
        v2[0] = 2;
        assert!(decode_record(&v2).unwrap_err().contains("version 2"));
        let mut long = bytes;
        long.push(0);
        assert!(decode_record(&long).is_err());
    }

    #[test]
    fn huge_length_prefix_does_not_allocate() {
        // version, pool(16 with u64 length prefix in fixint? uuid serializes as 16 bytes + len)
        let mut bytes = vec![FORMAT_V1];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        bytes.extend_from_slice(&[0xff; 64]);
        assert!(decode_record(&bytes).is_err());
    }
}
