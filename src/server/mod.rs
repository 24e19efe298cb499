//! The mio shell around the protocol: listeners, the poll loop, the slab of
//! connections, their write queues and timers.

mod compressors;
mod connection;
mod event_loop;
mod listener;
pub mod outbound;
mod pending_states;
mod stats;
mod timers;
mod tls_identity;
mod tls_session;

pub use event_loop::{Server, ShutdownHandle};
pub use listener::{raise_fd_limit, REUSE_PORT_SUPPORTED};
pub use stats::Stats;
