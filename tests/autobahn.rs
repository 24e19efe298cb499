//! RFC 6455 and RFC 7692 conformance: the Autobahn TestSuite fuzzing client
//! against `/echo` on real servers: every case (1-13) over ws:// on one
//! with `--compression dedicated`; the permessage-deflate parameter cases
//! (13.*) again on one with `--compression shared`; and cases 1-11 over
//! wss:// (a TLS listener with a certificate made at test time).
//! `.ci/autobahn/run.sh` installs wstest into target/autobahn on first use
//! and fails unless every case its spec selects matches
//! `.ci/autobahn/expected.json` (OK, or INFORMATIONAL where the suite only
//! informs): no FAILED, NON-STRICT, UNIMPLEMENTED or missing case.

// A test binary of its own, not a module of tests/integration: its three
// wstest runs keep both cores busy for about 10 minutes. In the integration
// binary they would sort first and take libtest's test threads (one per
// core by default), so the other tests would queue behind them, or run
// beside them on a saturated machine, timing-sensitive ones included
// (backpressure, close and handshake timeouts): no time saved, only flakes
// risked. Cargo runs test binaries one after the other, so here they run on
// their own, and `cargo test --release --test integration` is everything
// else. The price is one more link of the crate. The helpers are the same
// folder as the integration tests', mounted by path.
#[path = "integration/support/mod.rs"]
mod support;

use std::process::Command;

use support::{common, tls};

#[test]
fn autobahn_fuzzingclient_cases_1_to_13() {
    if std::env::var_os("FANOUT_SKIP_AUTOBAHN").is_some() {
        eprintln!("SKIPPED: FANOUT_SKIP_AUTOBAHN is set; the Autobahn suite did not run");
        return;
    }
    let server = common::TestServer::start(&["--compression", "dedicated"]);
    run_suite(server, &[]);
}

#[test]
fn autobahn_fuzzingclient_compression_cases_with_shared_compression() {
    if std::env::var_os("FANOUT_SKIP_AUTOBAHN").is_some() {
        eprintln!("SKIPPED: FANOUT_SKIP_AUTOBAHN is set; the Autobahn cases 13.* did not run");
        return;
    }
    let server = common::TestServer::start(&["--compression", "shared"]);
    run_suite(server, &["--spec", "fuzzingclient-shared"]);
}

#[test]
fn autobahn_fuzzingclient_cases_1_to_11_over_wss() {
    if std::env::var_os("FANOUT_SKIP_AUTOBAHN").is_some() {
        eprintln!("SKIPPED: FANOUT_SKIP_AUTOBAHN is set; the Autobahn suite over wss did not run");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cert = tls::TestCert::generate(dir.path(), "autobahn");
    let server = common::TestServer::start(&["--tls-cert", cert.cert(), "--tls-key", cert.key()]);
    run_suite(
        server,
        &["--tls", "--spec", "fuzzingclient-without-compression"],
    );
}

/// Runs `.ci/autobahn/run.sh [ARGS] PORT` against `server`, then stops it.
fn run_suite(server: common::TestServer, args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/autobahn/run.sh");
    let output = Command::new("bash")
        .arg(script)
        .args(args)
        .arg(server.addr.port().to_string())
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    server.stop().expect("server stops cleanly after the suite");
    assert!(
        output.status.success(),
        "Autobahn run failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
}
