//! The README's chat sessions with the real `websocat` (1.14.1, built from
//! crates.io into target/websocat on first use by `tests/websocat/install.sh`):
//! two people talking on `/chat` by typing lines, and a session over
//! `wss://` with `--insecure` against a certificate made at test time.
//!
//! Each websocat is a child process fed through its stdin; its stdout is
//! read line by line on a thread. Every wait has a deadline, and every child
//! is killed and reaped when its session is dropped. Set
//! `FANOUT_SKIP_WEBSOCAT=1` to skip on a machine that cannot build it (no
//! access to crates.io); the build says so on stderr when it starts
//! (`support::external`).

use crate::support::external::{in_place, WEBSOCAT};
use crate::support::{bounded, common, tls};

use std::io::Write;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bounded::run_bounded;
use common::TestServer;
use tls::TestCert;

/// The longest wait for one expected line.
const LINE_WAIT: Duration = Duration::from_secs(10);

/// The longest wait for websocat to be built (first use only).
const INSTALL_WAIT: Duration = Duration::from_secs(1200);

fn skipped() -> bool {
    WEBSOCAT.skipped()
}

/// websocat's path, building it the first time (once per test binary).
pub(crate) fn websocat() -> &'static str {
    static PATH: OnceLock<Result<String, String>> = OnceLock::new();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/websocat/install.sh");
    // Building it takes about a minute; a stuck download must not hang the
    // suite.
    let path = PATH.get_or_init(|| {
        if !in_place(Command::new("sh").arg(script).arg("--check")) {
            WEBSOCAT.announce_install();
        }
        run_bounded(Command::new("sh").arg(script), INSTALL_WAIT)
    });
    match path {
        Ok(path) => path,
        Err(e) => panic!("websocat is not available: {e}"),
    }
}

/// One websocat child: lines typed into its stdin, lines it printed.
struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Everything printed so far, for failure messages.
    seen: Vec<String>,
}

impl Session {
    fn start(args: &[&str]) -> Session {
        let mut child = Command::new(websocat())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn websocat");
        let stdout = child.stdout.take().unwrap();
        let lines = crate::support::child_lines::lines_of(stdout);
        Session {
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Types `line` and presses enter.
    fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{line}").expect("write to websocat");
        stdin.flush().unwrap();
    }

    /// Waits for a printed line that `wanted` accepts; returns it.
    fn expect_where(&mut self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + LINE_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if wanted(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no line {what} within {LINE_WAIT:?}; printed: {:?}",
                        self.seen
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "websocat ended before a line {what}; printed: {:?}",
                        self.seen
                    )
                }
            }
        }
    }

    fn expect(&mut self, line: &str) {
        self.expect_where(&format!("{line:?}"), |l| l == line);
    }

    /// Ends input as a user's Ctrl-D does: websocat closes the connection
    /// and exits; returns whether it did so in time.
    fn hang_up(&mut self) -> bool {
        drop(self.stdin.take());
        let deadline = Instant::now() + LINE_WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The greeting a new session gets; returns its guest nick.
fn greeted(session: &mut Session) -> String {
    let welcome = session.expect_where("with the welcome", |l| {
        l.starts_with("* welcome to fanout chat: you are ")
    });
    let nick = welcome
        .strip_prefix("* welcome to fanout chat: you are ")
        .and_then(|rest| rest.split_whitespace().next())
        .expect("a nick in the welcome")
        .to_owned();
    session.expect(&format!("* joined [lobby] as {nick}; last 0 message(s):"));
    session.expect(&format!("[lobby] * {nick} joined"));
    nick
}

#[test]
fn two_websocat_sessions_chat_as_the_readme_shows() {
    if skipped() {
        return;
    }
    let server = TestServer::start(&[]);
    let url = server.url("/chat");
    let mut ada = Session::start(&[&url]);
    assert_eq!(greeted(&mut ada), "guest-1");
    ada.type_line("/nick ada");
    ada.expect("[lobby] * guest-1 is now known as ada");

    let mut bob = Session::start(&[&url]);
    assert_eq!(greeted(&mut bob), "guest-2");
    ada.expect("[lobby] * guest-2 joined");
    bob.type_line("/nick bob");
    for s in [&mut ada, &mut bob] {
        s.expect("[lobby] * guest-2 is now known as bob");
    }

    // websocat sends each typed line with its newline; nobody sees it.
    ada.type_line("hello");
    for s in [&mut ada, &mut bob] {
        s.expect("[lobby] ada: hello");
    }
    bob.type_line("/me waves");
    for s in [&mut ada, &mut bob] {
        s.expect("[lobby] * bob waves");
    }
    // An error is a line for the one who typed it, never a disconnect.
    ada.type_line("/frobnicate");
    ada.expect_where("with the error", |l| {
        l.starts_with("! unknown command /frobnicate")
    });
    ada.type_line("still here");
    for s in [&mut ada, &mut bob] {
        s.expect("[lobby] ada: still here");
    }

    assert!(ada.hang_up(), "websocat exits once its input ends");
    bob.expect("[lobby] * ada left");
}

#[test]
fn websocat_chats_over_wss_with_insecure() {
    if skipped() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cert = TestCert::generate(dir.path(), "server");
    let server = TestServer::start(&["--tls-cert", cert.cert(), "--tls-key", cert.key()]);
    let url = format!("wss://{}/chat", server.addr);
    let mut session = Session::start(&["--insecure", &url]);
    let nick = greeted(&mut session);
    session.type_line("hello over tls");
    session.expect(&format!("[lobby] {nick}: hello over tls"));
    assert!(session.hang_up(), "websocat exits once its input ends");
}
