//! RFC 7009 token revocation (a subject deleted through the admin API).

use http_body_util::BodyExt;

use super::assertion;
use super::dialect::{build_request, GrantKind};
use super::TokenEndpoint;
use crate::config::TokenConfig;
use crate::secret::Secret;

impl TokenEndpoint {
    /// Revokes `token` (a refresh token) at `url` with the client's
    /// authentication; `Err` says why, without a secret.
    pub async fn revoke(
        &self,
        config: &TokenConfig,
        url: &http::Uri,
        token: &Secret,
    ) -> Result<(), String> {
        let assertion = assertion::for_request(config, url, self.clock().wall_now()).await?;
        let request = build_request(config, GrantKind::Revoke { url, token }, assertion.as_ref())
            .map_err(|e| format!("cannot build the revocation request: {e}"))?;
        let exchange = async {
            let response = self.http().request(request).await.map_err(|e| {
                format!(
                    "revocation endpoint unreachable: {}",
                    super::error_chain(&e)
                )
            })?;
            let status = response.status();
            // Drain (bounded by the timeout) so the connection can be reused.
            let _body = http_body_util::Limited::new(response.into_body(), 64 * 1024)
                .collect()
                .await;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("revocation endpoint answered {status}"))
            }
        };
        match tokio::time::timeout(config.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err("revocation endpoint did not answer in time".to_owned()),
        }
    }
}
