//! Request paths through `check_path`. Property: `tokenproxy_fuzz::path`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tokenproxy_fuzz::path::check(data);
});
