//! `wss://`: the client side of TLS over the same non-blocking sockets,
//! rustls' sans-IO `ClientConnection` between a connection and its socket.
//! The server's certificate is checked against `--tls-ca` (a test
//! certificate made for the run), not skipped.

use std::io::{self, ErrorKind, Read, Write};
use std::sync::Arc;

use mio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

/// A client configuration trusting exactly the certificates in `ca_file`.
pub fn client_config(ca_file: &str) -> Result<Arc<ClientConfig>, String> {
    let pem = std::fs::read(ca_file).map_err(|e| format!("--tls-ca {ca_file}: {e}"))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("--tls-ca {ca_file}: {e}"))?;
        roots.add(cert).map_err(|e| format!("--tls-ca {ca_file}: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("--tls-ca {ca_file}: no PEM certificate in it"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A session for `host` (`HOST:PORT` from the URL; the name or IP checked
/// against the certificate).
pub fn session(config: &Arc<ClientConfig>, host: &str) -> Result<Box<ClientConnection>, String> {
    let name = host.rsplit_once(':').map_or(host, |(name, _)| name);
    let name = ServerName::try_from(name.to_owned()).map_err(|e| format!("{name}: {e}"))?;
    ClientConnection::new(Arc::clone(config), name).map(Box::new).map_err(|e| e.to_string())
}

/// Writes the session's records until none are left or `WouldBlock`.
pub fn push_records(tls: &mut ClientConnection, socket: &mut TcpStream) -> io::Result<()> {
    while tls.wants_write() {
        match tls.write_tls(socket) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Plaintext out: what the session takes, its records pushed as far as the
/// socket allows. `WouldBlock` only when the socket is full (so a
/// writable event follows).
pub fn send(tls: &mut ClientConnection, socket: &mut TcpStream, bytes: &[u8]) -> io::Result<usize> {
    push_records(tls, socket)?;
    let n = tls.writer().write(bytes)?;
    match push_records(tls, socket) {
        Err(e) if e.kind() != ErrorKind::WouldBlock => return Err(e),
        _ => {}
    }
    if n == 0 && !bytes.is_empty() {
        return Err(ErrorKind::WouldBlock.into());
    }
    Ok(n)
}

/// Plaintext in: what the session holds, else more from the socket;
/// `Ok(0)` at the end of the stream, `WouldBlock` when the socket is empty.
pub fn recv(tls: &mut ClientConnection, socket: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match tls.reader().read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if tls.read_tls(socket)? == 0 {
            return Ok(0);
        }
        tls.process_new_packets().map_err(|e| io::Error::new(ErrorKind::InvalidData, e))?;
        // Handshake messages the server's ones call for.
        match push_records(tls, socket) {
            Err(e) if e.kind() != ErrorKind::WouldBlock => return Err(e),
            _ => {}
        }
    }
}
