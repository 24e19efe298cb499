//! One token checked: its signature against the configured keys, then
//! `exp`, `nbf`, `iss` and `aud` (with `--token-leeway` for clock skew),
//! then the claims that say what the connection may do. Every refusal
//! says why, and has a short label for `/metrics`.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::keys::TokenKeys;
use crate::app::channels::name::validate_pattern;

/// The checks every token passes, whoever signed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenRules {
    /// `--token-issuer`: the `iss` a token must carry (any, when unset).
    pub issuer: Option<String>,
    /// `--token-audience`: the `aud` a token must name (any, when unset).
    pub audience: Option<String>,
    /// `--token-leeway`, in seconds: how far past `exp`, or before `nbf`,
    /// a token is still taken.
    pub leeway_secs: u64,
}

/// What a valid token lets its connection do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// `sub`: who the connection is (its chat nick).
    pub sub: Option<String>,
    /// `channels`: the patterns it may subscribe to (`None`: any).
    pub subscribe: Option<Vec<String>>,
    /// `publish`: the patterns it may publish to (`None`: as it could
    /// without the token).
    pub publish: Option<Vec<String>>,
    /// Signed by a `--publisher-public-key`: a trusted publisher.
    pub publisher: bool,
    /// When the token stops being honoured, in Unix seconds: its `exp`
    /// plus the leeway.
    pub expires_at: u64,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// `--require-token` and none was sent.
    Missing,
    /// Not a JWT, or a claim of the wrong type.
    Malformed,
    /// An algorithm this server does not take, or no key of it.
    Algorithm,
    /// No configured key has the token's `kid`.
    UnknownKey,
    Signature,
    Expired,
    NotYetValid,
    Issuer,
    Audience,
    /// A claim the rules require is absent (`exp`, or a configured `iss`
    /// or `aud`).
    MissingClaim,
    /// `channels` or `publish` is not a list of channel patterns.
    InvalidClaim,
    /// A fresh token for another `sub` than the connection's.
    OtherSubject,
}

impl RefusalKind {
    /// The `reason` label of `fanout_token_refusals_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::Algorithm => "algorithm",
            Self::UnknownKey => "unknown_key",
            Self::Signature => "signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Issuer => "issuer",
            Self::Audience => "audience",
            Self::MissingClaim => "missing_claim",
            Self::InvalidClaim => "invalid_claim",
            Self::OtherSubject => "other_subject",
        }
    }

    pub const ALL: [RefusalKind; 12] = [
        Self::Missing,
        Self::Malformed,
        Self::Algorithm,
        Self::UnknownKey,
        Self::Signature,
        Self::Expired,
        Self::NotYetValid,
        Self::Issuer,
        Self::Audience,
        Self::MissingClaim,
        Self::InvalidClaim,
        Self::OtherSubject,
    ];
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    pub message: String,
}

impl Refusal {
    pub fn new(kind: RefusalKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// The keys and the rules: what [`TokenVerifier::verify`] needs.
#[derive(Debug, Default)]
pub struct TokenVerifier {
    pub keys: TokenKeys,
    pub rules: TokenRules,
}

/// A key a token may verify with, and whether it makes a publisher.
struct Candidate<'a> {
    key: &'a DecodingKey,
    publisher: bool,
}

impl TokenVerifier {
    pub fn new(keys: TokenKeys, rules: TokenRules) -> Self {
        Self { keys, rules }
    }

    /// Whether any key is configured: without one, every token is refused.
    pub fn accepts_tokens(&self) -> bool {
        !self.keys.is_empty()
    }

    pub fn verify(&self, token: &str) -> Result<Grant, Refusal> {
        if !self.accepts_tokens() {
            return Err(Refusal::new(
                RefusalKind::Algorithm,
                "this server accepts no tokens (no --token-secret-file, --token-jwks-file or \
                 --publisher-public-key)",
            ));
        }
        let header = decode_header(token).map_err(|e| {
            Refusal::new(
                RefusalKind::Malformed,
                format!("not a JWT (header.payload.signature in base64url): {e}"),
            )
        })?;
        let candidates = self.candidates(header.alg, header.kid.as_deref())?;
        let validation = self.validation(header.alg);
        let mut last_error = None;
        for candidate in candidates {
            match decode::<Map<String, Value>>(token, candidate.key, &validation) {
                Ok(data) => return self.grant(&data.claims, candidate.publisher),
                // Not this key: try the next one.
                Err(e) if is_key_mismatch(e.kind()) => last_error = Some(e),
                Err(e) => return Err(refusal(e.kind())),
            }
        }
        Err(match last_error {
            Some(e) if !matches!(e.kind(), ErrorKind::InvalidSignature) => refusal(e.kind()),
            _ => Refusal::new(
                RefusalKind::Signature,
                format!(
                    "the {:?} signature does not verify with any configured key",
                    header.alg
                ),
            ),
        })
    }

    /// The keys a token with this `alg` and `kid` may be signed with.
    fn candidates(&self, alg: Algorithm, kid: Option<&str>) -> Result<Vec<Candidate<'_>>, Refusal> {
        let keys = &self.keys;
        let mut found = Vec::new();
        match alg {
            Algorithm::HS256 => match &keys.secret {
                Some(key) => found.push(Candidate {
                    key,
                    publisher: false,
                }),
                None => {
                    return Err(Refusal::new(
                        RefusalKind::Algorithm,
                        "HS256 tokens are not accepted here (no --token-secret-file)",
                    ))
                }
            },
            Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA => {
                if alg == Algorithm::EdDSA {
                    found.extend(keys.publishers.iter().map(|k| Candidate {
                        key: &k.key,
                        publisher: true,
                    }));
                }
                let of_alg = keys.provider.iter().filter(|k| k.alg == alg);
                // A `kid` picks the provider's key; without one, each of
                // the algorithm's keys is tried.
                found.extend(
                    of_alg
                        .filter(|k| kid.is_none() || k.kid.as_deref() == kid)
                        .map(|k| Candidate {
                            key: &k.key,
                            publisher: false,
                        }),
                );
                if found.is_empty() {
                    let why = match kid {
                        Some(kid) if keys.provider.iter().any(|k| k.alg == alg) => {
                            return Err(Refusal::new(
                                RefusalKind::UnknownKey,
                                format!("no {alg:?} key with kid `{kid}` in --token-jwks-file"),
                            ))
                        }
                        _ => format!("no {alg:?} key is configured"),
                    };
                    return Err(Refusal::new(RefusalKind::Algorithm, why));
                }
            }
            other => {
                return Err(Refusal::new(
                    RefusalKind::Algorithm,
                    format!("algorithm {other:?} is not accepted (HS256, RS256, ES256 or EdDSA)"),
                ))
            }
        }
        Ok(found)
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let rules = &self.rules;
        let mut validation = Validation::new(alg);
        validation.leeway = rules.leeway_secs;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        if let Some(issuer) = &rules.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &rules.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            // Without an audience to check, a token that names one is
            // taken like any other.
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        validation
    }

    /// The claims that say what the connection may do, checked.
    fn grant(&self, claims: &Map<String, Value>, publisher: bool) -> Result<Grant, Refusal> {
        let sub = match claims.get("sub") {
            None | Some(Value::Null) => None,
            Some(Value::String(sub)) => Some(sub.clone()),
            Some(_) => return Err(invalid_claim("sub", "a string")),
        };
        // `exp` was required and checked to be a number by the validation.
        let exp = claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or_else(|| invalid_claim("exp", "a whole number of seconds"))?;
        Ok(Grant {
            sub,
            subscribe: patterns(claims, "channels")?,
            publish: patterns(claims, "publish")?,
            publisher,
            expires_at: exp.saturating_add(self.rules.leeway_secs),
        })
    }
}

/// `channels` or `publish`: absent, or a list of channel patterns.
fn patterns(claims: &Map<String, Value>, claim: &str) -> Result<Option<Vec<String>>, Refusal> {
    let expected = "a list of channel names or patterns (like `trades.*`)";
    match claims.get(claim) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(p) if validate_pattern(claim, p).is_ok() => Ok(p.clone()),
                _ => Err(invalid_claim(claim, expected)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(invalid_claim(claim, expected)),
    }
}

fn invalid_claim(claim: &str, expected: &str) -> Refusal {
    Refusal::new(
        RefusalKind::InvalidClaim,
        format!("claim `{claim}` must be {expected}"),
    )
}

/// A key of the right algorithm that is not the signer's: the signature
/// does not verify, or (RSA, EC) the key does not fit the signature.
fn is_key_mismatch(kind: &ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::InvalidSignature
            | ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidKeyFormat
            | ErrorKind::Crypto(_)
    )
}

fn refusal(kind: &ErrorKind) -> Refusal {
    use RefusalKind as R;
    let (kind, message) = match kind {
        ErrorKind::ExpiredSignature => (R::Expired, "token expired (`exp` is past)".to_owned()),
        ErrorKind::ImmatureSignature => (
            R::NotYetValid,
            "token not yet valid (`nbf` is in the future)".to_owned(),
        ),
        ErrorKind::InvalidIssuer => (
            R::Issuer,
            "claim `iss` is not the expected issuer".to_owned(),
        ),
        ErrorKind::InvalidAudience => (
            R::Audience,
            "claim `aud` does not name this server's audience".to_owned(),
        ),
        ErrorKind::MissingRequiredClaim(claim) => {
            (R::MissingClaim, format!("token has no `{claim}` claim"))
        }
        ErrorKind::InvalidSignature | ErrorKind::InvalidRsaKey(_) | ErrorKind::InvalidEcdsaKey => {
            (R::Signature, "signature does not verify".to_owned())
        }
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => (
            R::Algorithm,
            "the token's algorithm does not match its key".to_owned(),
        ),
        ErrorKind::Json(e) => (R::Malformed, format!("claims are not valid JSON: {e}")),
        other => (R::Malformed, format!("not a valid JWT: {other:?}")),
    };
    Refusal::new(kind, message)
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    use super::*;
    use crate::app::tokens::keys::{ProviderKey, PublisherKey};

    fn now() -> u64 {
        crate::app::unix_millis() / 1000
    }

    fn hs256(secret: &[u8], claims: Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn secret_verifier(rules: TokenRules) -> TokenVerifier {
        let keys = TokenKeys {
            secret: Some(DecodingKey::from_secret(b"sesame")),
            ..TokenKeys::default()
        };
        TokenVerifier::new(keys, rules)
    }

    fn kind(verifier: &TokenVerifier, token: &str) -> RefusalKind {
        verifier.verify(token).unwrap_err().kind
    }

    #[test]
    fn claims_become_the_grant() {
        let v = secret_verifier(TokenRules {
            leeway_secs: 5,
            ..TokenRules::default()
        });
        let exp = now() + 60;
        let token = hs256(
            b"sesame",
            json!({"sub":"ada","exp":exp,"channels":["news.*"],"publish":["chat.>"]}),
        );
        assert_eq!(
            v.verify(&token).unwrap(),
            Grant {
                sub: Some("ada".into()),
                subscribe: Some(vec!["news.*".into()]),
                publish: Some(vec!["chat.>".into()]),
                publisher: false,
                expires_at: exp + 5,
            }
        );
        let bare = hs256(b"sesame", json!({"exp":exp}));
        let grant = v.verify(&bare).unwrap();
        assert_eq!(
            (grant.sub, grant.subscribe, grant.publish),
            (None, None, None)
        );
    }

    #[test]
    fn each_refusal_says_why() {
        let v = secret_verifier(TokenRules {
            issuer: Some("https://sso.example".into()),
            audience: Some("fanout".into()),
            leeway_secs: 0,
        });
        let ok = json!({"iss":"https://sso.example","aud":"fanout","exp":now()+60});
        let with = |field: &str, value: Value| {
            let mut claims = ok.clone();
            claims[field] = value;
            hs256(b"sesame", claims)
        };
        let without = |field: &str| {
            let mut claims = ok.clone();
            claims.as_object_mut().unwrap().remove(field);
            hs256(b"sesame", claims)
        };
        assert!(v.verify(&hs256(b"sesame", ok.clone())).is_ok());
        assert_eq!(
            kind(&v, &hs256(b"other", ok.clone())),
            RefusalKind::Signature
        );
        assert_eq!(
            kind(&v, &with("exp", json!(now() - 10))),
            RefusalKind::Expired
        );
        assert_eq!(
            kind(&v, &with("nbf", json!(now() + 100))),
            RefusalKind::NotYetValid
        );
        assert_eq!(
            kind(&v, &with("iss", json!("https://evil"))),
            RefusalKind::Issuer
        );
        assert_eq!(
            kind(&v, &with("aud", json!("other"))),
            RefusalKind::Audience
        );
        assert_eq!(kind(&v, &without("exp")), RefusalKind::MissingClaim);
        assert!(v
            .verify(&without("iss"))
            .unwrap_err()
            .message
            .contains("`iss`"));
        assert_eq!(
            kind(&v, &with("channels", json!("news"))),
            RefusalKind::InvalidClaim
        );
        let bad_pattern = v.verify(&with("publish", json!(["a..b"]))).unwrap_err();
        assert!(
            bad_pattern.message.contains("`publish`"),
            "{}",
            bad_pattern.message
        );
        assert_eq!(kind(&v, "not.a.jwt"), RefusalKind::Malformed);
        assert_eq!(kind(&v, "nope"), RefusalKind::Malformed);
        let hs384 = encode(
            &Header::new(Algorithm::HS384),
            &ok,
            &EncodingKey::from_secret(b"sesame"),
        )
        .unwrap();
        assert_eq!(kind(&v, &hs384), RefusalKind::Algorithm);
    }

    #[test]
    fn leeway_covers_clock_skew() {
        let v = secret_verifier(TokenRules {
            leeway_secs: 30,
            ..TokenRules::default()
        });
        assert!(v.verify(&hs256(b"sesame", json!({"exp":now()-10}))).is_ok());
        assert!(v
            .verify(&hs256(b"sesame", json!({"exp":now()+60,"nbf":now()+10})))
            .is_ok());
        assert_eq!(
            kind(&v, &hs256(b"sesame", json!({"exp":now()-60}))),
            RefusalKind::Expired
        );
    }

    #[test]
    fn no_keys_refuses_every_token() {
        let v = TokenVerifier::default();
        let e = v
            .verify(&hs256(b"sesame", json!({"exp":now()+60})))
            .unwrap_err();
        assert!(e.message.contains("accepts no tokens"), "{}", e.message);
    }

    fn ed25519() -> (EncodingKey, DecodingKey) {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        (
            EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).unwrap(),
            DecodingKey::from_ed_pem(pair.public_key_pem().as_bytes()).unwrap(),
        )
    }

    fn eddsa(key: &EncodingKey, kid: Option<&str>, claims: Value) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = kid.map(str::to_owned);
        encode(&header, &claims, key).unwrap()
    }

    #[test]
    fn publisher_keys_make_publishers_and_provider_keys_do_not() {
        let (publisher_signer, publisher_key) = ed25519();
        let (provider_signer, provider_key) = ed25519();
        let (stranger, _) = ed25519();
        let keys = TokenKeys {
            provider: vec![ProviderKey {
                kid: Some("p1".into()),
                alg: Algorithm::EdDSA,
                key: provider_key,
            }],
            publishers: vec![PublisherKey {
                file: "pub.pem".into(),
                key: publisher_key,
            }],
            ..TokenKeys::default()
        };
        let v = TokenVerifier::new(keys, TokenRules::default());
        let claims = json!({"sub":"feed","exp":now()+60});
        assert!(
            v.verify(&eddsa(&publisher_signer, None, claims.clone()))
                .unwrap()
                .publisher
        );
        let from_provider = v.verify(&eddsa(&provider_signer, Some("p1"), claims.clone()));
        assert!(!from_provider.unwrap().publisher);
        assert!(
            !v.verify(&eddsa(&provider_signer, None, claims.clone()))
                .unwrap()
                .publisher
        );
        assert_eq!(
            kind(&v, &eddsa(&stranger, None, claims.clone())),
            RefusalKind::Signature
        );
        assert_eq!(
            kind(&v, &eddsa(&provider_signer, Some("p2"), claims.clone())),
            RefusalKind::Signature,
            "an unknown kid still has the publisher keys to try"
        );
        let rs256 = TokenVerifier::new(
            TokenKeys {
                provider: vec![],
                publishers: vec![],
                secret: Some(DecodingKey::from_secret(b"x")),
            },
            TokenRules::default(),
        );
        assert_eq!(
            kind(&rs256, &eddsa(&provider_signer, None, claims)),
            RefusalKind::Algorithm
        );
    }

    #[test]
    fn an_unknown_kid_is_named() {
        let (signer, key) = ed25519();
        let keys = TokenKeys {
            provider: vec![ProviderKey {
                kid: Some("p1".into()),
                alg: Algorithm::EdDSA,
                key,
            }],
            ..TokenKeys::default()
        };
        let v = TokenVerifier::new(keys, TokenRules::default());
        let e = v
            .verify(&eddsa(&signer, Some("p9"), json!({"exp":now()+60})))
            .unwrap_err();
        assert_eq!(e.kind, RefusalKind::UnknownKey);
        assert!(e.message.contains("`p9`"), "{}", e.message);
    }
}
