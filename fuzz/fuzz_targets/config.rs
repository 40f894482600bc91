//! TOML text through `tokenproxy::config::from_str`; the first byte picks the
//! environment. Properties: `tokenproxy_fuzz::config`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenproxy_fuzz::config;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, text)) = data.split_first() else {
        return;
    };
    config::check(selector, &String::from_utf8_lossy(text));
});
