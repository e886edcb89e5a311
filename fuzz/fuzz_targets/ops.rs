//! `ops`: a byte string decodes into a sequence of queue operations (with clock moves,
//! policy changes and restarts) that runs on the engine and on the reference model in
//! `tests/model/mod.rs`; any divergence or broken invariant is a crash.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/model/mod.rs"]
mod model;

fuzz_target!(|data: &[u8]| {
    if let Err(divergence) = model::run_bytes(data) {
        panic!("{divergence}");
    }
});
