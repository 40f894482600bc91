//! HTTP plumbing shared by the request path and the token endpoints: the body
//! type and the client builder (TLS, egress proxy). A leaf: it imports nothing
//! of tokenproxy above configuration.

pub mod body;
pub mod client;
