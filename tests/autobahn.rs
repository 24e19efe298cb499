//! RFC 6455 and RFC 7692 conformance: the Autobahn TestSuite fuzzing client
//! against `/echo` on real servers: every case (1-13) over ws:// on one
//! with `--compression dedicated`; the permessage-deflate parameter cases
//! (13.*) again on one with `--compression shared`; and cases 1-11 over
//! wss:// (a TLS listener with a certificate made at test time).
//! wstest is installed into target/autobahn on first use (by
//! `.ci/autobahn/install.sh`, said once on stderr; `FANOUT_SKIP_AUTOBAHN=1`
//! skips these tests), and `.ci/autobahn/run.sh` fails unless every case
//! its spec selects matches
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

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use sha2::{Digest, Sha256};
use support::external::AUTOBAHN;
use support::{common, tls};

const CI_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/autobahn");

#[test]
fn autobahn_fuzzingclient_cases_1_to_13() {
    if AUTOBAHN.skipped() {
        return;
    }
    let server = common::TestServer::start(&["--compression", "dedicated"]);
    run_suite(server, &[]);
}

#[test]
fn autobahn_fuzzingclient_compression_cases_with_shared_compression() {
    if AUTOBAHN.skipped() {
        return;
    }
    let server = common::TestServer::start(&["--compression", "shared"]);
    run_suite(server, &["--spec", "fuzzingclient-shared"]);
}

#[test]
fn autobahn_fuzzingclient_cases_1_to_11_over_wss() {
    if AUTOBAHN.skipped() {
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

/// Installs wstest unless it is in place: once per test binary, for the
/// three runs at once, said on stderr first. `run.sh` then finds it there.
fn ensure_wstest() {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        if wstest_in_place() {
            return Ok(());
        }
        AUTOBAHN.announce_install();
        let script = format!("{CI_DIR}/install.sh");
        let output = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run bash {script}: {e}"))?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            return Err(format!(
                "{script} failed ({}; FANOUT_SKIP_AUTOBAHN=1 skips the Autobahn runs):\n{stderr}",
                output.status
            ));
        }
        eprintln!("{stderr}");
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// What `install.sh` checks before it does nothing (its `is_installed`):
/// its stamp, the SHA-256 of the script and its pins, and the wrapper
/// running the wstest it installed. Read here so that the install is
/// announced only when it will happen.
fn wstest_in_place() -> bool {
    let dest = match std::env::var_os("AUTOBAHN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/autobahn"),
    };
    let mut hash = Sha256::new();
    for file in ["install.sh", "requirements-py27.txt"] {
        match std::fs::read(Path::new(CI_DIR).join(file)) {
            Ok(bytes) => hash.update(bytes),
            Err(_) => return false,
        }
    }
    let want: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let stamp = std::fs::read_to_string(dest.join(".install-stamp")).unwrap_or_default();
    let wrapper = std::fs::read_to_string(dest.join("bin/wstest")).unwrap_or_default();
    let wstest = dest.join("venv27/bin/wstest");
    stamp.trim_end() == want && wstest.is_file() && wrapper.contains(&*wstest.to_string_lossy())
}

/// Runs `.ci/autobahn/run.sh [ARGS] PORT` against `server`, then stops it.
fn run_suite(server: common::TestServer, args: &[&str]) {
    ensure_wstest();
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
