//! The keys tokens are verified with, read from the files the flags name:
//! an HS256 secret (`--token-secret-file`), a JWKS of the identity
//! provider's public keys (`--token-jwks-file`: RS256, ES256 and EdDSA
//! keys), and the whitelisted publisher keys (`--publisher-public-key`,
//! Ed25519 PEM). All are read at start-up, where a bad file stops the
//! server, and again on SIGHUP, where a bad file keeps the previous keys.

use std::path::{Path, PathBuf};

use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey};
use log::warn;

/// Where the key material comes from (the flags).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyFiles {
    pub secret: Option<PathBuf>,
    pub jwks: Option<PathBuf>,
    pub publishers: Vec<PathBuf>,
}

impl KeyFiles {
    pub fn is_empty(&self) -> bool {
        self.secret.is_none() && self.jwks.is_none() && self.publishers.is_empty()
    }
}

/// One identity-provider key from the JWKS.
pub struct ProviderKey {
    pub kid: Option<String>,
    pub alg: Algorithm,
    pub key: DecodingKey,
}

/// One whitelisted publisher key; `file` names it in logs.
pub struct PublisherKey {
    pub file: String,
    pub key: DecodingKey,
}

/// Every key a token may be signed with.
#[derive(Default)]
pub struct TokenKeys {
    pub secret: Option<DecodingKey>,
    pub provider: Vec<ProviderKey>,
    pub publishers: Vec<PublisherKey>,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key bytes, the secret above all.
        f.debug_struct("TokenKeys")
            .field("secret", &self.secret.is_some())
            .field("provider_keys", &self.provider.len())
            .field("publisher_keys", &self.publishers.len())
            .finish()
    }
}

impl TokenKeys {
    /// Reads every file; the error names the file and what is wrong with it.
    pub fn load(files: &KeyFiles) -> Result<TokenKeys, String> {
        let secret = match &files.secret {
            Some(path) => Some(load_secret(path)?),
            None => None,
        };
        let provider = match &files.jwks {
            Some(path) => load_jwks(path)?,
            None => Vec::new(),
        };
        let publishers = files
            .publishers
            .iter()
            .map(|path| load_publisher_key(path))
            .collect::<Result<_, _>>()?;
        Ok(TokenKeys {
            secret,
            provider,
            publishers,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.secret.is_none() && self.provider.is_empty() && self.publishers.is_empty()
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

/// The secret is the file's bytes without a trailing newline (what
/// `echo "$SECRET" > file` adds); an empty one is refused, as anyone
/// could sign with it.
fn load_secret(path: &Path) -> Result<DecodingKey, String> {
    let mut bytes = read(path, "--token-secret-file")?;
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(format!(
            "--token-secret-file {}: the secret is empty",
            path.display()
        ));
    }
    Ok(DecodingKey::from_secret(&bytes))
}

fn load_jwks(path: &Path) -> Result<Vec<ProviderKey>, String> {
    let bytes = read(path, "--token-jwks-file")?;
    let set: JwkSet = serde_json::from_slice(&bytes).map_err(|e| {
        format!(
            "--token-jwks-file {}: not a JWKS ({{\"keys\": [...]}}): {e}",
            path.display()
        )
    })?;
    let mut keys = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let kid = jwk.common.key_id.clone();
        let name = match &kid {
            Some(kid) => format!("key {i} (kid {kid})"),
            None => format!("key {i}"),
        };
        // A provider's set may hold keys for other uses (encryption) or
        // algorithms this server does not take: those are passed over
        // with a warning, and tokens naming them are refused by kid.
        match provider_algorithm(jwk) {
            Ok(alg) => {
                let key = DecodingKey::from_jwk(jwk)
                    .map_err(|e| format!("--token-jwks-file {}: {name}: {e}", path.display()))?;
                keys.push(ProviderKey { kid, alg, key });
            }
            Err(why) => warn!(
                "--token-jwks-file {}: {name} not used: {why}",
                path.display()
            ),
        }
    }
    if keys.is_empty() {
        return Err(format!(
            "--token-jwks-file {}: no RS256, ES256 or EdDSA signing key in it",
            path.display()
        ));
    }
    Ok(keys)
}

/// The one algorithm a JWKS key verifies: RS256 for RSA, ES256 for P-256,
/// EdDSA for Ed25519. An `alg` in the key must agree.
fn provider_algorithm(jwk: &Jwk) -> Result<Algorithm, String> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Err("its `use` is `enc`".into());
    }
    let (alg, named) = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => (Algorithm::RS256, KeyAlgorithm::RS256),
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
            (Algorithm::ES256, KeyAlgorithm::ES256)
        }
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            (Algorithm::EdDSA, KeyAlgorithm::EdDSA)
        }
        AlgorithmParameters::OctetKey(_) => {
            return Err("a symmetric key (HS256 takes --token-secret-file)".into())
        }
        _ => return Err("a curve other than P-256 or Ed25519".into()),
    };
    match jwk.common.key_algorithm {
        Some(given) if given != named => Err(format!(
            "its `alg` {given:?} is not {named:?}, the one this server takes for its key type"
        )),
        _ => Ok(alg),
    }
}

fn load_publisher_key(path: &Path) -> Result<PublisherKey, String> {
    let bytes = read(path, "--publisher-public-key")?;
    let key = DecodingKey::from_ed_pem(&bytes).map_err(|e| {
        format!(
            "--publisher-public-key {}: not an Ed25519 public key in PEM (-----BEGIN PUBLIC KEY-----): {e}",
            path.display()
        )
    })?;
    Ok(PublisherKey {
        file: path.display().to_string(),
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn secret_loses_its_newline_and_may_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let files = KeyFiles {
            secret: Some(write(dir.path(), "s", "sesame\n")),
            ..KeyFiles::default()
        };
        assert!(TokenKeys::load(&files).unwrap().secret.is_some());
        let files = KeyFiles {
            secret: Some(write(dir.path(), "e", "\n")),
            ..KeyFiles::default()
        };
        let e = TokenKeys::load(&files).unwrap_err();
        assert!(
            e.contains("--token-secret-file") && e.contains("empty"),
            "{e}"
        );
    }

    #[test]
    fn jwks_takes_signing_keys_and_names_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let ed = r#"{"kty":"OKP","crv":"Ed25519","kid":"ed","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}"#;
        let enc = r#"{"kty":"OKP","crv":"Ed25519","use":"enc","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}"#;
        let oct = r#"{"kty":"oct","k":"c2VjcmV0"}"#;
        let text = format!(r#"{{"keys":[{ed},{enc},{oct}]}}"#);
        let files = KeyFiles {
            jwks: Some(write(dir.path(), "jwks.json", &text)),
            ..KeyFiles::default()
        };
        let keys = TokenKeys::load(&files).unwrap();
        assert_eq!(keys.provider.len(), 1);
        assert_eq!(keys.provider[0].kid.as_deref(), Some("ed"));
        assert_eq!(keys.provider[0].alg, Algorithm::EdDSA);

        let only_unusable = format!(r#"{{"keys":[{oct}]}}"#);
        let files = KeyFiles {
            jwks: Some(write(dir.path(), "oct.json", &only_unusable)),
            ..KeyFiles::default()
        };
        let e = TokenKeys::load(&files).unwrap_err();
        assert!(e.contains("no RS256, ES256 or EdDSA signing key"), "{e}");
        let files = KeyFiles {
            jwks: Some(write(dir.path(), "bad.json", "[1]")),
            ..KeyFiles::default()
        };
        assert!(TokenKeys::load(&files).unwrap_err().contains("not a JWKS"));
        let files = KeyFiles {
            jwks: Some(dir.path().join("missing.json")),
            ..KeyFiles::default()
        };
        assert!(TokenKeys::load(&files)
            .unwrap_err()
            .contains("--token-jwks-file"));
    }

    #[test]
    fn publisher_keys_must_be_ed25519_pem() {
        let dir = tempfile::tempdir().unwrap();
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let files = KeyFiles {
            publishers: vec![write(dir.path(), "pub.pem", &pair.public_key_pem())],
            ..KeyFiles::default()
        };
        assert_eq!(TokenKeys::load(&files).unwrap().publishers.len(), 1);
        let files = KeyFiles {
            publishers: vec![write(dir.path(), "junk.pem", "hello")],
            ..KeyFiles::default()
        };
        let e = TokenKeys::load(&files).unwrap_err();
        assert!(
            e.contains("--publisher-public-key") && e.contains("junk.pem"),
            "{e}"
        );
    }
}
