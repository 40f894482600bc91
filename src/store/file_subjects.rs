use super::file::FileBackend;
use super::StoreError;

// Subjects: not yet kept by this backend.
#[allow(unused_variables, clippy::unused_async)]
impl FileBackend {
    fn no_subjects() -> StoreError {
        StoreError::Unavailable("this store does not keep subjects yet".to_owned())
    }
    pub(crate) async fn subject_get(
        &self,
        key: &str,
        subject: &str,
    ) -> Result<Option<super::subjects::SubjectEnvelope>, StoreError> {
        Err(Self::no_subjects())
    }
    pub(crate) async fn subject_put(
        &self,
        key: &str,
        subject: &str,
        envelope: super::subjects::SubjectEnvelope,
    ) -> Result<super::Saved, StoreError> {
        Err(Self::no_subjects())
    }
    pub(crate) async fn subject_delete(
        &self,
        key: &str,
        subject: &str,
    ) -> Result<bool, StoreError> {
        Err(Self::no_subjects())
    }
    pub(crate) async fn subject_list(
        &self,
        key: &str,
        status: Option<super::SubjectStatus>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, super::SubjectMeta)>, StoreError> {
        Err(Self::no_subjects())
    }
    pub(crate) async fn subject_due(
        &self,
        key: &str,
        until_ms: u64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        Err(Self::no_subjects())
    }
    pub(crate) async fn subject_count(
        &self,
        key: &str,
    ) -> Result<std::collections::BTreeMap<super::SubjectStatus, u64>, StoreError> {
        Err(Self::no_subjects())
    }
    pub(crate) async fn once_take(
        &self,
        key: &str,
        id: &str,
        now_ms: u64,
    ) -> Result<Option<String>, StoreError> {
        Err(Self::no_subjects())
    }
}
#[allow(unused_variables, clippy::unused_async)]
impl FileBackend {
    pub(crate) async fn once_put(
        &self,
        key: &str,
        id: &str,
        data: String,
        expires_at_ms: u64,
    ) -> Result<(), StoreError> {
        Err(Self::no_subjects())
    }
}
