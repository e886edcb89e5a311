//! Entry points for the `decode` fuzz target and its `cargo test` twin: every record decoder
//! and key parser on arbitrary bytes (write-ahead logs included). Not part of the API.

use crate::{codec, keys, store};

/// Decodes `bytes` as a message record. A record that decodes must re-encode to bytes that
/// decode to the same record; `Err` is the decoder's typed error. Never panics.
pub fn decode_record(bytes: &[u8]) -> Result<(), String> {
    let rec = codec::decode_record(bytes)?;
    let again = codec::encode_record(&rec)?;
    match codec::decode_record(&again) {
        Ok(r) if r == rec => {}
        Ok(_) => panic!("a decoded record does not survive re-encoding"),
        Err(e) => panic!("a decoded record re-encodes to undecodable bytes: {e}"),
    }
    // The record's views (JSON payloads may be anything) must not panic either.
    let _ = rec.message();
    let _ = rec.reservation();
    let _ = rec.dead_letter();
    let key = keys::message(rec.work_pool_id, rec.born);
    if store::decode_record_at(&key, bytes).is_err() {
        panic!("decode_record_at refused a record under its own key");
    }
    let _ = keys::index_entries(&rec);
    Ok(())
}

/// Runs every key parser and counter/id decoder on `bytes`. Never panics.
pub fn parse_keys(bytes: &[u8]) {
    let _ = keys::parse_message(bytes);
    let _ = keys::parse_legacy_message(bytes);
    for at in [0, 8] {
        let _ = keys::parse_pool_born(bytes, at);
    }
    let _ = keys::fifo_suffix(bytes);
    let _ = codec::decode_u64(bytes);
    let _ = codec::decode_id(bytes);
    let _ = codec::decode_legacy_record(bytes);
    let _ = store::decode_record_at(bytes, bytes);
    decode_journal(bytes);
    decode_wal(bytes);
}

/// A write-ahead log, read for generation 1 and for the generation its first header names:
/// every record returned lies inside the bytes and passed its checksum.
fn decode_wal(bytes: &[u8]) {
    let named = bytes
        .get(8..16)
        .map_or(1, |g| u64::from_be_bytes(g.try_into().expect("8 bytes")));
    for generation in [1, named] {
        if let Ok(records) = codec::decode_wal(bytes, generation) {
            let mut again = Vec::new();
            for r in &records {
                codec::encode_wal_record(generation, r, &mut again).expect("encode");
            }
            assert!(
                bytes.starts_with(&again),
                "decoded log records do not re-encode to the log's first bytes"
            );
        }
    }
}

/// A batch journal that decodes must re-encode to the same bytes.
fn decode_journal(bytes: &[u8]) {
    let Ok(writes) = codec::decode_journal(bytes) else {
        return;
    };
    let again = codec::encode_journal(
        writes
            .iter()
            .map(|(t, k, v)| (*t, k.as_slice(), v.as_deref())),
    );
    assert_eq!(
        again.as_deref(),
        Ok(bytes),
        "a decoded journal does not re-encode to its bytes"
    );
}
