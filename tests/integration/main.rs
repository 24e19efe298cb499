//! fanout's integration tests: one test binary, so the crate is linked
//! once for all of them, not once per file. Each module is one area (its
//! tests are named `AREA::test`, so `cargo test --release -- chat::` runs
//! one area); `support` holds the helpers they share. The Autobahn
//! TestSuite is a binary of its own (`tests/autobahn.rs` says why).
//!
//! Some tests drive external programs (Chromium, a Python client,
//! redis-server, websocat), installed on first use by the scripts in
//! tests/browser, tests/python, tests/redis and tests/websocat, which these
//! modules find from `CARGO_MANIFEST_DIR`. Each such suite says once on
//! stderr what it installs and why, and has a skip switch
//! (`FANOUT_SKIP_BROWSER=1`, `FANOUT_SKIP_PYTHON=1`, `FANOUT_SKIP_REDIS=1`,
//! `FANOUT_SKIP_WEBSOCAT=1`): see `support::external`.

mod support;

mod backpressure;
mod browser;
mod channels;
mod chat;
mod cluster;
mod compression;
mod event_stream;
mod fd_exhaustion;
mod frames;
mod handshake;
mod market;
mod metrics;
mod process;
mod python_client;
mod readme;
mod redis_link;
mod replay;
mod sinks;
mod smoke;
mod stalled_close;
mod tls;
mod tokens;
mod websocat;
