//! TLS for tests: a self-signed certificate made at test time (for
//! `localhost` and 127.0.0.1) written to PEM files, and a rustls client
//! that trusts exactly that certificate.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// A certificate and its key, as PEM files in a directory of their own.
pub struct TestCert {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub cert_der: CertificateDer<'static>,
}

impl TestCert {
    /// Generates a fresh key pair and certificate into `dir/NAME-cert.pem`
    /// and `dir/NAME-key.pem`.
    pub fn generate(dir: &Path, name: &str) -> TestCert {
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let made = rcgen::generate_simple_self_signed(names).expect("generate certificate");
        let cert_path = dir.join(format!("{name}-cert.pem"));
        let key_path = dir.join(format!("{name}-key.pem"));
        std::fs::write(&cert_path, made.cert.pem()).unwrap();
        std::fs::write(&key_path, made.signing_key.serialize_pem()).unwrap();
        TestCert {
            cert_path,
            key_path,
            cert_der: made.cert.der().clone(),
        }
    }

    pub fn cert(&self) -> &str {
        self.cert_path.to_str().unwrap()
    }

    pub fn key(&self) -> &str {
        self.key_path.to_str().unwrap()
    }

    /// A client configuration trusting this certificate only.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.cert_der.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }

    /// Completes a TLS handshake with `addr` as `localhost`, trusting this
    /// certificate; 5 s socket timeouts keep a test from hanging.
    pub fn connect(&self, addr: SocketAddr) -> Result<TlsStream, rustls::Error> {
        let socket = TcpStream::connect(addr).expect("connect");
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        socket
            .set_write_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        socket.set_nodelay(true).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let conn = ClientConnection::new(self.client_config(), name).unwrap();
        let mut stream = StreamOwned::new(conn, socket);
        // A TLS 1.3 handshake takes two round trips; a few more calls
        // cover a 1.2 fallback.
        for _ in 0..8 {
            if !stream.conn.is_handshaking() {
                return Ok(stream);
            }
            if let Err(e) = stream.conn.complete_io(&mut stream.sock) {
                return Err(match e.into_inner() {
                    Some(inner) => match inner.downcast::<rustls::Error>() {
                        Ok(tls) => *tls,
                        Err(other) => rustls::Error::General(other.to_string()),
                    },
                    None => rustls::Error::General("connection closed".into()),
                });
            }
        }
        Err(rustls::Error::General("handshake did not finish".into()))
    }

    /// A WebSocket over TLS to `path`.
    pub fn websocket(&self, addr: SocketAddr, path: &str) -> tungstenite::WebSocket<TlsStream> {
        let stream = self.connect(addr).expect("TLS handshake");
        let url = format!("wss://localhost:{}{path}", addr.port());
        let (ws, response) = tungstenite::client(url, stream).expect("WebSocket handshake");
        assert_eq!(response.status(), 101);
        ws
    }
}
