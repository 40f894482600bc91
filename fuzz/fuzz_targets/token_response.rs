//! Raw bytes as a token endpoint body, through `parse_success` and `parse_error`.
//! Properties: `tokenproxy_fuzz::token`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenproxy_fuzz::token;

fuzz_target!(|body: &[u8]| {
    token::check(body, token::default_now(), token::status_for(body));
});
