//! Every example in README.md, run as written against a server started as
//! the README says, with the README's own output checked.
//!
//! How the README is read:
//! - A `sh` block is run line by line (continuations joined) in a scratch
//!   directory whose `bin/` (first on `PATH`) holds the built `fanout` and
//!   the suite's `websocat`. `websocat URL` without a pipe starts an
//!   interactive session: every later line of its block is typed into it.
//!   `fanout` and `redis-server` start servers that live until the next
//!   `##` section; a command ending in `&` runs beside the rest; any other
//!   command must exit 0. The few lines that cannot run here are in
//!   [`NOT_RUN`] with the reason.
//! - A `text` block that follows is what the user sees: after each
//!   `$ websocat URL` line come lines that session must print, in order
//!   (other lines may come between); `…` stands for any text. A session
//!   must answer (no silence) and must print no `error` reply.
//! - A `toml` block whose first line is `# NAME` is written to that file.
//! - Ports: a section that starts its own servers gets a fresh loopback
//!   port for every port it names; elsewhere `8080` is the default
//!   server's public listener and `9090` its internal one (started with
//!   those two listeners on free ports, every other setting default: the
//!   simulator on).
//!
//! Each wait is bounded, and every child is killed and reaped when its
//! section ends. Needs websocat (`FANOUT_SKIP_WEBSOCAT=1` skips this test)
//! and, for the section on several nodes, redis-server (`FANOUT_SKIP_REDIS=1`
//! skips that section).

use crate::support::bounded::run_bounded;
use crate::support::common::ServerProcess;
use crate::support::external::WEBSOCAT;
use crate::support::redis_server;

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// README lines that are not run, each with the reason.
const NOT_RUN: &[(&str, &str)] = &[
    (
        "cargo run --release",
        "the test starts the binary this builds, with the same defaults, on free loopback ports",
    ),
    (
        "cargo test --release",
        "it runs the suite this test belongs to",
    ),
    (
        "cargo install --path .",
        "installs into ~/.cargo/bin; the test puts the binary it built on PATH instead",
    ),
    (
        "cargo install websocat",
        "installs into ~/.cargo/bin; the test puts the suite's websocat on PATH instead",
    ),
];

/// The longest wait for one expected line (the registration example waits
/// for a random simulated payment).
const LINE_WAIT: Duration = Duration::from_secs(30);

/// How long a session gets to answer what was typed into it.
const SETTLE_WAIT: Duration = Duration::from_secs(10);

/// The longest a foreground command may run.
const COMMAND_WAIT: Duration = Duration::from_secs(60);

/// The longest a server gets to open its ports.
const SERVER_WAIT: Duration = Duration::from_secs(20);

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md")
}

/// A fenced code block, with the `##` section it is in.
#[derive(Debug)]
struct Block {
    lang: String,
    lines: Vec<String>,
    section: String,
    /// 1-based line of the opening fence, for messages.
    at: usize,
}

fn blocks(text: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut section = String::new();
    let mut open: Option<Block> = None;
    for (i, line) in text.lines().enumerate() {
        match open.as_mut() {
            Some(_) if line.trim_start().starts_with("```") => out.push(open.take().unwrap()),
            Some(block) => block.lines.push(line.to_owned()),
            None if line.starts_with("```") => {
                open = Some(Block {
                    lang: line.trim_start_matches('`').trim().to_owned(),
                    lines: Vec::new(),
                    section: section.clone(),
                    at: i + 1,
                })
            }
            None if line.starts_with("## ") => section = line[3..].to_owned(),
            None => {}
        }
    }
    assert!(open.is_none(), "README.md ends inside a code block");
    out
}

/// The commands of a `sh` block: comments and blank lines dropped,
/// backslash continuations joined.
fn commands(block: &Block) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for line in &block.lines {
        let trimmed = line.trim();
        if pending.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            pending.push_str(head.trim_end());
            pending.push(' ');
            continue;
        }
        pending.push_str(trimmed);
        out.push(std::mem::take(&mut pending));
    }
    out
}

/// Where ports are written (`127.0.0.1:N`, `localhost:N` or `--port N`):
/// the byte range of each number, in order.
fn port_spans(text: &str) -> Vec<std::ops::Range<usize>> {
    let mut spans = Vec::new();
    for prefix in ["127.0.0.1:", "localhost:", "--port "] {
        for (at, _) in text.match_indices(prefix) {
            let start = at + prefix.len();
            let len = text[start..].bytes().take_while(u8::is_ascii_digit).count();
            if len > 0 {
                spans.push(start..start + len);
            }
        }
    }
    spans.sort_by_key(|span| span.start);
    spans
}

/// Port numbers written as `127.0.0.1:N`, `localhost:N` or `--port N`.
fn ports_in(text: &str) -> Vec<u16> {
    port_spans(text)
        .into_iter()
        .filter_map(|span| text[span].parse().ok())
        .collect()
}

fn rewrite_ports(text: &str, map: &HashMap<u16, u16>) -> String {
    let mut out = String::new();
    let mut done = 0;
    for span in port_spans(text) {
        let digits = &text[span.clone()];
        let Some(port) = digits.parse::<u16>().ok().and_then(|p| map.get(&p)) else {
            panic!("port {digits} in {text:?} has no mapping");
        };
        out.push_str(&text[done..span.start]);
        out.push_str(&port.to_string());
        done = span.end;
    }
    out.push_str(&text[done..]);
    out
}

/// Does `actual` look like `expected`, where `…` stands for any text?
fn matches(expected: &str, actual: &str) -> bool {
    let parts: Vec<&str> = expected.split('…').collect();
    if parts.len() == 1 {
        return expected == actual;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !actual.starts_with(first) || !actual[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &actual[first.len()..actual.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// A websocat the README started: what was typed, what it printed.
struct Session {
    /// The command as the README wrote it (before port rewriting).
    written: String,
    child: Child,
    _stdin: ChildStdin,
    lines: Receiver<String>,
    seen: Vec<String>,
    /// How many of `seen` the expected lines have consumed.
    checked: usize,
}

impl Session {
    fn start(written: &str, run: &str, env_path: &str, dir: &Path, input: &[String]) -> Session {
        let args: Vec<&str> = run.split_whitespace().collect();
        let mut child = Command::new(args[0])
            .args(&args[1..])
            .env("PATH", env_path)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start {run}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let lines = crate::support::child_lines::lines_of(stdout);
        let mut stdin = child.stdin.take().unwrap();
        for line in input {
            writeln!(stdin, "{line}").expect("type into websocat");
        }
        stdin.flush().unwrap();
        let mut session = Session {
            written: written.to_owned(),
            child,
            _stdin: stdin,
            lines,
            seen: Vec::new(),
            checked: 0,
        };
        session.settle(input.len() + 1);
        session
    }

    /// Waits until the session printed `count` lines: the server answered
    /// what was typed (a `/ws` greeting plus one reply per request; the
    /// `/chat` greeting alone is several lines).
    fn settle(&mut self, count: usize) {
        let deadline = Instant::now() + SETTLE_WAIT;
        while self.seen.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!(
                    "`{}` printed {} line(s) within {SETTLE_WAIT:?}, fewer than it was asked for ({count}): {:?}",
                    self.written,
                    self.seen.len(),
                    self.seen
                ),
            }
        }
    }

    /// Consumes printed lines until one looks like `expected`.
    fn expect(&mut self, expected: &str) {
        let deadline = Instant::now() + LINE_WAIT;
        loop {
            if let Some(found) = self.seen[self.checked..]
                .iter()
                .position(|line| matches(expected, line))
            {
                self.checked += found + 1;
                return;
            }
            self.checked = self.seen.len();
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(RecvTimeoutError::Timeout) => panic!(
                    "`{}` printed no line like\n  {expected}\nwithin {LINE_WAIT:?}; it printed:\n  {}",
                    self.written,
                    self.seen.join("\n  ")
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "`{}` ended before a line like\n  {expected}\nit printed:\n  {}",
                    self.written,
                    self.seen.join("\n  ")
                ),
            }
        }
    }

    /// No reply of the session was an error.
    fn assert_no_error(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        for line in &self.seen {
            assert!(
                !line.starts_with("{\"type\":\"error\"") && !line.starts_with("! "),
                "`{}` got an error: {line}",
                self.written
            );
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server a section started (fanout or redis-server), killed on drop.
struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Everything one `##` section started.
struct Section {
    dir: tempfile::TempDir,
    ports: HashMap<u16, u16>,
    servers: Vec<Background>,
    sessions: Vec<Session>,
}

struct Runner {
    path: String,
    /// The default server: public, internal.
    defaults: (SocketAddr, SocketAddr),
    redis_skipped: bool,
}

impl Runner {
    fn section(&self, blocks: &[&Block]) -> Section {
        let starts_servers = blocks.iter().any(|b| {
            b.lang == "sh"
                && commands(b)
                    .iter()
                    .any(|c| c.starts_with("fanout ") || c.starts_with("redis-server "))
        });
        let mut ports = HashMap::new();
        if starts_servers {
            for block in blocks {
                for port in ports_in(&block.lines.join("\n")) {
                    ports.entry(port).or_insert_with(redis_server::free_port);
                }
            }
        } else {
            ports.insert(8080, self.defaults.0.port());
            ports.insert(9090, self.defaults.1.port());
        }
        Section {
            dir: tempfile::tempdir().expect("scratch directory"),
            ports,
            servers: Vec::new(),
            sessions: Vec::new(),
        }
    }

    fn run_sh(&self, section: &mut Section, block: &Block) {
        let commands = commands(block);
        let mut i = 0;
        while i < commands.len() {
            let written = &commands[i];
            i += 1;
            if NOT_RUN.iter().any(|(line, _)| line == written) {
                continue;
            }
            let command = rewrite_ports(written, &section.ports);
            let (command, beside) = match command.strip_suffix('&') {
                Some(head) => (head.trim_end().to_owned(), true),
                None => (command, false),
            };
            // A server runs until the section ends, `&` or not.
            if command.starts_with("fanout ") || command.starts_with("redis-server ") {
                self.start_server(section, written, &command);
            } else if command.starts_with("websocat ") && !command.contains('|') {
                // The rest of the block is typed into it.
                let input = commands[i..].to_vec();
                i = commands.len();
                let session =
                    Session::start(written, &command, &self.path, section.dir.path(), &input);
                section.sessions.push(session);
            } else {
                assert!(
                    !beside,
                    "line {}: only servers run beside the rest: {written}",
                    block.at
                );
                self.run_to_end(section, written, &command);
            }
        }
    }

    fn start_server(&self, section: &mut Section, written: &str, command: &str) {
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("exec {command}"))
            .env("PATH", &self.path)
            .env("RUST_LOG", "warn")
            .current_dir(section.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start {command}: {e}"));
        section.servers.push(Background(child));
        // Its ports: on its command line, or in a file it names (a config).
        let mut ports = ports_in(command);
        for word in command.split_whitespace() {
            if let Ok(text) = std::fs::read_to_string(section.dir.path().join(word)) {
                ports.extend(ports_in(&text));
            }
        }
        assert!(!ports.is_empty(), "no port to wait for in {written}");
        let deadline = Instant::now() + SERVER_WAIT;
        for port in ports {
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                let server = &mut section.servers.last_mut().unwrap().0;
                if let Ok(Some(status)) = server.try_wait() {
                    panic!("`{written}` exited with {status} before opening port {port}");
                }
                assert!(
                    Instant::now() < deadline,
                    "`{written}` did not open port {port} within {SERVER_WAIT:?}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn run_to_end(&self, section: &Section, written: &str, command: &str) {
        let result = run_bounded(
            Command::new("sh")
                .arg("-c")
                .arg(command)
                .env("PATH", &self.path)
                .current_dir(section.dir.path())
                .stdin(Stdio::null()),
            COMMAND_WAIT,
        );
        if let Err(e) = result {
            panic!("`{written}`: {e}");
        }
    }

    fn check_output(&self, section: &mut Section, block: &Block) {
        let mut current: Option<usize> = None;
        for line in &block.lines {
            if let Some(command) = line.strip_prefix("$ ") {
                let at = section
                    .sessions
                    .iter()
                    .rposition(|s| s.written == command)
                    .unwrap_or_else(|| {
                        panic!(
                            "line {}: output of `{command}`, which no example in this section started",
                            block.at
                        )
                    });
                current = Some(at);
                continue;
            }
            let at = current.unwrap_or_else(|| {
                panic!("line {}: a text block starts with `$ COMMAND`", block.at)
            });
            section.sessions[at].expect(line);
        }
    }
}

#[test]
fn every_readme_example_runs_as_written() {
    if WEBSOCAT.skipped() {
        return;
    }
    let websocat = crate::websocat::websocat();
    let text = readme();
    let blocks = blocks(&text);
    for (line, why) in NOT_RUN {
        assert!(
            blocks
                .iter()
                .filter(|b| b.lang == "sh")
                .any(|b| commands(b).iter().any(|c| c == line)),
            "NOT_RUN lists `{line}` ({why}), which the README no longer has"
        );
    }

    // `fanout` and `websocat` on PATH, as the README's set-up tells users.
    let bin = tempfile::tempdir().expect("bin directory");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_fanout"), bin.path().join("fanout")).unwrap();
    std::os::unix::fs::symlink(websocat, bin.path().join("websocat")).unwrap();
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );

    // The default server: `cargo run --release`, on free loopback ports.
    let server = ServerProcess::start(&["--internal-listen", "127.0.0.1:0"]);
    let runner = Runner {
        path,
        defaults: (server.addrs[0], server.addrs[1]),
        redis_skipped: redis_server::skipped(),
    };

    let mut ran = 0;
    let mut checked = 0;
    let mut by_section: Vec<(String, Vec<&Block>)> = Vec::new();
    for block in &blocks {
        match by_section.last_mut() {
            Some((name, list)) if *name == block.section => list.push(block),
            _ => by_section.push((block.section.clone(), vec![block])),
        }
    }
    for (name, list) in &by_section {
        let needs_redis = list
            .iter()
            .any(|b| b.lang == "sh" && commands(b).iter().any(|c| c.starts_with("redis-server")));
        if needs_redis {
            if runner.redis_skipped {
                continue;
            }
            redis_server::ensure_installed();
        }
        let mut section = runner.section(list);
        for block in list {
            match block.lang.as_str() {
                "sh" => runner.run_sh(&mut section, block),
                "text" => {
                    runner.check_output(&mut section, block);
                    checked += block.lines.len();
                }
                "toml" => {
                    let name = block
                        .lines
                        .first()
                        .and_then(|l| l.strip_prefix("# "))
                        .unwrap_or_else(|| {
                            panic!("line {}: a toml block starts with `# FILE`", block.at)
                        });
                    let body = rewrite_ports(&block.lines.join("\n"), &section.ports);
                    std::fs::write(section.dir.path().join(name), body).unwrap();
                }
                other => panic!(
                    "line {}: no rule to run a `{other}` block (section {name})",
                    block.at
                ),
            }
            ran += 1;
        }
        for session in &mut section.sessions {
            session.assert_no_error();
        }
        println!(
            "README section {name:?}: {} block(s), {} server(s), {} websocat session(s)",
            list.len(),
            section.servers.len(),
            section.sessions.len()
        );
    }
    println!("{ran} README blocks run, {checked} output lines checked");
    assert!(ran >= 10, "only {ran} README blocks found");
    drop(server);
}

#[test]
fn the_output_pattern_matches_as_documented() {
    assert!(matches("abc", "abc"));
    assert!(!matches("abc", "abcd"));
    assert!(matches("{\"a\":…,\"b\":2}", "{\"a\":[1,2],\"b\":2}"));
    assert!(!matches("{\"a\":…,\"b\":2}", "{\"a\":1,\"b\":3}"));
    assert!(matches("x…y…z", "x1y2z"));
    assert!(!matches("x…y…z", "x1z"));
    assert!(matches("…e-8", "2.9e-8"));
    let map = HashMap::from([(8080, 1), (6379, 2)]);
    assert_eq!(
        rewrite_ports(
            "ws://127.0.0.1:8080/ws --port 6379 redis://127.0.0.1:6379",
            &map
        ),
        "ws://127.0.0.1:1/ws --port 2 redis://127.0.0.1:2"
    );
}
