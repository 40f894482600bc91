//! The integration tests, one module per user-visible behaviour, in one binary
//! (one link instead of one per file). Tests that install a global log capture,
//! the Redis fleets, the allocation guard (its own global allocator), and the
//! interop and soak harnesses stay binaries of their own.

#[path = "../support/mod.rs"]
mod support;

mod admin;
mod admin_writes;
mod app_protocols;
mod authorize;
mod cli;
mod client_assertions;
mod connect;
mod demo;
mod dpop;
mod egress_proxy;
mod expect_continue;
mod forwarding;
mod hostile_input;
mod lifecycle;
mod origin;
mod protocols;
mod provider_faults;
mod provider_quirks;
mod reload;
mod source_rules;
mod store_integrity;
mod subjects;
mod subjects_cli;
mod subjects_dpop;
mod token_cache;
mod token_connections;
mod token_shapes;
mod unauthorized;
mod upgrade;
mod upstream_faults;
mod upstream_pool;
mod upstream_tls;
mod workers;
