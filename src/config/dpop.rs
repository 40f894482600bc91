//! `[clients.NAME.dpop]`: access tokens bound to a key the sidecar holds
//! (RFC 9449). The key itself is not configured: it is made on first start
//! and sealed in the store (see `token/dpop.rs`).

use super::file::RawDpop;
use super::{ConfigError, Table};
use crate::jose::Alg;

/// The algorithms a DPoP key is made for: both are what FAPI 2.0 providers
/// accept (`dpop_signing_alg_values_supported`), and ring makes both keys.
const ALGS: [(&str, Alg); 2] = [("ES256", Alg::Es256), ("EdDSA", Alg::EdDsa)];

/// `[clients.NAME.dpop]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpopConfig {
    /// The key's algorithm; default ES256.
    pub alg: Alg,
}

pub(super) fn build_dpop(raw: RawDpop, t: &Table<'_>) -> Result<DpopConfig, ConfigError> {
    let alg = t.choice("alg", raw.alg, Some(Alg::Es256), &ALGS)?;
    Ok(DpopConfig { alg })
}
