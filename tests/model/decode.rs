//! The `decode` check, shared by the fuzz target and `cargo test`: arbitrary bytes into
//! every record decoder and key parser give a value or a typed error, never a panic.

/// Runs every decoder on `data`, and on each suffix split at the first byte (so the first
/// byte can steer a record decode into the current format).
pub fn check(data: &[u8]) {
    let _ = cleanup_queue::fuzzing::decode_record(data);
    cleanup_queue::fuzzing::parse_keys(data);
    let mut framed = vec![1u8];
    framed.extend_from_slice(data);
    let _ = cleanup_queue::fuzzing::decode_record(&framed);
}
