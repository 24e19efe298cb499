//! The listening sockets and the accept policy when the process runs out
//! of file descriptors.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use mio::net::TcpListener;

use super::tls_identity::TlsIdentity;
use crate::app::Role;

/// How long accepting pauses after EMFILE/ENFILE: the pending connections
/// wait in the kernel's backlog until descriptors free up, instead of the
/// loop spinning on an accept that keeps failing.
pub const ACCEPT_RETRY: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub struct Listener {
    pub socket: TcpListener,
    pub addr: SocketAddr,
    pub role: Role,
    /// Accepting is paused until a retry timer fires.
    pub paused: bool,
    /// Connections accepted here speak TLS with this identity.
    pub tls: Option<TlsIdentity>,
}

impl Listener {
    pub fn bind(addr: SocketAddr, role: Role, tls: Option<TlsIdentity>) -> io::Result<Self> {
        let socket = TcpListener::bind(addr)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        let addr = socket.local_addr()?;
        Ok(Self {
            socket,
            addr,
            role,
            paused: false,
            tls,
        })
    }

    /// How clients reach it: `ws://` or `wss://` and the bound address.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        format!("{scheme}://{}", self.addr)
    }
}

/// Errors that mean "no descriptors or memory right now", not "this
/// connection failed".
pub fn is_resource_exhaustion(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Raises the soft open-file limit to the hard limit so the configured
/// connection count is reachable; returns the limit now in force.
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    Ok(limit.rlim_cur)
}
