//! The bytes of every value on disk. Decoding never panics and never allocates more than
//! the input could describe.
//!
//! | value              | bytes |
//! |--------------------|-------|
//! | message record     | `FORMAT_V1` (1 byte) then bincode 1.3 (fixint, little-endian) of `machine::Record` |
//! | id in an index     | 16 raw bytes |
//! | counters (`wakeups`, `meta/seq`) | u64 big-endian |
//! | `meta/format`      | one byte, the key layout (`keys::LAYOUT`) |
//!
//! `target` and `data` are stored as JSON text inside the record: bincode cannot round-trip
//! `serde_json::Value`.

use bincode::Options;
use uuid::Uuid;

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
