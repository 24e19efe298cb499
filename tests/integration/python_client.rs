//! The registration protocol against a real Python consumer, written the way
//! its users write it: `websocket-client`'s `WebSocketApp` with callbacks
//! (tests/python/registration_client.py).
//!
//! The venv comes from tests/python/setup-venv.sh (cached in
//! target/python-venv; about 10 s the first time, with access to PyPI, said
//! on stderr when it happens: `support::external`). Set
//! `FANOUT_SKIP_PYTHON=1` to skip on a machine without Python or network.

use crate::support::common;
use crate::support::external::{self, in_place};

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tungstenite::Message;

const SETUP_TIMEOUT: Duration = Duration::from_secs(900);
/// The Python client's own give-up time (its `--timeout`).
const CLIENT_TIMEOUT_SECS: u64 = 30;
/// How long the test waits for anything from the client: past its own timeout.
const WAIT: Duration = Duration::from_secs(CLIENT_TIMEOUT_SECS + 10);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn skip() -> bool {
    external::PYTHON.skipped()
}

/// A child process that is killed and reaped however the test ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

impl Reaped {
    /// Waits at most `within` for the exit status; kills the child past it.
    fn wait_for(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                let _ = self.0.kill();
                let _ = self.0.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Collects everything a pipe says, on a thread.
fn drain<R: Read + Send + 'static>(mut pipe: R) -> (Arc<Mutex<String>>, JoinHandle<()>) {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    let thread = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    (text, thread)
}

/// Runs tests/python/setup-venv.sh once per test binary; the venv's python.
fn venv_python() -> PathBuf {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let script = repo().join("tests/python/setup-venv.sh");
            if !in_place(Command::new("bash").arg(&script).arg("--check")) {
                external::PYTHON.announce_install();
            }
            let started = Instant::now();
            let mut child = Reaped(
                Command::new("bash")
                    .arg(&script)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(|e| format!("cannot run bash: {e}"))?,
            );
            let (stdout, out_thread) = drain(child.0.stdout.take().unwrap());
            let (stderr, err_thread) = drain(child.0.stderr.take().unwrap());
            let status = child.wait_for(SETUP_TIMEOUT);
            let _ = out_thread.join();
            let _ = err_thread.join();
            let stdout = stdout.lock().unwrap().clone();
            let stderr = stderr.lock().unwrap().clone();
            match status {
                Some(status) if status.success() => {
                    eprintln!("python venv ready in {:?}", started.elapsed());
                    Ok(PathBuf::from(stdout.trim()))
                }
                Some(status) => Err(format!(
                    "tests/python/setup-venv.sh failed ({status}) (FANOUT_SKIP_PYTHON=1 skips this test):\n{stderr}"
                )),
                None => Err(format!(
                    "tests/python/setup-venv.sh took over {SETUP_TIMEOUT:?}:\n{stderr}"
                )),
            }
        })
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The Python client, running, with its stdout as lines on a channel.
struct PythonClient {
    child: Reaped,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl PythonClient {
    fn start(url: &str, filters: &Value, count: usize) -> PythonClient {
        let mut child = Reaped(
            Command::new(venv_python())
                .arg("-u")
                .arg(repo().join("tests/python/registration_client.py"))
                .arg(url)
                .arg("--filters")
                .arg(filters.to_string())
                .arg("--count")
                .arg(count.to_string())
                .arg("--timeout")
                .arg(CLIENT_TIMEOUT_SECS.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start the Python client"),
        );
        let stdout = child.0.stdout.take().unwrap();
        let lines = crate::support::child_lines::lines_of(stdout);
        let (stderr, _) = drain(child.0.stderr.take().unwrap());
        PythonClient {
            child,
            lines,
            stderr,
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The next stdout line, within `WAIT`.
    fn line(&self) -> String {
        match self.lines.recv_timeout(WAIT) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => {
                panic!(
                    "the Python client printed nothing for {WAIT:?}; stderr:\n{}",
                    self.stderr()
                )
            }
            Err(RecvTimeoutError::Disconnected) => {
                // Give the stderr thread a moment to collect the last words.
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "the Python client's stdout ended early; stderr:\n{}",
                    self.stderr()
                )
            }
        }
    }
}

/// A trusted publisher on the internal listener.
fn publisher(addr: SocketAddr) -> tungstenite::WebSocket<std::net::TcpStream> {
    let stream = connect_tcp(addr);
    let (mut ws, _) = tungstenite::client(format!("ws://{addr}/ws"), stream).expect("handshake");
    let welcome = ws.read().expect("welcome");
    assert!(matches!(welcome, Message::Text(_)), "{welcome:?}");
    ws
}

fn publish(ws: &mut tungstenite::WebSocket<std::net::TcpStream>, event: &Value) {
    let request = json!({"type": "publish", "channel": "events", "data": event});
    ws.send(Message::Text(request.to_string())).expect("send");
    let reply = match ws.read().expect("ack") {
        Message::Text(text) => serde_json::from_str::<Value>(&text).unwrap(),
        other => panic!("expected an ack, got {other:?}"),
    };
    assert_eq!(reply["type"], "ack", "{reply}");
}

/// Event `i` and whether it matches [`filters`].
fn event(i: u64) -> (Value, bool) {
    match i % 6 {
        0 => (
            json!({"type":"payment","seq":i,"from":"GABC","to":"GXYZ","asset_code":"USDC","amount":"100","memo":"café ☕"}),
            true,
        ),
        1 => (
            json!({"type":"payment","seq":i,"from":"GABC","asset_code":"USDC","amount":"99.9999999"}),
            false,
        ),
        2 => (
            json!({"type":"trade","seq":i,"buyer":"GABC","asset":{"code":"USDC","issuer":"GISSUER"},"amount":250.5,"price":{"n":1,"d":3}}),
            true,
        ),
        3 => (
            json!({"type":"payment","seq":i,"from":"GABC","asset_code":"EURC","amount":"1000"}),
            false,
        ),
        4 => (
            json!({"type":"contract_event","seq":i,"ledger":1454282,"contract_id":"CABC","topics":["transfer"],"data":{"amount":"500"},"asset_code":"USDC"}),
            false,
        ),
        _ => (
            json!({"type":"payment","seq":i,"destination":"GDEF","asset_code":"USDC","amount":"100.0000001"}),
            true,
        ),
    }
}

fn filters() -> Value {
    json!({"types":["payment","trade"],"account_ids":[],"asset_codes":["USDC"],"min_amount":"100"})
}

#[test]
fn a_websocket_client_consumer_receives_exactly_the_matching_events_in_order() {
    if skip() {
        return;
    }
    venv_python();
    let server = TestServer::start(&["--internal-listen", "127.0.0.1:0"]);
    let public = server.addrs[0];
    let internal = server.addrs[1];

    let events: Vec<(Value, bool)> = (0..300).map(event).collect();
    let want: Vec<Value> = events
        .iter()
        .filter(|(_, matches)| *matches)
        .map(|(event, _)| event.clone())
        .collect();
    let mut client = PythonClient::start(&format!("ws://{public}/ws"), &filters(), want.len());
    let first = client.line();
    assert_eq!(first, "REGISTERED", "stderr:\n{}", client.stderr());

    let mut ws = publisher(internal);
    for (event, _) in &events {
        publish(&mut ws, event);
    }

    let mut got = Vec::new();
    for _ in 0..want.len() {
        let line = client.line();
        let value: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        got.push(value);
    }
    assert_eq!(got, want);

    let status = client.child.wait_for(WAIT).unwrap_or_else(|| {
        panic!(
            "the Python client did not exit; stderr:\n{}",
            client.stderr()
        )
    });
    assert!(
        status.success(),
        "the Python client exited with {status}; stderr:\n{}",
        client.stderr()
    );
    // Nothing after the last expected event.
    let rest: Vec<String> = client.lines.try_iter().collect();
    assert!(rest.is_empty(), "extra output: {rest:?}");
}
