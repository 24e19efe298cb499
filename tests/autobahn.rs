//! RFC 6455 conformance: the Autobahn TestSuite fuzzing client (cases 1-11)
//! against `/echo` on a real server. `.ci/autobahn/run.sh` installs wstest
//! into target/autobahn on first use and fails unless every case matches
//! `.ci/autobahn/expected.json` (OK, or INFORMATIONAL where the suite only
//! informs): no FAILED, NON-STRICT, UNIMPLEMENTED or missing case.

mod common;

use std::process::Command;

#[test]
fn autobahn_fuzzingclient_cases_1_to_11() {
    if std::env::var_os("FANOUT_SKIP_AUTOBAHN").is_some() {
        eprintln!("SKIPPED: FANOUT_SKIP_AUTOBAHN is set; the Autobahn suite did not run");
        return;
    }
    let server = common::TestServer::start(&[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/autobahn/run.sh");
    let output = Command::new("bash")
        .arg(script)
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
