//! The server out of file descriptors: accepting pauses instead of
//! spinning or crashing, and resumes when descriptors free up.

use crate::support::common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Descriptors the server process may hold: stdio, epoll, waker, signal
/// pipe and listener take about 8, leaving room for roughly 20 clients.
const FD_LIMIT: u64 = 28;

/// Kills and reaps the server even when an assertion fails.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_with_fd_limit() -> (Reaped, SocketAddr) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fanout"));
    command
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: setrlimit is async-signal-safe and touches only this child.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: FD_LIMIT,
                rlim_max: FD_LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().expect("spawn fanout");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("fanout listening on ws://")
        .expect("listening line")
        .parse()
        .unwrap();
    (Reaped(child), addr)
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the full line.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn echo_once(stream: &mut TcpStream) {
    stream
        .write_all(&client_frame(0x81, b"still here"))
        .unwrap();
    let frame = read_frame(stream).expect("echo");
    assert_eq!(frame.payload, b"still here");
}

#[test]
fn out_of_descriptors_pauses_accepting_and_recovers() {
    let (child, addr) = spawn_with_fd_limit();
    let pid = child.0.id();
    let mut upgraded: Vec<TcpStream> = Vec::new();
    // Fill the descriptor table with upgraded connections.
    for _ in 0..FD_LIMIT {
        let mut stream = connect_tcp(addr);
        stream.write_all(UPGRADE_HEAD.as_bytes()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut head = [0u8; 12];
        match stream.read_exact(&mut head) {
            Ok(()) => {
                assert_eq!(&head, b"HTTP/1.1 101");
                let _ = read_http_head_rest(&mut stream);
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                upgraded.push(stream);
            }
            // Not accepted: the server is out of descriptors. Keep it waiting
            // in the backlog.
            Err(_) => {
                upgraded.push(stream);
                break;
            }
        }
    }
    let waiting = upgraded.pop().unwrap();
    assert!(
        upgraded.len() >= 5,
        "only {} connections before exhaustion",
        upgraded.len()
    );

    // While out of descriptors the server neither spins nor stops serving
    // the connections it has. 2 s of a spinning loop would be ~200 ticks.
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - before;
    assert!(
        used < 50,
        "server used {used} clock ticks in 2 s while out of descriptors"
    );
    echo_once(&mut upgraded[0]);

    // Free descriptors: the waiting connection is accepted and upgraded.
    for stream in upgraded.drain(2..) {
        drop(stream);
    }
    let mut waiting = waiting;
    waiting
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let head = read_http_head(&mut waiting);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    echo_once(&mut waiting);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut fresh = loop {
        let mut stream = connect_tcp(addr);
        stream.write_all(UPGRADE_HEAD.as_bytes()).unwrap();
        let head = read_http_head(&mut stream);
        if head.starts_with("HTTP/1.1 101") {
            break stream;
        }
        assert!(
            Instant::now() < deadline,
            "no new connection accepted after freeing descriptors"
        );
    };
    echo_once(&mut fresh);
}

fn read_http_head_rest(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
        if stream.read(&mut byte).unwrap_or(0) == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}
