//! fanout: a single-threaded mio WebSocket server.
//!
//! `ws` is the protocol (sans-IO), `server` the mio shell around it, `app`
//! the routes that decide what each endpoint does with messages.

// Every unsafe block says why it is sound, in a `// SAFETY:` comment.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod app;
pub mod cluster;
pub mod config;
pub mod metrics;
pub mod server;
pub mod ws;
