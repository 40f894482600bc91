//! Each subject's DPoP key (`[dpop]`): a key of its own, so that a token
//! bound to one subject's key is useless beside another subject's proof.
//!
//! The key is sealed in the subject's record, with the tokens bound to it.
//! It is made with the subject's first token request (the connect flow's code
//! exchange, or the first refresh of an imported refresh token), and written
//! with the tokens that request obtains, by the fenced write of the record:
//! of two replicas racing on a subject, the one whose write lands has its
//! tokens and its key stored together, and the other's tokens (bound to a key
//! nobody keeps) are dropped. Deleting the record deletes the key. The cache
//! keeps the key beside the subject's token, parsed on first use, so a
//! request costs one signature and no store read.

use std::sync::Arc;
use std::time::Duration;

use tracing::info;

use super::{Inner, SubjectError, Subjects};
use crate::jose::ProofKey;
use crate::store::{SubjectKey, SubjectLoad, SubjectRecord};
use crate::token::LazyProofKey;

/// A key for a token request: its stored form and the key that signs.
pub type KeyPair = (SubjectKey, Arc<ProofKey>);

impl Subjects {
    /// Whether the client's subjects' tokens are DPoP-bound.
    pub fn uses_dpop(&self) -> bool {
        self.inner.dpop.is_some()
    }

    /// The key for tokens a person or an operator brings for `subject`
    /// (connect, import): the one its record holds when it is of the
    /// configured alg, else a new one. `None` without `[dpop]`.
    pub async fn key_for_new_tokens(&self, subject: &str) -> Result<Option<KeyPair>, String> {
        let inner = &self.inner;
        let Some(alg) = inner.dpop else {
            return Ok(None);
        };
        let stored = match inner.store.get(subject).await {
            Ok(SubjectLoad::Found(record)) => record.dpop_key,
            Ok(SubjectLoad::Missing | SubjectLoad::NotOpened { .. }) => None,
            Err(e) => return Err(format!("the store cannot be read: {e}")),
        };
        if let Some(stored) = stored.filter(|k| k.alg == alg.as_str()) {
            if let Ok(parsed) = inner.parsed_key(subject, &stored) {
                return Ok(Some((stored, parsed)));
            }
        }
        let made = LazyProofKey::generate(alg).map_err(|e| e.to_string())?;
        info!(client = %inner.client, subject, alg = alg.as_str(), jkt = made.1.thumbprint(),
            "new DPoP key for the subject");
        Ok(Some(made))
    }
}

impl Inner {
    /// The key of the proofs of a refresh of `record`: its own (a refresh
    /// token may be bound to it, whatever alg is configured now), else a
    /// new one, stored with the tokens the refresh obtains.
    pub(super) fn refresh_key(
        &self,
        subject: &str,
        record: &SubjectRecord,
    ) -> Result<Option<KeyPair>, SubjectError> {
        let Some(alg) = self.dpop else {
            return Ok(None);
        };
        if let Some(stored) = &record.dpop_key {
            return self
                .parsed_key(subject, stored)
                .map(|parsed| Some((stored.clone(), parsed)))
                .map_err(|e| {
                    SubjectError::unavailable(
                        format!("subject {subject:?}: {e}"),
                        Duration::from_secs(30),
                    )
                });
        }
        let made = LazyProofKey::generate(alg)
            .map_err(|e| SubjectError::unavailable(e.to_string(), Duration::from_secs(1)))?;
        info!(client = %self.client, subject, alg = alg.as_str(), jkt = made.1.thumbprint(),
            "new DPoP key for the subject");
        Ok(Some(made))
    }

    /// `stored` parsed: the cached subject's parse when it holds that key.
    fn parsed_key(
        &self,
        subject: &str,
        stored: &SubjectKey,
    ) -> Result<Arc<ProofKey>, crate::token::dpop::DpopError> {
        match self.cached_key(subject, stored) {
            Some(lazy) => lazy.get().cloned(),
            None => LazyProofKey::new(stored)?.get().cloned(),
        }
    }

    /// The key the cached token of `subject` carries, when it is `stored`.
    fn cached_key(&self, subject: &str, stored: &SubjectKey) -> Option<Arc<LazyProofKey>> {
        let cached = self.cached(subject)?;
        cached
            .token
            .dpop_key
            .as_ref()
            .filter(|k| k.holds(stored))
            .cloned()
    }

    /// What a token of `record` carries for its proofs: its `ath` and the
    /// record's key (shared with the subject's previous token when it is the
    /// same). `Some(None)` without `[dpop]`; `None` for a record without a
    /// usable key, whose tokens are bound to no key of ours.
    pub(super) fn token_key(
        &self,
        subject: &str,
        record: &SubjectRecord,
        access: &str,
    ) -> Option<Option<(String, Arc<LazyProofKey>)>> {
        if self.dpop.is_none() {
            return Some(None);
        }
        let stored = record.dpop_key.as_ref()?;
        let key = match self.cached_key(subject, stored) {
            Some(key) => key,
            None => Arc::new(LazyProofKey::new(stored).ok()?),
        };
        Some(Some((crate::jose::access_token_hash(access), key)))
    }
}
