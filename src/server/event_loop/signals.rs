//! Signals and shutdown: SIGHUP reloads the TLS listeners' certificates
//! and the token keys,
//! SIGINT and SIGTERM (or a [`ShutdownHandle`]) begin a graceful shutdown:
//! accepting stops, every WebSocket gets a 1001 close, and the loop runs
//! until they have closed or `--shutdown-grace` is over.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use log::{error, info, warn};
use mio::{Interest, Waker};

use super::{Server, SIGNAL};
use crate::server::connection::Phase;
use crate::ws::CloseCode;

/// Asks a running server to shut down gracefully, from any thread.
#[derive(Clone, Debug)]
pub struct ShutdownHandle {
    pub(super) requested: Arc<AtomicBool>,
    pub(super) waker: Arc<Waker>,
}

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.requested.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            warn!("could not wake the event loop for shutdown: {e}");
        }
    }
}

impl Server {
    /// Makes SIGINT and SIGTERM start a graceful shutdown, and SIGHUP
    /// reload the TLS listeners' certificates.
    pub fn handle_signals(&mut self) -> io::Result<()> {
        let mut signals = signal_hook_mio::v1_0::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGHUP,
        ])?;
        self.poll
            .registry()
            .register(&mut signals, SIGNAL, Interest::READABLE)?;
        self.signals = Some(signals);
        Ok(())
    }

    pub(super) fn on_signal(&mut self) {
        let Some(signals) = self.signals.as_mut() else {
            return;
        };
        let received: Vec<i32> = signals.pending().collect();
        if received.contains(&signal_hook::consts::SIGHUP) {
            self.reload_tls();
            self.reload_tokens();
        }
        let stopping: Vec<i32> = received
            .into_iter()
            .filter(|&s| s != signal_hook::consts::SIGHUP)
            .collect();
        if !stopping.is_empty() {
            info!("received signal {stopping:?}: shutting down");
            self.begin_shutdown();
        }
    }

    /// Re-reads every TLS listener's certificate and key. Connections
    /// already open keep the identity they started with; a bad file keeps
    /// the listener on its previous one.
    fn reload_tls(&mut self) {
        let stats = &mut self.core.stats;
        let mut any = false;
        for listener in &mut self.listeners {
            let Some(identity) = listener.tls.as_mut() else {
                continue;
            };
            any = true;
            match identity.reload() {
                Ok(()) => {
                    stats.tls_reloads += 1;
                    info!(
                        "SIGHUP: {} now serves the certificate in {}",
                        listener.addr,
                        identity.cert_path().display()
                    );
                }
                Err(e) => {
                    stats.tls_reload_failures += 1;
                    error!(
                        "SIGHUP: {} keeps its previous certificate: {e}",
                        listener.addr
                    );
                }
            }
        }
        if !any {
            info!("SIGHUP: no TLS listener, nothing to reload");
        }
    }

    /// Re-reads the token key files (the JWKS, the HS256 secret, the
    /// publisher keys). Tokens already accepted stay accepted until they
    /// expire; a bad file keeps the previous keys.
    fn reload_tokens(&mut self) {
        match self.core.app.reload_tokens() {
            Ok(true) => info!("SIGHUP: token keys re-read"),
            Ok(false) => {}
            Err(e) => error!("SIGHUP: the previous token keys stay: {e}"),
        }
    }

    /// Stops accepting, sends 1001 to every WebSocket, and lets the loop
    /// run until they have all closed or the grace period is over.
    pub(super) fn begin_shutdown(&mut self) {
        if self.core.stopping_at.is_some() {
            return;
        }
        let core = &mut self.core;
        core.stopping_at = Some(core.now + core.config.shutdown_grace);
        for listener in &mut self.listeners {
            let _ = self.poll.registry().deregister(&mut listener.socket);
        }
        self.listeners.clear();
        let tokens: Vec<usize> = core.conns.iter().map(|(token, _)| token).collect();
        for token in tokens {
            match core.conns[token].phase {
                Phase::Open(_) => core.close(token, CloseCode::GOING_AWAY, "server shutting down"),
                Phase::Handshake(_) => core.drop_conn(token, "server shutting down"),
                Phase::Responding { .. } => {}
            }
        }
    }
}
