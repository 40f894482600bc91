//! Structured token endpoint bodies: JSON objects with the field names the parser knows
//! and values of the shapes providers send, plus a random clock and status.
//! Properties: `tokenproxy_fuzz::token`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenproxy_fuzz::{json, token};

fuzz_target!(|case: json::Case| {
    token::check(&case.body(), case.now(), case.status());
});
