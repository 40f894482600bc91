//! `[clients.NAME.token]`: the token endpoint, the grant and its credentials,
//! and how the client authenticates, each value judged on its own and then
//! the rules between them.

use super::*;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum GrantKind {
    ClientCredentials,
    Password,
    RefreshToken,
}

/// `[clients.NAME.token]`; with `authorizable` (an `[authorize]` table), `grant =
/// "refresh_token"` may start without a bootstrap refresh token.
pub(super) fn build_token(
    raw: RawToken,
    t: &Table<'_>,
    authorizable: bool,
) -> Result<TokenConfig, ConfigError> {
    // Values first, each on its own; then the rules between them, for the
    // values that are valid.
    let mut p = Problems::default();
    let url = p.take(
        t.required("url", raw.url, TOKEN_URL_HINT)
            .and_then(|u| t.url("url", &u, TOKEN_URL_HINT)),
    );
    let grants = [
        ("client_credentials", GrantKind::ClientCredentials),
        ("password", GrantKind::Password),
        ("refresh_token", GrantKind::RefreshToken),
    ];
    let grant_kind = p.take(t.choice(
        "grant",
        raw.grant,
        Some(GrantKind::ClientCredentials),
        &grants,
    ));
    let client_id = p.take(t.non_empty("client_id", raw.client_id));
    let secret_name = if raw.client_secret_file.is_some() {
        "client_secret_file"
    } else {
        "client_secret"
    };
    let client_secret =
        p.take(t.secret("client_secret", raw.client_secret, raw.client_secret_file));
    let auths = [
        ("basic", ClientAuth::Basic),
        ("body", ClientAuth::Body),
        ("both", ClientAuth::Both),
        ("none", ClientAuth::None),
        ("private_key_jwt", ClientAuth::PrivateKeyJwt),
        ("client_secret_jwt", ClientAuth::ClientSecretJwt),
        ("tls_client_auth", ClientAuth::TlsClientAuth),
        ("client_assertion", ClientAuth::ClientAssertion),
    ];
    let client_auth = p.take(t.choice(
        "client_auth",
        raw.client_auth,
        Some(ClientAuth::Basic),
        &auths,
    ));
    let bodies = [("form", BodyFormat::Form), ("json", BodyFormat::Json)];
    let body = p.take(t.choice("body", raw.body, Some(BodyFormat::Form), &bodies));
    let scope = p.take(t.non_empty("scope", raw.scope));
    let username = p.take(t.non_empty("username", raw.username));
    let password_name = if raw.password_file.is_some() {
        "password_file"
    } else {
        "password"
    };
    let password = p.take(t.secret("password", raw.password, raw.password_file));
    let refresh_token =
        p.take(t.secret("refresh_token", raw.refresh_token, raw.refresh_token_file));
    let refresh_url = p.take(
        raw.refresh_url
            .map(|r| t.url("refresh_url", &r, TOKEN_URL_HINT).map(|u| u.0))
            .transpose(),
    );
    let refresh_before = p.take(refresh_before(t, raw.refresh_before));
    let default_lifetime = p.take(t.opt_duration("default_lifetime", raw.default_lifetime, false));
    let refresh_token_lifetime =
        p.take(t.opt_duration("refresh_token_lifetime", raw.refresh_token_lifetime, false));
    let params = p.take(params(t, raw.params.unwrap_or_default()));
    let timeout = p.take(t.duration("timeout", raw.timeout, Duration::from_secs(10)));
    let tls = p.take(build_tls(raw.tls, &Table::new(t.x, t.key("tls"))));
    let headers = p.take(quirk::build_headers(
        t,
        raw.headers.unwrap_or_default(),
        client_auth,
    ));
    let response = p.take(quirk::build_response(
        &Table::new(t.x, t.key("response")),
        raw.response.unwrap_or_default(),
    ));
    let errors = p.take(quirk::build_error_rules(t, raw.errors.unwrap_or_default()));

    let grant = match (grant_kind, username, password, &refresh_token) {
        (Some(kind), Some(username), Some(password), Some(refresh_token)) => p.take(grant(
            t,
            kind,
            username,
            password,
            refresh_token.is_some(),
            authorizable,
            password_name,
        )),
        _ => None,
    };
    let mut assertion = None;
    if let (Some(client_auth), Some(client_id), Some(client_secret)) =
        (client_auth, &client_id, &client_secret)
    {
        p.take(check_client_auth(
            t,
            client_auth,
            client_id.is_some(),
            client_secret.is_some(),
            secret_name,
        ));
        assertion = p.take(assertion::build_assertion(
            t,
            assertion::RawAssertion {
                signing_key_file: raw.signing_key_file,
                signing_alg: raw.signing_alg,
                key_id: raw.key_id,
                certificate_file: raw.certificate_file,
                assertion_audience: raw.assertion_audience,
                client_assertion_file: raw.client_assertion_file,
                client_assertion_type: raw.client_assertion_type,
            },
            client_auth,
            client_secret.as_ref(),
        ));
        if let (Some(Some(_)), Some(params)) = (&assertion, &params) {
            if let Some((name, _)) = params
                .iter()
                .find(|(k, _)| k == "client_assertion" || k == "client_assertion_type")
            {
                let problem = format!(
                    "{name} is set by tokenproxy when client_auth = \"{}\"",
                    client_auth.as_str()
                );
                p.take::<()>(Err(t
                    .err(&format!("params.{name}"), problem)
                    .with_hint("remove it from params")));
            }
        }
    }
    let (
        Some((url, _, _)),
        Some(grant),
        Some(client_id),
        Some(client_secret),
        Some(client_auth),
        Some(assertion),
        Some(body),
        Some(scope),
        Some(refresh_token),
        Some(refresh_url),
        Some(refresh_before),
        Some(default_lifetime),
        Some(refresh_token_lifetime),
        Some(params),
        Some(timeout),
        Some(tls),
        Some(headers),
        Some(response),
        Some(errors),
    ) = (
        url,
        grant,
        client_id,
        client_secret,
        client_auth,
        assertion,
        body,
        scope,
        refresh_token,
        refresh_url,
        refresh_before,
        default_lifetime,
        refresh_token_lifetime,
        params,
        timeout,
        tls,
        headers,
        response,
        errors,
    )
    else {
        return Err(p.into_error());
    };
    p.finish()?;
    let token = TokenConfig {
        url,
        grant,
        client_id,
        client_secret,
        client_auth,
        assertion,
        body,
        scope,
        refresh_token,
        refresh_url,
        refresh_before,
        default_lifetime,
        refresh_token_lifetime,
        params,
        timeout,
        tls,
        headers,
        response,
        errors,
    };
    assertion::check_tls_client_auth(t, &token)?;
    Ok(token)
}

/// The grant and the credentials it needs: the password grant needs a user
/// and a password, which no other grant uses; the refresh grant a bootstrap
/// refresh token unless a person can authorize.
fn grant(
    t: &Table<'_>,
    kind: GrantKind,
    username: Option<String>,
    password: Option<Secret>,
    has_refresh_token: bool,
    authorizable: bool,
    password_name: &str,
) -> Result<Grant, ConfigError> {
    let grant_name = match kind {
        GrantKind::ClientCredentials => "client_credentials",
        GrantKind::Password => "password",
        GrantKind::RefreshToken => "refresh_token",
    };
    let needs = |k: &str, hint: &str| {
        t.err(k, format!("is required when grant = \"{grant_name}\""))
            .with_hint(hint)
    };
    let has_username = username.is_some();
    match (kind, username, password) {
        (GrantKind::Password, Some(username), Some(password)) => {
            Ok(Grant::Password { username, password })
        }
        (GrantKind::Password, None, _) => Err(needs(
            "username",
            "set username, and password or password_file",
        )),
        (GrantKind::Password, Some(_), None) => {
            Err(needs("password", "set password or password_file"))
        }
        (_, Some(_), _) | (_, None, Some(_)) => {
            let stray = if has_username {
                "username"
            } else {
                password_name
            };
            let problem = format!("is only used with grant = \"password\", not \"{grant_name}\"");
            let hint = "remove it, or set grant = \"password\"";
            Err(t.err(stray, problem).with_hint(hint))
        }
        (GrantKind::RefreshToken, None, None) if !has_refresh_token && !authorizable => {
            let hint = "set refresh_token or refresh_token_file to a bootstrap refresh token, or add an [authorize] table and run tokenproxy authorize";
            Err(needs("refresh_token", hint))
        }
        (GrantKind::RefreshToken, None, None) => Ok(Grant::RefreshToken),
        (GrantKind::ClientCredentials, None, None) => Ok(Grant::ClientCredentials),
    }
}

/// A client_auth that sends credentials needs them; one that sends none has none.
fn check_client_auth(
    t: &Table<'_>,
    client_auth: ClientAuth,
    has_client_id: bool,
    has_client_secret: bool,
    secret_name: &str,
) -> Result<(), ConfigError> {
    let sends = matches!(
        client_auth,
        ClientAuth::Basic | ClientAuth::Body | ClientAuth::Both
    );
    let problem = format!(
        "is required when client_auth = \"{}\"",
        client_auth.as_str()
    );
    if sends && !has_client_id {
        let hint =
            "set client_id, or client_auth = \"none\" for a provider without client authentication";
        return Err(t.err("client_id", problem).with_hint(hint));
    }
    if sends && !has_client_secret {
        let hint = "set client_secret or client_secret_file, or client_auth = \"none\" if the provider authenticates no client";
        return Err(t.err("client_secret", problem).with_hint(hint));
    }
    if matches!(
        client_auth,
        ClientAuth::PrivateKeyJwt | ClientAuth::ClientSecretJwt | ClientAuth::TlsClientAuth
    ) && !has_client_id
    {
        let hint = if client_auth == ClientAuth::TlsClientAuth {
            "set client_id: the provider finds the client's registered certificate by it"
        } else {
            "set client_id: it is the iss and sub of every assertion"
        };
        return Err(t.err("client_id", problem).with_hint(hint));
    }
    if matches!(
        client_auth,
        ClientAuth::PrivateKeyJwt | ClientAuth::TlsClientAuth | ClientAuth::ClientAssertion
    ) && has_client_secret
    {
        let problem = format!(
            "is set but client_auth = \"{}\" never sends it",
            client_auth.as_str()
        );
        let hint = "remove the secret, or use client_auth = \"client_secret_jwt\" to sign assertions with it";
        return Err(t.err(secret_name, problem).with_hint(hint));
    }
    if client_auth == ClientAuth::None && has_client_secret {
        let hint = "use client_auth = \"basic\" or \"body\", or remove the secret";
        return Err(t
            .err(
                secret_name,
                "is set but client_auth = \"none\" never sends it",
            )
            .with_hint(hint));
    }
    Ok(())
}

/// `refresh_before`: a zero margin would start every refresh only once the
/// token has expired, so requests would wait or fail at each expiry.
fn refresh_before(t: &Table<'_>, raw: Option<Scalar>) -> Result<Option<Duration>, ConfigError> {
    let margin = t.opt_duration("refresh_before", raw, true)?;
    if margin.is_some_and(|d| d.is_zero()) {
        let problem = "is zero: each refresh would start only once the token has expired";
        let hint =
            "remove it to refresh min(60s, 10% of the lifetime) ahead, or write it like \"30s\"";
        return Err(t.err("refresh_before", problem).with_hint(hint));
    }
    Ok(margin)
}

pub(super) fn params(
    t: &Table<'_>,
    raw: BTreeMap<String, String>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        let key = format!("params.{name}");
        if name.is_empty() {
            return Err(t
                .err(&key, "a parameter name is empty")
                .with_hint("remove it"));
        }
        if RESERVED_PARAMS.contains(&name.as_str()) {
            let own = if name == "grant_type" {
                "grant"
            } else {
                name.as_str()
            };
            let hint = format!("use the {own} key of [{}] instead", t.key(""));
            let problem = format!("{name} is set by tokenproxy and cannot be overridden");
            return Err(t.err(&key, problem).with_hint(hint));
        }
        let value = t.string(&key, &value)?;
        out.push((name, value));
    }
    Ok(out)
}
