//! Request headers through `strip_hop_by_hop` and `prepare_request`.
//! Properties: `tokenproxy_fuzz::headers`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenproxy_fuzz::headers;

fuzz_target!(|case: headers::Case| {
    headers::check(&case);
});
