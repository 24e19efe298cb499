//! The external suites: the tests that drive a real program from outside
//! the crate, which is installed on first use. Each suite says once on
//! stderr what it installs and why, when it installs it (a second run
//! finds it in place and says nothing), and each has a skip switch for a
//! machine that cannot install it (no root, no network):
//!
//! | suite | installs (on first use) | skip switch |
//! |---|---|---|
//! | Autobahn (`tests/autobahn.rs`) | wstest into target/autobahn (`.ci/autobahn/install.sh`) | `FANOUT_SKIP_AUTOBAHN=1` |
//! | browser | chromium (apt), playwright-core (npm) into target/browser-test (`tests/browser/setup.sh`) | `FANOUT_SKIP_BROWSER=1` |
//! | python_client | websocket-client into target/python-venv (`tests/python/setup-venv.sh`) | `FANOUT_SKIP_PYTHON=1` |
//! | cluster, redis_link | redis-server (apt; `tests/redis/start-redis.sh`) | `FANOUT_SKIP_REDIS=1` |
//! | websocat | websocat from crates.io into target/websocat (`tests/websocat/install.sh`) | `FANOUT_SKIP_WEBSOCAT=1` |
//!
//! A switch skips when it is set to anything but "" or "0"; a skipped test
//! says `SKIPPED:` on stderr and passes. Both lines go to the process's
//! stderr itself, not through `eprintln!`, which libtest captures and shows
//! only for a failed test.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Once;

/// One external suite: its skip switch and its install announcement.
pub struct Suite {
    /// The environment variable that skips the suite.
    pub switch: &'static str,
    /// The suite's tests, as the skip and install lines name them.
    pub tests: &'static str,
    /// What is installed, where from and why, for the announcement.
    pub installs: &'static str,
    announced: Once,
}

pub static AUTOBAHN: Suite = Suite {
    switch: "FANOUT_SKIP_AUTOBAHN",
    tests: "the Autobahn TestSuite runs",
    installs:
        "the Autobahn TestSuite (wstest: Python 2.7 from Debian bullseye packages, pip pins) \
               into target/autobahn, for the RFC 6455/7692 conformance runs (a few minutes)",
    announced: Once::new(),
};

pub static BROWSER: Suite = Suite {
    switch: "FANOUT_SKIP_BROWSER",
    tests: "the browser test",
    installs: "Debian's chromium (apt, when missing) and playwright-core (npm ci into \
               target/browser-test), for the browser test of the web page",
    announced: Once::new(),
};

pub static PYTHON: Suite = Suite {
    switch: "FANOUT_SKIP_PYTHON",
    tests: "the Python client test",
    installs: "websocket-client (pip, into target/python-venv; python3-venv from apt when \
               missing), for the Python client test",
    announced: Once::new(),
};

pub static REDIS: Suite = Suite {
    switch: "FANOUT_SKIP_REDIS",
    tests: "the Redis tests",
    installs: "redis-server from apt, for the Redis scale-out tests (cluster, redis_link)",
    announced: Once::new(),
};

pub static WEBSOCAT: Suite = Suite {
    switch: "FANOUT_SKIP_WEBSOCAT",
    tests: "the websocat sessions",
    installs: "websocat (built from crates.io into target/websocat, about a minute; \
               libssl-dev from apt when missing), for the README's chat sessions",
    announced: Once::new(),
};

impl Suite {
    /// True when the suite's switch is set: the calling test then says
    /// `SKIPPED:` and returns without checking anything.
    pub fn skipped(&self) -> bool {
        let Some(value) = std::env::var_os(self.switch) else {
            return false;
        };
        if value.is_empty() || value == "0" {
            return false;
        }
        // libtest names a test's thread after the test.
        let test = std::thread::current()
            .name()
            .filter(|name| *name != "main")
            .map(|name| format!("{name} "))
            .unwrap_or_default();
        say(&format!(
            "SKIPPED: {test}({}={} skips {})",
            self.switch,
            value.to_string_lossy(),
            self.tests
        ));
        true
    }

    /// Says what is being installed and why: once per test binary, by the
    /// caller that found it missing, before it installs it.
    pub fn announce_install(&self) {
        self.announced.call_once(|| {
            say(&format!(
                "fanout tests: installing {} (once; {}=1 skips {})",
                self.installs, self.switch, self.tests
            ))
        });
    }
}

/// One line on the test process's own stderr, past libtest's capture.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// True when `check` (an installer run in its check mode) exits 0: what it
/// installs is in place, so nothing will be installed.
pub fn in_place(check: &mut Command) -> bool {
    check
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}
