//! RFC 6455 conformance: the Autobahn TestSuite fuzzing client (cases 1-11)
//! against `/echo` on a real server, over ws:// and over wss:// (a TLS
//! listener with a certificate made at test time). `.ci/autobahn/run.sh`
//! installs wstest into target/autobahn on first use and fails unless every
//! case matches `.ci/autobahn/expected.json` (OK, or INFORMATIONAL where the
//! suite only informs): no FAILED, NON-STRICT, UNIMPLEMENTED or missing case.

mod common;
#[path = "support/tls.rs"]
mod tls;

use std::process::Command;

#[test]
fn autobahn_fuzzingclient_cases_1_to_11() {
    if std::env::var_os("FANOUT_SKIP_AUTOBAHN").is_some() {
        eprintln!("SKIPPED: FANOUT_SKIP_AUTOBAHN is set; the Autobahn suite did not run");
        return;
    }
    let server = common::TestServer::start(&[]);
    run_suite(server, &[]);
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
    run_suite(server, &["--tls"]);
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
