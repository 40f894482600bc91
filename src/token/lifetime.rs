//! How long a token endpoint's tokens are used for: the same checks for a
//! client's own token and for every subject's, so that a provider (or a
//! misconfigured `expires_at_unit`) that states an expiry already past, or a
//! lifetime too short to use, costs one refresh and a backoff, not a refresh
//! per request.

use std::time::Duration;

use tracing::warn;

use crate::config::TokenConfig;
use crate::token::response::{LifetimeSource, TokenSet, MAX_LIFETIME};

/// Shortest access token lifetime the sidecar will use.
pub(crate) const MIN_LIFETIME: Duration = Duration::from_secs(1);
/// Lifetime assumed when a provider's absolute expiry is already past on our clock.
pub(crate) const SKEW_FALLBACK_LIFETIME: Duration = Duration::from_secs(60);

/// The access token lifetime to schedule by, measured from the moment the
/// response arrived: the response's, else `default_lifetime`. An absolute
/// expiry (`expires_at`, a JWT's `exp`) already past on our clock means clock
/// skew or a wrong `expires_at_unit`, not a token issued dead: it is replaced
/// by `default_lifetime` (or 60 s) and logged. A stated `expires_in` of less
/// than [`MIN_LIFETIME`] is refused (`Err` says why): such a token could
/// never be sent, and using it would ask for another at every request.
pub(crate) fn access_lifetime(
    set: &TokenSet,
    config: &TokenConfig,
    client: &str,
) -> Result<Option<Duration>, String> {
    let lifetime = match set.lifetime {
        Some(l) if l.is_zero() && set.lifetime_source != LifetimeSource::ExpiresIn => {
            let fallback = config.default_lifetime.unwrap_or(SKEW_FALLBACK_LIFETIME);
            warn!(client, source = set.lifetime_source.as_str(),
                fallback_s = fallback.as_secs(),
                "token expiry is already past by our clock (clock skew, or a wrong expires_at_unit?); assuming a fallback lifetime");
            Some(fallback.min(MAX_LIFETIME))
        }
        Some(l) => {
            if set.clamped() {
                warn!(
                    client,
                    source = set.lifetime_source.as_str(),
                    "token expiry is implausibly far away; clamped"
                );
            }
            Some(l)
        }
        // Config validation bounds it too; clamping here keeps deadline and
        // formatting arithmetic safe whatever the config holds.
        None => config.default_lifetime.map(|l| l.min(MAX_LIFETIME)),
    };
    match lifetime {
        Some(l) if l < MIN_LIFETIME => Err(format!(
            "the token's lifetime ({} ms) is shorter than {} s",
            l.as_millis(),
            MIN_LIFETIME.as_secs()
        )),
        _ => Ok(lifetime),
    }
}

/// The refresh token lifetime the response states, if it states a usable
/// one: an expiry already past on our clock is skew (or a wrong
/// `refresh_token_expires_at_unit`), not a dead token just issued; it is
/// logged and taken as unstated. Callers fall back to
/// `refresh_token_lifetime` (or, for a refresh token not rotated, to the
/// expiry already known).
pub(crate) fn stated_refresh_token_lifetime(set: &TokenSet, client: &str) -> Option<Duration> {
    match set.refresh_token_lifetime {
        Some(l) if l.is_zero() => {
            warn!(
                client,
                "refresh token expiry is in the past by our clock; ignoring it"
            );
            None
        }
        stated => stated.map(|l| l.min(MAX_LIFETIME)),
    }
}

/// The refresh token lifetime to keep: the stated one, else the configured
/// `refresh_token_lifetime`.
pub(crate) fn refresh_token_lifetime(
    set: &TokenSet,
    config: &TokenConfig,
    client: &str,
) -> Option<Duration> {
    stated_refresh_token_lifetime(set, client)
        .or(config.refresh_token_lifetime)
        .map(|l| l.min(MAX_LIFETIME))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MapEnv;
    use crate::secret::Secret;

    fn config(token_lines: &str) -> TokenConfig {
        let text = format!(
            "[clients.pay]\nlisten = \"127.0.0.1:8080\"\nupstream = \"https://api.pay.example\"\n\n[clients.pay.token]\nurl = \"https://auth.pay.example/token\"\nclient_id = \"id\"\nclient_secret = \"s\"\n{token_lines}\n"
        );
        match crate::config::from_str(&text, None, &MapEnv::new()) {
            Ok(mut c) => c.clients.remove(0).token,
            Err(e) => panic!("the test configuration should be valid: {e}"),
        }
    }

    fn set(lifetime: Option<Duration>, source: LifetimeSource, rt: Option<Duration>) -> TokenSet {
        TokenSet {
            access_token: Secret::new("a"),
            token_type: Some("Bearer".into()),
            lifetime,
            lifetime_source: source,
            refresh_token: Some(Secret::new("r")),
            refresh_token_lifetime: rt,
            scope: None,
        }
    }

    const ZERO: Option<Duration> = Some(Duration::ZERO);

    #[test]
    fn an_absolute_expiry_already_past_is_skew_with_the_fallback_lifetime() {
        for source in [LifetimeSource::ExpiresAt, LifetimeSource::JwtExp] {
            let past = set(ZERO, source, None);
            assert_eq!(
                access_lifetime(&past, &config(""), "pay"),
                Ok(Some(SKEW_FALLBACK_LIFETIME))
            );
            assert_eq!(
                access_lifetime(&past, &config("default_lifetime = \"5m\""), "pay"),
                Ok(Some(Duration::from_secs(300)))
            );
        }
    }

    #[test]
    fn a_lifetime_under_a_second_is_refused() {
        let short = set(
            Some(Duration::from_millis(999)),
            LifetimeSource::ExpiresAt,
            None,
        );
        let Err(why) = access_lifetime(&short, &config(""), "pay") else {
            panic!("a 999 ms token is refused");
        };
        assert!(why.contains("999 ms"), "{why}");
        let zero_in = set(ZERO, LifetimeSource::ExpiresIn, None);
        assert!(access_lifetime(&zero_in, &config(""), "pay").is_err());
    }

    #[test]
    fn an_unstated_lifetime_is_default_lifetime() {
        let none = set(None, LifetimeSource::None, None);
        assert_eq!(access_lifetime(&none, &config(""), "pay"), Ok(None));
        assert_eq!(
            access_lifetime(&none, &config("default_lifetime = \"5m\""), "pay"),
            Ok(Some(Duration::from_secs(300)))
        );
    }

    #[test]
    fn a_refresh_token_expiry_already_past_is_taken_as_unstated() {
        let past = set(
            Some(Duration::from_secs(60)),
            LifetimeSource::ExpiresIn,
            ZERO,
        );
        assert_eq!(stated_refresh_token_lifetime(&past, "pay"), None);
        assert_eq!(refresh_token_lifetime(&past, &config(""), "pay"), None);
        assert_eq!(
            refresh_token_lifetime(&past, &config("refresh_token_lifetime = \"24h\""), "pay"),
            Some(Duration::from_secs(86_400))
        );
        let stated = set(
            Some(Duration::from_secs(60)),
            LifetimeSource::ExpiresIn,
            Some(Duration::from_secs(7200)),
        );
        assert_eq!(
            refresh_token_lifetime(&stated, &config("refresh_token_lifetime = \"24h\""), "pay"),
            Some(Duration::from_secs(7200))
        );
    }
}
