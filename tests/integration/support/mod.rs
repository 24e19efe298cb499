//! Helpers shared by the integration tests (`tests/integration/main.rs`)
//! and the Autobahn binary (`tests/autobahn.rs`, which mounts this folder
//! by path): not every binary uses every helper.
#![allow(dead_code)]

pub mod bounded;
pub mod child_lines;
pub mod common;
pub mod external;
pub mod http_recorder;
pub mod json_client;
pub mod redis_server;
pub mod tls;
