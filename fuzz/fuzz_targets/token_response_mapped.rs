//! Structured token endpoint bodies read through a `[token.response]` mapping
//! (field names, dotted paths, units), and refusals classified by
//! `[[token.errors]]` rules. Properties: `tokenproxy_fuzz::mapped`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenproxy_fuzz::mapped;

fuzz_target!(|case: mapped::Case| {
    mapped::check(&case);
});
