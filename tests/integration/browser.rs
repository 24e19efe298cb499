//! The web page (`GET /`) in a real browser: Debian's chromium driven by
//! playwright-core from npm.
//!
//! `tests/browser/setup.sh` installs both on first use (chromium with
//! apt-get when /usr/bin/chromium is missing, playwright-core with `npm ci`
//! into target/browser-test; about half a minute the first time, a no-op
//! after; said on stderr when it happens: `support::external`;
//! `FANOUT_SKIP_BROWSER=1` skips the test). This test then starts the
//! `fanout` binary with its simulated market feed, and runs
//! `tests/browser/page_test.mjs` against it: candles drawn and updating, a
//! canvas that is not blank, the default symbol's tiny prices written
//! readably (`0.0₇28852`) on the axis, in the legend and in the event rows
//! with the exact strings the server sent as hover text, every field of the
//! event rows inside the row at 1400, 1000 and 420 pixels wide, events and
//! a filter, the symbol and interval pickers, a chat line echoed, and a
//! second visitor who sees it as an earlier message and the two listing
//! each other as members. Halfway through, the
//! script prints `RESTART`: the test stops the server, starts a new one on
//! the same port and says so on the script's stdin, and the script checks
//! that the page reconnected and shows candles, events and chat again.
//! The screenshots land in target/browser-test/page.png (1400 pixels wide)
//! and page-narrow.png (420).
//!
//! Everything started here is stopped and reaped, also when a step fails or
//! times out: the script runs in a process group of its own, and on SIGTERM
//! playwright-core closes the browser it launched.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::support::external::{in_place, BROWSER};

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");
/// First-time setup may apt-get chromium (~100 MB of packages).
const SETUP_TIMEOUT: Duration = Duration::from_secs(900);
/// The page script's own checks take 10-30 s; its watchdog fires at 150 s.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a restarted server may take to bind the old port again.
const REBIND_TIMEOUT: Duration = Duration::from_secs(10);
/// From SIGTERM to SIGKILL when stopping a process.
const STOP_GRACE: Duration = Duration::from_secs(5);

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => Path::new(MANIFEST_DIR).join(dir),
        None => Path::new(MANIFEST_DIR).join("target"),
    }
}

/// A child process in its own process group, stopped (the whole group) and
/// reaped on drop.
struct Group {
    child: Child,
    status: Option<ExitStatus>,
}

impl Group {
    fn spawn(name: &'static str, command: &mut Command) -> Result<Group, String> {
        let child = command
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(Group {
            child,
            status: None,
        })
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on the process group of our own child, which is
        // not reaped yet, so the group id cannot have been reused.
        unsafe { libc::kill(-(self.child.id() as libc::pid_t), signal) };
    }

    /// SIGTERM first: fanout shuts down cleanly on it, and playwright-core
    /// closes the browser it launched (in a process group of its own, out of
    /// reach of ours); SIGKILL to whatever is left after a grace period.
    fn stop(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.signal(libc::SIGTERM);
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline {
                if let Ok(Some(status)) = self.child.try_wait() {
                    self.status = Some(status);
                    return self.status;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            self.signal(libc::SIGKILL);
            self.status = self.child.wait().ok();
        }
        self.status
    }

    /// Waits for the process to exit by itself.
    fn wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.wait().ok();
        }
        self.status
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Forwards `reader`'s lines to a channel, and keeps draining it for the
/// process's whole life so a later write never meets a full or closed pipe.
fn lines_of(reader: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    rx
}

/// The fanout binary, its stderr in a log file under target/browser-test.
struct Fanout {
    process: Group,
    addr: SocketAddr,
    log: PathBuf,
}

impl Fanout {
    /// Starts fanout on `listen`; Err when it exits or stays silent instead
    /// of printing `fanout listening on ws://ADDR` (e.g. the port is taken).
    fn start(listen: &str, log: PathBuf) -> Result<Fanout, String> {
        let stderr = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut process = Group::spawn(
            "fanout",
            Command::new(env!("CARGO_BIN_EXE_fanout"))
                .args(["--listen", listen])
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(stderr),
        )?;
        let lines = lines_of(process.child.stdout.take().unwrap());
        let first = lines.recv_timeout(Duration::from_secs(10));
        let addr = first
            .as_deref()
            .ok()
            .and_then(|line| line.strip_prefix("fanout listening on ws://"))
            .and_then(|addr| addr.trim().parse().ok());
        match addr {
            Some(addr) => Ok(Fanout { process, addr, log }),
            None => {
                process.stop();
                Err(format!(
                    "fanout --listen {listen} did not start (first stdout line: {first:?}); its log:\n{}",
                    tail(&log)
                ))
            }
        }
    }

    /// Starts fanout on exactly `addr` again, retrying while the old
    /// socket's port is not free yet.
    fn restart_on(addr: SocketAddr, log: PathBuf) -> Result<Fanout, String> {
        let deadline = Instant::now() + REBIND_TIMEOUT;
        loop {
            match Fanout::start(&addr.to_string(), log.clone()) {
                Ok(server) => return Ok(server),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

/// The last lines of a log file, for failure messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Runs setup.sh (bounded) and returns its KEY=VALUE report.
fn setup() -> Result<Vec<(String, String)>, String> {
    let script = Path::new(MANIFEST_DIR).join("tests/browser/setup.sh");
    if !in_place(Command::new("bash").arg(&script).arg("--check")) {
        BROWSER.announce_install();
    }
    let started = Instant::now();
    // coreutils `timeout` signals setup.sh's whole process group (apt, npm).
    let output = Command::new("timeout")
        .args(["-k", "10", &SETUP_TIMEOUT.as_secs().to_string(), "bash"])
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!(
            "{} failed ({}; a status of 124 is its {} s time limit):\n{stderr}",
            script.display(),
            output.status,
            SETUP_TIMEOUT.as_secs()
        ));
    }
    // Progress is on stderr; show it when something was installed.
    if !stderr.trim().is_empty() {
        eprintln!("{stderr}");
    }
    println!("browser setup: {:.1} s", started.elapsed().as_secs_f64());
    Ok(stdout
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

/// Runs the page script against `server`; on `RESTART` replaces the server
/// with a new one on the same address. Returns the script's output.
fn drive(report: &[(String, String)], server: &mut Fanout, dir: &Path) -> Result<String, String> {
    let get = |key: &str| {
        report
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let node = get("NODE").ok_or("setup.sh reported no NODE")?;
    let url = format!("http://{}/", server.addr);
    let mut command = Command::new(&node);
    command
        .arg(Path::new(MANIFEST_DIR).join("tests/browser/page_test.mjs"))
        .arg(&url)
        .arg("--reconnect")
        .current_dir(MANIFEST_DIR)
        .env("SCREENSHOT", dir.join("page.png"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for key in ["NODE_PATH", "CHROMIUM"] {
        if let Some(value) = get(key) {
            command.env(key, value);
        }
    }
    println!("running {node} tests/browser/page_test.mjs {url} --reconnect");
    let mut script = Group::spawn("node", &mut command)?;
    let mut stdin: Option<ChildStdin> = script.child.stdin.take();
    let stdout = lines_of(script.child.stdout.take().unwrap());
    let stderr = lines_of(script.child.stderr.take().unwrap());

    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    let mut transcript = String::new();
    let mut restarts = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match stdout.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok(line) => {
                println!("  {line}");
                transcript.push_str(&line);
                transcript.push('\n');
                if line == "RESTART" {
                    restarts += 1;
                    let addr = server.addr;
                    server.process.stop();
                    let log = dir.join(format!("fanout-{restarts}.log"));
                    *server = Fanout::restart_on(addr, log)?;
                    println!("  (fanout restarted on {addr})");
                    let pipe = stdin.as_mut().ok_or("the script's stdin is gone")?;
                    writeln!(pipe, "restarted")
                        .map_err(|e| format!("writing to the script: {e}"))?;
                }
            }
            Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(RecvTimeoutError::Timeout) => {
                script.stop();
                return Err(format!(
                    "the page script did not finish within {} s\n{transcript}",
                    SCRIPT_TIMEOUT.as_secs()
                ));
            }
            // stdout closed: the script is done.
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    drop(stdin.take());
    let status = script.wait().ok_or("cannot wait for node")?;
    let errors: Vec<String> = stderr.try_iter().collect();
    if !status.success() || !transcript.contains("page test: ok") {
        return Err(format!(
            "the page script failed ({status}):\n{transcript}{}",
            errors.join("\n")
        ));
    }
    if restarts != 1 {
        return Err(format!(
            "the script asked for {restarts} restart(s), expected 1"
        ));
    }
    Ok(transcript)
}

#[test]
fn page_draws_candles_filters_events_chats_and_reconnects() {
    if BROWSER.skipped() {
        return;
    }
    let report = setup().unwrap_or_else(|e| panic!("browser test setup: {e}"));
    let dir = target_dir().join("browser-test");
    std::fs::create_dir_all(&dir).expect("create target/browser-test");

    let mut server =
        Fanout::start("127.0.0.1:0", dir.join("fanout-0.log")).unwrap_or_else(|e| panic!("{e}"));
    let result = drive(&report, &mut server, &dir);
    let log = server.log.clone();
    drop(server);
    if let Err(e) = result {
        panic!(
            "{e}\n--- fanout log ({}) ---\n{}",
            log.display(),
            tail(&log)
        );
    }
    println!("screenshot: {}", dir.join("page.png").display());
}
