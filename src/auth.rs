//! Identity: verifying a browser's JWT ([`Verifier`]) into an [`Identity`] — who it is, until
//! when, and which desks it may read, write and ask ([`Rights`]).
//!
//! The algorithm is never taken from the token alone: an HS256 token is checked only against
//! the configured secret, an RS256/ES256 token only against the configured public key of that
//! type, and `alg: none` is refused outright. That closes both classic JWT holes (unsigned
//! tokens, and HMAC tokens "signed" with a public key). There is no leeway on `exp`: a session
//! ends at its token's expiry, to the second.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{AuthConfig, JwtConfig, Secret};

/// One thing a token may allow on a desk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Right {
    /// Receive the desk's events.
    Subscribe,
    /// Publish to the desk.
    Publish,
    /// Send requests on the desk.
    Request,
}

impl Right {
    fn bit(self) -> u8 {
        match self {
            Right::Subscribe => 1,
            Right::Publish => 2,
            Right::Request => 4,
        }
    }

    /// The right a claim names, if this bridge knows it.
    pub fn parse(name: &str) -> Option<Right> {
        match name {
            "subscribe" => Some(Right::Subscribe),
            "publish" => Some(Right::Publish),
            "request" => Some(Right::Request),
            _ => None,
        }
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Right::Subscribe => "subscribe",
            Right::Publish => "publish",
            Right::Request => "request",
        }
    }
}

/// What a token allows, per desk; `*` in the `desks` claim stands for every configured desk.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rights {
    every_desk: u8,
    desks: HashMap<String, u8>,
}

impl Rights {
    /// Rights from the `desks` claim (desk or `*` → rights).
    pub fn from_claim(claim: &HashMap<String, Vec<Right>>) -> Rights {
        let mut rights = Rights::default();
        for (desk, granted) in claim {
            let bits = granted.iter().fold(0, |bits, right| bits | right.bit());
            if desk == "*" {
                rights.every_desk |= bits;
            } else {
                *rights.desks.entry(desk.clone()).or_default() |= bits;
            }
        }
        rights
    }

    /// True when `right` is granted on `desk`.
    pub fn allows(&self, desk: &str, right: Right) -> bool {
        let bits = self.every_desk | self.desks.get(desk).copied().unwrap_or(0);
        bits & right.bit() != 0
    }
}

/// A verified token.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// The `sub` claim.
    pub user: Arc<str>,
    /// What the `desks` claim allows.
    pub rights: Rights,
    /// The `exp` claim, Unix seconds.
    pub expires_at: u64,
}

impl Identity {
    /// Time left until `exp` (zero once passed).
    pub fn remaining(&self) -> Duration {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Duration::from_secs(self.expires_at).saturating_sub(now)
    }
}

/// The claims of a token deskbridge makes (`deskbridge token`).
#[derive(Debug, Serialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Desk → rights.
    pub desks: HashMap<String, Vec<Right>>,
    /// Issuer, when the deployment checks one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Audience, when the deployment checks one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// The claims deskbridge reads from a token; `iss`, `aud` (a string or a list), `nbf` are
/// checked by jsonwebtoken, everything else is ignored.
#[derive(Debug, Deserialize)]
struct Received {
    sub: String,
    exp: u64,
    /// Desk → right names; names this bridge does not know grant nothing (a newer issuer may
    /// know more rights than this bridge).
    #[serde(default)]
    desks: HashMap<String, Vec<String>>,
}

/// Why a token was refused; [`AuthError::reason`] is its metrics label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token, or an empty one.
    #[error("no token: send one as ?token= or in an auth frame")]
    Missing,
    /// Not a JWT at all (shape, base64, JSON).
    #[error("the token is not a well-formed JWT: {0}")]
    Malformed(String),
    /// `alg: none`, or an algorithm no configured key is for.
    #[error("the token's algorithm {0} is not accepted here")]
    Algorithm(String),
    /// The signature does not verify with the configured key.
    #[error("the token's signature does not verify")]
    BadSignature,
    /// `exp` has passed.
    #[error("the token has expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    /// `iss` is missing or not the configured issuer.
    #[error("the token's issuer (iss) is missing or not the one this bridge accepts")]
    WrongIssuer,
    /// `aud` is missing or not the configured audience.
    #[error("the token's audience (aud) is missing or not this bridge")]
    WrongAudience,
    /// A required claim is missing or ill-typed (`sub`, `exp`, `desks`).
    #[error("the token's claims are not usable: {0}")]
    Claims(String),
    /// No `auth` frame came within `auth.timeout_ms`.
    #[error("no auth frame within auth.timeout_ms")]
    Timeout,
    /// A `refresh` carried another user's token.
    #[error("a refresh must carry a token for the same user (sub)")]
    OtherUser,
    /// The header lists `crit` extensions; this bridge understands none (RFC 7515 §4.1.11).
    #[error("the token's header has `crit` extensions, which this bridge does not understand")]
    Critical,
}

impl AuthError {
    /// Label value for `deskbridge_auth_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed(_) => "malformed",
            AuthError::Algorithm(_) => "algorithm",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::WrongIssuer => "wrong_issuer",
            AuthError::WrongAudience => "wrong_audience",
            AuthError::Claims(_) => "claims",
            AuthError::Timeout => "timeout",
            AuthError::OtherUser => "other_user",
            AuthError::Critical => "critical",
        }
    }

    /// Every reason, for metrics that exist from start-up.
    pub const REASONS: [&'static str; 12] = [
        "missing",
        "malformed",
        "algorithm",
        "bad_signature",
        "expired",
        "not_yet_valid",
        "wrong_issuer",
        "wrong_audience",
        "claims",
        "timeout",
        "other_user",
        "critical",
    ];
}

/// Why the configured keys cannot be used; names the config key to fix.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key file could not be read.
    #[error("config key `{key}`: cannot read {path}: {source}")]
    Read {
        /// The config key.
        key: &'static str,
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A public key file holds neither an RSA nor an EC (P-256) public key in PEM.
    #[error("config key `auth.jwt.public_key_file`: {0} holds no RSA or P-256 EC public key in PEM")]
    PublicKey(String),
    /// An empty HS256 secret.
    #[error("the HS256 secret (auth.jwt.hs256_secret_file or DESKBRIDGE_JWT_SECRET) is empty")]
    EmptySecret,
    /// `auth.mode = "jwt"` without any key.
    #[error("config key `auth.jwt`: auth.mode = \"jwt\" needs hs256_secret_file, DESKBRIDGE_JWT_SECRET or public_key_file")]
    NoKey,
}

/// A key and the one algorithm it verifies.
struct Key {
    algorithm: Algorithm,
    key: DecodingKey,
    validation: Validation,
}

/// Verifies tokens against the configured keys and claims rules.
pub struct Verifier {
    keys: Vec<Key>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let algorithms: Vec<Algorithm> = self.keys.iter().map(|k| k.algorithm).collect();
        f.debug_struct("Verifier")
            .field("algorithms", &algorithms)
            .finish()
    }
}

impl Verifier {
    /// The verifier for `auth.mode = "jwt"`, or `None` when auth is off.
    pub fn from_config(auth: &AuthConfig) -> Result<Option<Verifier>, KeyError> {
        if auth.mode != crate::config::AuthMode::Jwt {
            return Ok(None);
        }
        let jwt = &auth.jwt;
        let mut keys = Vec::new();
        if let Some(secret) = hs256_secret(jwt)? {
            keys.push((
                Algorithm::HS256,
                DecodingKey::from_secret(secret.expose().as_bytes()),
            ));
        }
        if let Some(path) = &jwt.public_key_file {
            let pem = read("auth.jwt.public_key_file", path)?;
            let public = match DecodingKey::from_rsa_pem(&pem) {
                Ok(key) => (Algorithm::RS256, key),
                Err(_) => DecodingKey::from_ec_pem(&pem)
                    .map(|key| (Algorithm::ES256, key))
                    .map_err(|_| KeyError::PublicKey(path.display().to_string()))?,
            };
            keys.push(public);
        }
        if keys.is_empty() {
            return Err(KeyError::NoKey);
        }
        let keys = keys
            .into_iter()
            .map(|(algorithm, key)| Key {
                algorithm,
                key,
                validation: validation(algorithm, jwt),
            })
            .collect();
        Ok(Some(Verifier { keys }))
    }

    /// Checks a token: signature with the key for its algorithm, expiry, not-before, issuer and
    /// audience (when configured), and the claims deskbridge needs.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let algorithm = header_algorithm(token)?;
        let key = self
            .keys
            .iter()
            .find(|key| {
                algorithm
                    .parse::<Algorithm>()
                    .is_ok_and(|alg| alg == key.algorithm)
            })
            .ok_or(AuthError::Algorithm(algorithm))?;
        let data = jsonwebtoken::decode::<Received>(token, &key.key, &key.validation).map_err(classify)?;
        let claims = data.claims;
        if claims.sub.is_empty() {
            return Err(AuthError::Claims("`sub` is empty".into()));
        }
        let desks = claims
            .desks
            .iter()
            .map(|(desk, names)| {
                (
                    desk.clone(),
                    names.iter().filter_map(|name| Right::parse(name)).collect(),
                )
            })
            .collect();
        Ok(Identity {
            user: claims.sub.into(),
            rights: Rights::from_claim(&desks),
            expires_at: claims.exp,
        })
    }
}

fn validation(algorithm: Algorithm, jwt: &JwtConfig) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.leeway = 0;
    validation.validate_nbf = true;
    let mut required = vec!["exp", "sub"];
    if let Some(issuer) = &jwt.issuer {
        validation.set_issuer(&[issuer]);
        required.push("iss");
    }
    match &jwt.audience {
        Some(audience) => {
            validation.set_audience(&[audience]);
            required.push("aud");
        }
        None => validation.validate_aud = false,
    }
    validation.set_required_spec_claims(&required);
    validation
}

/// The `alg` a token's header names, read without trusting anything else in it; a header with
/// `crit` is refused, since a recipient must understand every extension listed there.
fn header_algorithm(token: &str) -> Result<String, AuthError> {
    #[derive(Deserialize)]
    struct Alg {
        alg: String,
        crit: Option<serde::de::IgnoredAny>,
    }
    let header = token
        .split('.')
        .next()
        .ok_or_else(|| AuthError::Malformed("no header".into()))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .map_err(|e| AuthError::Malformed(format!("header is not base64url: {e}")))?;
    let header = serde_json::from_slice::<Alg>(&bytes)
        .map_err(|e| AuthError::Malformed(format!("header is not a JWT header: {e}")))?;
    match header.crit {
        Some(_) => Err(AuthError::Critical),
        None => Ok(header.alg),
    }
}

fn classify(error: jsonwebtoken::errors::Error) -> AuthError {
    match error.into_kind() {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::MissingRequiredClaim(claim) if claim == "iss" => AuthError::WrongIssuer,
        ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => AuthError::WrongAudience,
        ErrorKind::MissingRequiredClaim(claim) => AuthError::Claims(format!("`{claim}` is missing")),
        ErrorKind::InvalidClaimFormat(claim) => AuthError::Claims(format!("`{claim}` has the wrong type")),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName | ErrorKind::UnsupportedAlgorithm => {
            AuthError::Algorithm("(mismatched)".into())
        }
        ErrorKind::Json(error) => AuthError::Claims(error.to_string()),
        other => AuthError::Malformed(format!("{other:?}")),
    }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| KeyError::Read {
        key,
        path: path.display().to_string(),
        source,
    })
}

/// The HS256 secret: `DESKBRIDGE_JWT_SECRET` (already in the config) or the secret file.
fn hs256_secret(jwt: &JwtConfig) -> Result<Option<Secret>, KeyError> {
    let secret = match (&jwt.hs256_secret, &jwt.hs256_secret_file) {
        (Some(secret), _) => secret.clone(),
        (None, Some(path)) => {
            let bytes = read("auth.jwt.hs256_secret_file", path)?;
            // A trailing newline from `echo secret > file` is not part of the secret.
            Secret::new(
                String::from_utf8_lossy(&bytes)
                    .trim_end_matches(['\n', '\r'])
                    .to_owned(),
            )
        }
        (None, None) => return Ok(None),
    };
    if secret.expose().is_empty() {
        return Err(KeyError::EmptySecret);
    }
    Ok(Some(secret))
}

/// Makes an HS256 token (development and tests: `deskbridge token`).
pub fn mint_hs256(jwt: &JwtConfig, claims: &Claims) -> Result<String, KeyError> {
    let secret = hs256_secret(jwt)?.ok_or(KeyError::NoKey)?;
    let key = EncodingKey::from_secret(secret.expose().as_bytes());
    // Encoding a struct of strings and numbers with a valid secret cannot fail.
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key).map_err(|_| KeyError::EmptySecret)
}

/// Parses `DESK:right,right` (`*` for every desk), as `deskbridge token --desk` takes it.
pub fn parse_desk_grant(text: &str) -> Result<(String, Vec<Right>), String> {
    let (desk, rights) = text
        .split_once(':')
        .ok_or_else(|| format!("`{text}`: expected DESK:right[,right...], e.g. A:subscribe,publish"))?;
    let rights = rights
        .split(',')
        .map(|right| {
            Right::parse(right.trim())
                .ok_or_else(|| format!("`{right}` is not a right: subscribe, publish or request"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((desk.to_owned(), rights))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AuthMode;

    fn jwt_config(secret: &str) -> AuthConfig {
        let mut auth = AuthConfig {
            mode: AuthMode::Jwt,
            ..AuthConfig::default()
        };
        auth.jwt.hs256_secret = Some(Secret::new(secret.into()));
        auth
    }

    fn claims(sub: &str, exp_in: i64) -> Claims {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()) as i64;
        Claims {
            sub: sub.into(),
            exp: (now + exp_in) as u64,
            desks: HashMap::from([("A".into(), vec![Right::Subscribe, Right::Publish])]),
            iss: None,
            aud: None,
        }
    }

    #[test]
    fn rights_come_from_the_desks_claim() {
        let claim = HashMap::from([
            ("A".to_string(), vec![Right::Subscribe]),
            ("*".to_string(), vec![Right::Request]),
        ]);
        let rights = Rights::from_claim(&claim);
        let cases = [
            ("A", Right::Subscribe, true),
            ("A", Right::Publish, false),
            ("A", Right::Request, true),
            ("B", Right::Request, true),
            ("B", Right::Subscribe, false),
        ];
        for (desk, right, allowed) in cases {
            assert_eq!(rights.allows(desk, right), allowed, "{desk} {right:?}");
        }
    }

    #[test]
    fn a_minted_token_verifies_and_a_tampered_one_does_not() {
        let auth = jwt_config("s3cret");
        let verifier = Verifier::from_config(&auth).expect("keys").expect("jwt on");
        let token = mint_hs256(&auth.jwt, &claims("alice", 300)).expect("mint");
        let identity = verifier.verify(&token).expect("valid");
        assert_eq!(&*identity.user, "alice");
        assert!(identity.rights.allows("A", Right::Publish));
        let other = mint_hs256(&jwt_config("other").jwt, &claims("alice", 300)).expect("mint");
        assert_eq!(verifier.verify(&other), Err(AuthError::BadSignature));
        let expired = mint_hs256(&auth.jwt, &claims("alice", -5)).expect("mint");
        assert_eq!(verifier.verify(&expired), Err(AuthError::Expired));
    }

    #[test]
    fn audience_lists_and_unknown_rights_are_read_like_identity_providers_write_them() {
        let mut auth = jwt_config("s3cret");
        auth.jwt.audience = Some("deskbridge".into());
        let verifier = Verifier::from_config(&auth).expect("keys").expect("jwt on");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let claims = serde_json::json!({
            "sub": "alice", "exp": now + 300, "aud": ["account", "deskbridge"],
            "desks": {"A": ["subscribe", "teleport"]},
        });
        let key = EncodingKey::from_secret(b"s3cret");
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).expect("sign");
        let identity = verifier
            .verify(&token)
            .expect("an aud list naming us is accepted");
        assert!(identity.rights.allows("A", Right::Subscribe));
        assert!(
            !identity.rights.allows("A", Right::Publish),
            "an unknown right grants nothing"
        );
        let far = serde_json::json!({"sub": "a", "exp": u64::MAX, "aud": "deskbridge"});
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &far, &key).expect("sign");
        assert!(
            verifier.verify(&token).is_ok(),
            "a far exp is a valid token (capped by the session)"
        );
    }

    #[test]
    fn desk_grants_parse_from_the_command_line() {
        assert_eq!(
            parse_desk_grant("A:subscribe,publish"),
            Ok(("A".into(), vec![Right::Subscribe, Right::Publish]))
        );
        assert!(parse_desk_grant("A").is_err());
        assert!(parse_desk_grant("A:fly").is_err());
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1000))]

            #[test]
            fn any_text_is_a_clear_refusal_never_a_panic(token in "\\PC{0,200}") {
                let verifier = Verifier::from_config(&jwt_config("k")).expect("keys").expect("on");
                if let Err(error) = verifier.verify(&token) {
                    prop_assert!(!error.to_string().is_empty());
                }
            }

            #[test]
            fn jwt_shaped_garbage_is_refused(
                header in "[A-Za-z0-9_-]{0,40}",
                payload in "[A-Za-z0-9_-]{0,80}",
                signature in "[A-Za-z0-9_-]{0,60}",
            ) {
                let verifier = Verifier::from_config(&jwt_config("k")).expect("keys").expect("on");
                let token = format!("{header}.{payload}.{signature}");
                prop_assert!(verifier.verify(&token).is_err());
            }
        }
    }
}
