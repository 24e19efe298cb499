//! The real `fanout` binary: command line, config file, signals and
//! several listen addresses.

use crate::support::common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Runs the binary to completion (killing it after 10 s, which fails the
/// test) and returns its exit status, stdout and stderr.
fn run_to_exit(args: &[&str]) -> (ExitStatus, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fanout");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("fanout {args:?} did not exit within 10 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (status, out.join().unwrap(), err.join().unwrap())
}

/// The binary started with arbitrary flags (no implicit `--listen`),
/// reporting every `fanout listening on` line; killed on drop.
struct Spawned {
    child: Child,
    addrs: Vec<SocketAddr>,
}

impl Spawned {
    fn start(flags: &[&str], listeners: usize) -> Spawned {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fanout"))
            .args(flags)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn fanout");
        let stdout = child.stdout.take().unwrap();
        let rx = crate::support::child_lines::lines_of(stdout);
        let mut addrs = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while addrs.len() < listeners {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).unwrap_or_else(|_| {
                let _ = child.kill();
                panic!(
                    "fanout printed {} of {listeners} listening lines",
                    addrs.len()
                )
            });
            let addr = line
                .strip_prefix("fanout listening on ws://")
                .unwrap_or_else(|| panic!("unexpected stdout line: {line}"))
                .parse()
                .unwrap();
            addrs.push(addr);
        }
        Spawned { child, addrs }
    }

    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "fanout did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn temp_config(contents: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fanout.toml");
    std::fs::write(&path, contents).unwrap();
    let path = path.display().to_string();
    (dir, path)
}

/// Sends the standard upgrade request and returns the status code.
fn handshake_status(addr: SocketAddr) -> (u16, TcpStream) {
    let mut stream = connect_tcp(addr);
    stream.write_all(UPGRADE_HEAD.as_bytes()).unwrap();
    let head = read_http_head(&mut stream);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, stream)
}

fn assert_echo(stream: &mut TcpStream, text: &str) {
    stream
        .write_all(&client_frame(0x81, text.as_bytes()))
        .unwrap();
    let frame = read_frame(stream).expect("echo reply");
    assert_eq!(
        (frame.opcode(), frame.payload.as_slice()),
        (1, text.as_bytes())
    );
}

#[test]
fn help_lists_every_flag_and_defaults() {
    let (status, out, err) = run_to_exit(&["--help"]);
    assert_eq!(status.code(), Some(0), "stdout: {out}\nstderr: {err}");
    // Help that was asked for is output, not an error: stdout.
    let help = out;
    for flag in [
        "--config",
        "--listen",
        "--max-connections",
        "--max-pending-handshakes",
        "--max-header-bytes",
        "--handshake-timeout",
        "--max-message-size",
        "--max-frame-size",
        "--max-outbound-buffer",
        "--max-pending-states",
        "--ping-interval",
        "--idle-timeout",
        "--close-timeout",
        "--shutdown-grace",
        "--allowed-origin",
        "--subprotocol",
        "--read-buffer-size",
        "--help",
        "--version",
    ] {
        assert!(
            help.contains(flag),
            "--help does not mention {flag}:\n{help}"
        );
    }
    for default in [
        "16MiB",
        "30s",
        "90s",
        "8KiB",
        "10s",
        "1MiB",
        "256KiB",
        "0.0.0.0:8080",
        "100000",
    ] {
        assert!(
            help.contains(default),
            "--help does not show the default {default}:\n{help}"
        );
    }

    let (status, out, err) = run_to_exit(&["--version"]);
    assert_eq!(status.code(), Some(0), "stdout: {out}\nstderr: {err}");
    assert!(
        out.contains(env!("CARGO_PKG_VERSION")),
        "stdout: {out}\nstderr: {err}"
    );
}

#[test]
fn unknown_flag_exits_2_with_a_message() {
    let (status, out, err) = run_to_exit(&["--listen", "127.0.0.1:0", "--max-conections", "5"]);
    assert_eq!(status.code(), Some(2), "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains("--max-conections"),
        "the message names the flag: {err}"
    );
    assert!(out.is_empty(), "nothing on stdout: {out}");
}

#[test]
fn bad_values_name_the_flag() {
    for (flag, value) in [
        ("--max-message-size", "12 parsecs"),
        ("--max-header-bytes", "lots"),
        ("--handshake-timeout", "soon"),
        ("--max-connections", "many"),
        ("--listen", "not-an-address"),
    ] {
        let (status, out, err) = run_to_exit(&["--listen", "127.0.0.1:0", flag, value]);
        assert_eq!(
            status.code(),
            Some(2),
            "{flag} {value}: stdout: {out}\nstderr: {err}"
        );
        assert!(
            err.contains(flag),
            "the message for {flag} {value} names the flag: {err}"
        );
    }
}

#[test]
fn values_that_parse_but_make_no_sense_are_refused_naming_the_flag() {
    for (flag, value) in [
        ("--read-buffer-size", "1KiB"),
        ("--socket-send-buffer", "1KiB"),
        // A switch: no value.
        ("--metrics-internal-only", ""),
        ("--idle-timeout", "0s"),
        ("--handshake-timeout", "0ms"),
    ] {
        let mut args = vec!["--listen", "127.0.0.1:0", flag, value];
        args.retain(|a| !a.is_empty());
        let (status, out, err) = run_to_exit(&args);
        assert_eq!(
            status.code(),
            Some(2),
            "{flag} {value} must be refused as a usage error: stdout: {out}\nstderr: {err}"
        );
        assert!(
            err.contains(flag),
            "the message for {flag} {value} names the flag: {err}"
        );
        assert!(!out.contains("listening"), "must not start serving: {out}");
    }
}

#[test]
fn config_file_with_an_unknown_key_exits_2_naming_key_and_file() {
    let (_dir, path) = temp_config("max-connections = 5\nmax-conections = 7\n");
    let (status, out, err) = run_to_exit(&["--listen", "127.0.0.1:0", "--config", &path]);
    assert_eq!(status.code(), Some(2), "stdout: {out}\nstderr: {err}");
    assert!(err.contains("max-conections"), "names the key: {err}");
    assert!(err.contains(&path), "names the file: {err}");

    let (status, _, err) = run_to_exit(&[
        "--listen",
        "127.0.0.1:0",
        "--config",
        "/nonexistent/fanout.toml",
    ]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("/nonexistent/fanout.toml"), "{err}");
}

#[test]
fn config_file_with_a_bad_value_exits_2_naming_key_and_file() {
    let (_dir, path) = temp_config("max-connections = \"lots\"\n");
    let (status, out, err) = run_to_exit(&["--listen", "127.0.0.1:0", "--config", &path]);
    assert_eq!(status.code(), Some(2), "stdout: {out}\nstderr: {err}");
    assert!(err.contains("max-connections"), "names the key: {err}");
    assert!(err.contains(&path), "names the file: {err}");

    // A single-valued option given as a list.
    let (_dir, path) = temp_config("max-connections = [1, 2]\n");
    let (status, _, err) = run_to_exit(&["--listen", "127.0.0.1:0", "--config", &path]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("max-connections"), "names the key: {err}");
    assert!(err.contains(&path), "names the file: {err}");

    let (_dir, path) = temp_config("this is not toml\n");
    let (status, _, err) = run_to_exit(&["--listen", "127.0.0.1:0", "--config", &path]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains(&path), "names the file: {err}");
}

#[test]
fn config_file_applies_and_flags_override_it() {
    let (_dir, path) = temp_config("max-connections = 1\nhandshake-timeout = \"5s\"\n");
    let server = ServerProcess::start(&["--config", &path]);
    let (status, mut first) = handshake_status(server.addr);
    assert_eq!(status, 101);
    assert_echo(&mut first, "only one");
    let (status, _) = handshake_status(server.addr);
    assert_eq!(status, 503, "max-connections = 1 from the file must apply");
    drop(server);

    let server = ServerProcess::start(&["--config", &path, "--max-connections", "2"]);
    let (status, mut first) = handshake_status(server.addr);
    assert_eq!(status, 101);
    let (status, mut second) = handshake_status(server.addr);
    assert_eq!(
        status, 101,
        "--max-connections 2 on the command line must win over the file"
    );
    assert_echo(&mut first, "one");
    assert_echo(&mut second, "two");
    let (status, _) = handshake_status(server.addr);
    assert_eq!(status, 503);
}

/// Opens `n` raw WebSockets, each proven live by an echo.
fn open_clients(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut stream = raw_upgrade(addr);
            assert_echo(&mut stream, &format!("client {i}"));
            stream
        })
        .collect()
}

fn graceful_shutdown_on(signal: i32) {
    let mut server = ServerProcess::start(&["--shutdown-grace", "10s"]);
    let mut clients = open_clients(server.addr, 3);
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    unsafe { libc::kill(server.child.id() as i32, signal) };
    let started = Instant::now();
    for client in &mut clients {
        let close = read_until_close(client);
        assert_eq!(close.close_code(), Some(1001), "{close:?}");
        assert_eq!(close.close_reason(), "server shutting down");
        client
            .write_all(&client_frame(0x88, &1001u16.to_be_bytes()))
            .unwrap();
    }
    for client in &mut clients {
        assert!(
            wait_for_eof(client, Duration::from_secs(3)),
            "server did not close TCP after the close handshake"
        );
    }
    // Signal 0 sends nothing: this only waits (at most 10 s) for the exit.
    let status = server.signal_and_wait(0);
    let elapsed = started.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after signal {signal}: {status:?}"
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "exit took {elapsed:?}; grace is 10s but every client answered"
    );
}

#[test]
fn sigterm_closes_every_websocket_with_1001_and_exits_0() {
    graceful_shutdown_on(libc::SIGTERM);
}

#[test]
fn sigint_closes_every_websocket_with_1001_and_exits_0() {
    graceful_shutdown_on(libc::SIGINT);
}

/// /echo streams a large message back while it arrives, so a shutdown can
/// come while the echo frame is half written: the 1001 close must wait for
/// the frame's end (a close inside a frame's payload would corrupt it), and
/// the client still gets its whole message back first.
#[test]
fn shutdown_during_a_streamed_echo_finishes_the_frame_before_the_close() {
    let mut server = ServerProcess::start(&["--shutdown-grace", "10s"]);
    let mut client = raw_upgrade(server.addr);
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // Well over one read buffer (256 KiB), so it is streamed.
    let payload: Vec<u8> = (0..2u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let frame = client_frame(0x82, &payload);
    let mut reader = client.try_clone().unwrap();
    let frames = std::thread::spawn(move || {
        let echo = read_frame(&mut reader).expect("the echo");
        let close = read_until_close(&mut reader);
        (echo, close)
    });
    let half = frame.len() / 2;
    client.write_all(&frame[..half]).unwrap();
    // Let the server take in and start echoing the first half.
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(200));
    client.write_all(&frame[half..]).unwrap();

    let (echo, close) = frames.join().unwrap();
    assert_eq!(echo.b0, 0x82, "one final binary frame");
    assert!(echo.payload == payload, "the echo differs from the message");
    assert_eq!(
        (close.close_code(), close.close_reason().as_str()),
        (Some(1001), "server shutting down")
    );
    client
        .write_all(&client_frame(0x88, &1001u16.to_be_bytes()))
        .unwrap();
    // Signal 0 sends nothing: this only waits (at most 10 s) for the exit.
    assert_eq!(server.signal_and_wait(0).code(), Some(0));
}

#[test]
fn shutdown_exits_0_after_the_grace_period_when_a_client_never_answers() {
    let mut server = ServerProcess::start(&["--shutdown-grace", "500ms"]);
    let mut clients = open_clients(server.addr, 2);
    // A connection still in its handshake must not hold up the exit either.
    let mut pending = connect_tcp(server.addr);
    pending.write_all(&UPGRADE_HEAD.as_bytes()[..20]).unwrap();
    std::thread::sleep(Duration::from_millis(50));

    let started = Instant::now();
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    for client in &mut clients {
        let close = read_until_close(client);
        assert_eq!(
            (close.close_code(), close.close_reason().as_str()),
            (Some(1001), "server shutting down")
        );
    }
    // Nobody answers; the process must still exit.
    // Signal 0 sends nothing: this only waits (at most 10 s) for the exit.
    let status = server.signal_and_wait(0);
    let elapsed = started.elapsed();
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(
        elapsed >= Duration::from_millis(400),
        "exited before the grace period: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(4),
        "exit took {elapsed:?} with a 500ms grace"
    );
    for client in &mut clients {
        assert!(wait_for_eof(client, Duration::from_secs(2)));
    }
    assert!(wait_for_eof(&mut pending, Duration::from_secs(2)));
}

#[test]
fn shutdown_with_no_clients_is_immediate() {
    let mut server = ServerProcess::start(&["--shutdown-grace", "10s"]);
    let started = Instant::now();
    let status = server.signal_and_wait(libc::SIGTERM);
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn two_listen_addresses_both_serve() {
    let mut server = Spawned::start(&["--listen", "127.0.0.1:0", "--listen", "127.0.0.1:0"], 2);
    assert_eq!(server.addrs.len(), 2);
    assert_ne!(server.addrs[0], server.addrs[1]);
    for (i, addr) in server.addrs.clone().into_iter().enumerate() {
        assert!(addr.ip().is_loopback(), "{addr}");
        let mut ws = raw_upgrade(addr);
        assert_echo(&mut ws, &format!("via listener {i}"));
        let mut health = connect_tcp(addr);
        health
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        let _ = health.read_to_string(&mut response);
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    }
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    assert_eq!(server.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

/// The start-up log says which listener is public and which internal,
/// where the page is, and warns when a listener is open to the network.
#[test]
fn start_up_says_what_each_listener_is_for() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args([
            "--listen",
            "0.0.0.0:0",
            "--internal-listen",
            "127.0.0.1:0",
            "--no-sim",
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fanout");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut public, mut internal) = (None, None);
    while public.is_none() || internal.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no listener lines within 10 s (public {public:?}, internal {internal:?})");
        };
        if line.contains("public listener ws://0.0.0.0:") {
            public = Some(line);
        } else if line.contains("internal listener ws://127.0.0.1:") {
            internal = Some(line);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let public = public.unwrap();
    assert!(public.contains("WARN"), "{public}");
    assert!(public.contains("the page at http://0.0.0.0:"), "{public}");
    assert!(public.contains("reachable from the network"), "{public}");
    let internal = internal.unwrap();
    assert!(internal.contains("trusted publishers"), "{internal}");
    assert!(
        !internal.contains("reachable from the network"),
        "{internal}"
    );
}

/// An address another process holds: without `--reuse-port` the second
/// process exits 1 saying which address and why; asking for it alone is
/// not enough (the holder must have asked too); when both ask, both start
/// on the one address and connections to it are served.
#[test]
fn a_second_process_on_the_same_address_needs_reuse_port_in_both() {
    let holder = Spawned::start(&["--listen", "127.0.0.1:0", "--no-sim"], 1);
    let taken = holder.addrs[0].to_string();
    let (status, out, err) = run_to_exit(&["--listen", &taken, "--no-sim"]);
    assert_eq!(status.code(), Some(1), "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains(&format!("fanout: cannot listen on {taken}: ")),
        "{err}"
    );
    assert!(err.contains("another socket holds it"), "{err}");
    assert!(err.contains("runs with --reuse-port"), "{err}");
    assert!(!out.contains("listening"), "must not start serving: {out}");
    let (status, out, err) = run_to_exit(&["--listen", &taken, "--no-sim", "--reuse-port"]);
    assert_eq!(status.code(), Some(1), "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains(&format!("cannot listen on {taken}: ")),
        "{err}"
    );
    assert!(err.contains("bound without SO_REUSEPORT"), "{err}");
    drop(holder);

    let first = Spawned::start(&["--listen", "127.0.0.1:0", "--no-sim", "--reuse-port"], 1);
    let shared = first.addrs[0].to_string();
    let second = Spawned::start(&["--listen", &shared, "--no-sim", "--reuse-port"], 1);
    assert_eq!(first.addrs, second.addrs);
    for i in 0..8 {
        let mut ws = raw_upgrade(first.addrs[0]);
        assert_echo(&mut ws, &format!("shared port, connection {i}"));
    }
}
