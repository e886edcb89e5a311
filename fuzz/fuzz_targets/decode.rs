//! `decode`: arbitrary bytes into every record decoder and key parser of the engine: a value
//! or a typed error, never a panic (and never a huge allocation: libFuzzer's `-rss_limit_mb`
//! and `-malloc_limit_mb` catch those).

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/model/decode.rs"]
mod decode;

fuzz_target!(|data: &[u8]| {
    decode::check(data);
});
