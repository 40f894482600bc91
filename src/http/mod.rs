//! HTTP plumbing shared by the request path and the token endpoints: the body
//! type, the client builder (TLS, egress proxy) and the upstream connection. A
//! leaf: it imports nothing of tokenproxy above configuration.

pub mod body;
pub mod client;
pub mod plain;
