//! A listener's TLS identity: the certificate chain and private key read
//! from PEM files, turned into the rustls configuration new connections
//! are made with. Every way the files can be wrong is reported with the
//! file's name, at start-up as an error and on a SIGHUP reload as a log
//! line that leaves the previous identity in place.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::ring;
use rustls::ServerConfig;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The files an identity comes from, and what was last loaded from them.
#[derive(Debug)]
pub struct TlsIdentity {
    cert_path: PathBuf,
    key_path: PathBuf,
    config: Arc<ServerConfig>,
}

impl TlsIdentity {
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, String> {
        Ok(Self {
            config: server_config(cert_path, key_path)?,
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
        })
    }

    /// What connections accepted from now on are served with.
    pub fn config(&self) -> &Arc<ServerConfig> {
        &self.config
    }

    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// Reads the files again. On failure the identity stays as it was, so
    /// a botched certificate rotation does not take the listener down.
    pub fn reload(&mut self) -> Result<(), String> {
        self.config = server_config(&self.cert_path, &self.key_path)?;
        Ok(())
    }
}

fn server_config(cert_path: &Path, key_path: &Path) -> Result<Arc<ServerConfig>, String> {
    let certs = read_certificates(cert_path)?;
    let key = read_private_key(key_path)?;
    let provider = Arc::new(ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_no_client_auth();
    let mut config = builder.with_single_cert(certs, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => format!(
            "TLS key file {} does not belong to the certificate in {}",
            key_path.display(),
            cert_path.display()
        ),
        other => format!(
            "TLS certificate {} with key {}: {other}",
            cert_path.display(),
            key_path.display()
        ),
    })?;
    // WebSockets upgrade from HTTP/1.1; a client offering h2 as well is
    // steered to it rather than left to guess.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem_text = read_file(path, "TLS certificate file")?;
    let certs = CertificateDer::pem_slice_iter(&pem_text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("TLS certificate file {}: bad PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "TLS certificate file {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem_text = read_file(path, "TLS key file")?;
    PrivateKeyDer::from_pem_slice(&pem_text).map_err(|e| match e {
        pem::Error::NoItemsFound => format!(
            "TLS key file {} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
            path.display()
        ),
        other => format!("TLS key file {}: bad PEM: {other}", path.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed() -> (String, String) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        (cert.cert.pem(), cert.signing_key.serialize_pem())
    }

    fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn a_matching_pair_loads() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed();
        let cert = write(dir.path(), "cert.pem", &cert);
        let key = write(dir.path(), "key.pem", &key);
        let identity = TlsIdentity::load(&cert, &key).unwrap();
        assert_eq!(identity.config().alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn every_bad_file_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_pem, key_pem) = self_signed();
        let (_, other_key_pem) = self_signed();
        let cert = write(dir.path(), "cert.pem", &cert_pem);
        let key = write(dir.path(), "key.pem", &key_pem);
        let other_key = write(dir.path(), "other-key.pem", &other_key_pem);
        let empty = write(dir.path(), "empty.pem", "no pem here\n");
        let broken = write(
            dir.path(),
            "broken.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n",
        );
        let missing = dir.path().join("missing.pem");

        let cases = [
            (&missing, &key, "cannot read TLS certificate file", &missing),
            (&cert, &missing, "cannot read TLS key file", &missing),
            (&empty, &key, "holds no PEM certificate", &empty),
            (&broken, &key, "bad PEM", &broken),
            (&cert, &empty, "holds no PEM private key", &empty),
            // The certificate where a key should be.
            (&cert, &cert, "holds no PEM private key", &cert),
            (
                &cert,
                &other_key,
                "does not belong to the certificate",
                &other_key,
            ),
        ];
        for (cert_path, key_path, expected, named) in cases {
            let err = TlsIdentity::load(cert_path, key_path).unwrap_err();
            assert!(err.contains(expected), "{err}");
            assert!(err.contains(&named.display().to_string()), "{err}");
        }
    }

    #[test]
    fn a_failed_reload_keeps_the_previous_identity() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_pem, key_pem) = self_signed();
        let cert = write(dir.path(), "cert.pem", &cert_pem);
        let key = write(dir.path(), "key.pem", &key_pem);
        let mut identity = TlsIdentity::load(&cert, &key).unwrap();
        let before = Arc::clone(identity.config());
        std::fs::write(&cert, "truncated").unwrap();
        let err = identity.reload().unwrap_err();
        assert!(err.contains("cert.pem"), "{err}");
        assert!(Arc::ptr_eq(&before, identity.config()));
        let (new_cert, new_key) = self_signed();
        std::fs::write(&cert, new_cert).unwrap();
        std::fs::write(&key, new_key).unwrap();
        identity.reload().unwrap();
        assert!(!Arc::ptr_eq(&before, identity.config()));
    }
}
