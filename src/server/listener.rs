//! The listening sockets (with `--reuse-port`, shared with other processes)
//! and the accept policy when the process runs out of file descriptors.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use mio::net::TcpListener;
use socket2::{Domain, Protocol, Socket, Type};

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
    /// Binds `addr`; with `reuse_port` the socket has SO_REUSEPORT, so other
    /// processes that set it too can bind the same address and the kernel
    /// spreads new connections among them.
    pub fn bind(
        addr: SocketAddr,
        role: Role,
        tls: Option<TlsIdentity>,
        reuse_port: bool,
        backlog: u32,
    ) -> io::Result<Self> {
        let socket =
            open(addr, reuse_port, backlog).map_err(|e| bind_error(addr, reuse_port, e))?;
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

/// What `mio::net::TcpListener::bind` does (a non-blocking, close-on-exec
/// socket with SO_REUSEADDR, so a restarted server can bind at once while
/// old connections linger in TIME_WAIT), plus SO_REUSEPORT when asked and
/// `--listen-backlog` instead of mio's 128, which a burst of a few hundred
/// connects overflows (their SYNs are then retried after a second).
fn open(addr: SocketAddr, reuse_port: bool, backlog: u32) -> io::Result<TcpListener> {
    // socket2 creates it close-on-exec.
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        reuse_port::enable(&socket)?;
    }
    socket.bind(&addr.into())?;
    // At most 65535 (checked by the config), so it fits an i32.
    socket.listen(backlog as i32)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// "cannot listen on ADDR: why", and when the address is taken, what
/// `--reuse-port` has to do with it.
fn bind_error(addr: SocketAddr, reuse_port: bool, error: io::Error) -> io::Error {
    let hint = match (error.kind(), reuse_port) {
        (io::ErrorKind::AddrInUse, false) => {
            "; another socket holds it (several fanout processes share an address only \
             when every one of them runs with --reuse-port)"
        }
        (io::ErrorKind::AddrInUse, true) => {
            "; the socket holding it was bound without SO_REUSEPORT or by another user \
             (every process sharing an address needs --reuse-port and the same user)"
        }
        _ => "",
    };
    io::Error::new(
        error.kind(),
        format!("cannot listen on {addr}: {error}{hint}"),
    )
}

/// SO_REUSEPORT where the system has it: socket2 offers it on these
/// systems (the same `cfg` as its `Socket::set_reuse_port`).
#[cfg(all(
    unix,
    not(any(
        target_os = "solaris",
        target_os = "illumos",
        target_os = "cygwin",
        target_os = "nuttx",
        target_os = "wasi"
    ))
))]
mod reuse_port {
    pub const SUPPORTED: bool = true;

    pub fn enable(socket: &socket2::Socket) -> std::io::Result<()> {
        socket.set_reuse_port(true)
    }
}

/// No SO_REUSEPORT here: `--reuse-port` is refused by
/// `Config::validate`, and this error stands behind that check.
#[cfg(not(all(
    unix,
    not(any(
        target_os = "solaris",
        target_os = "illumos",
        target_os = "cygwin",
        target_os = "nuttx",
        target_os = "wasi"
    ))
)))]
mod reuse_port {
    pub const SUPPORTED: bool = false;

    pub fn enable(_: &socket2::Socket) -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "--reuse-port: this system has no SO_REUSEPORT",
        ))
    }
}

/// Whether `--reuse-port` can work on this system.
pub const REUSE_PORT_SUPPORTED: bool = reuse_port::SUPPORTED;

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

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    #[test]
    fn with_reuse_port_two_sockets_share_one_address() {
        let first = Listener::bind(loopback(), Role::Public, None, true, 16).unwrap();
        let second = Listener::bind(first.addr, Role::Internal, None, true, 16).unwrap();
        assert_eq!(first.addr, second.addr);
        for listener in [&first, &second] {
            let socket = socket2::SockRef::from(&listener.socket);
            assert!(socket.reuse_port().unwrap());
            assert!(socket.reuse_address().unwrap());
            assert!(socket.nonblocking().unwrap());
        }
    }

    /// Connects that complete (on loopback, within 200 ms each) to a
    /// listener that never accepts: those its backlog holds.
    fn queued_connects(backlog: u32, attempts: usize) -> usize {
        let listener = Listener::bind(loopback(), Role::Public, None, false, backlog).unwrap();
        let mut open = Vec::new();
        for _ in 0..attempts {
            let timeout = std::time::Duration::from_millis(200);
            if let Ok(stream) = std::net::TcpStream::connect_timeout(&listener.addr, timeout) {
                open.push(stream);
            }
        }
        open.len()
    }

    #[test]
    fn the_listen_backlog_is_the_one_configured() {
        // Linux queues backlog + 1 and drops the SYNs of the rest (retried
        // after a second), so with 4 most of 12 connects wait; with 64 none
        // of 40 does (mio's default of 128 would pass the second, not the
        // first).
        let small = queued_connects(4, 12);
        assert!(
            (4..=6).contains(&small),
            "{small} connects completed with a backlog of 4"
        );
        assert_eq!(queued_connects(64, 40), 40);
    }

    #[test]
    fn without_reuse_port_the_second_bind_says_why_it_failed() {
        let first = Listener::bind(loopback(), Role::Public, None, false, 16).unwrap();
        assert!(!socket2::SockRef::from(&first.socket).reuse_port().unwrap());
        let error = Listener::bind(first.addr, Role::Public, None, false, 16).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AddrInUse);
        let message = error.to_string();
        assert!(
            message.starts_with(&format!("cannot listen on {}: ", first.addr)),
            "{message}"
        );
        assert!(message.contains("runs with --reuse-port"), "{message}");
        // Asking for it is not enough when the holder did not.
        let error = Listener::bind(first.addr, Role::Public, None, true, 16).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AddrInUse);
        assert!(
            error.to_string().contains("bound without SO_REUSEPORT"),
            "{error}"
        );
    }
}
