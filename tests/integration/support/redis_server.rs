//! A throwaway `redis-server` on a free loopback port for the Redis tests:
//! installed with apt by `tests/redis/start-redis.sh` when missing, killed
//! and reaped on drop. Shared by the `redis_link` and `cluster` tests, each
//! of which starts with `if skipped() { return; }` (`FANOUT_SKIP_REDIS=1`).
#![allow(dead_code)]

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::bounded::run_bounded;
use super::external::{in_place, REDIS};

pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/redis/start-redis.sh")
}

/// True (with a `SKIPPED:` line) when `FANOUT_SKIP_REDIS` is set: a test
/// that needs redis-server returns at once.
pub fn skipped() -> bool {
    REDIS.skipped()
}

/// Makes sure redis-server is installed (once per test binary).
pub fn ensure_installed() {
    static INSTALLED: OnceLock<Result<String, String>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        if !in_place(Command::new("sh").arg(script()).arg("check")) {
            REDIS.announce_install();
        }
        run_bounded(
            Command::new("sh").arg(script()).arg("install"),
            Duration::from_secs(600),
        )
    });
    if let Err(e) = result {
        panic!(
            "redis-server is not available and could not be installed with apt \
             (FANOUT_SKIP_REDIS=1 skips the Redis tests): {e}"
        );
    }
}

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// A redis-server child on 127.0.0.1:port, killed and reaped on drop.
pub struct RedisServer {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        ensure_installed();
        let mut server = RedisServer {
            port: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
        };
        server.spawn();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    pub fn spawn(&mut self) {
        assert!(self.child.is_none());
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("redis.log"))
            .expect("log file");
        let child = Command::new("sh")
            .arg(script())
            .arg("run")
            .arg(self.port.to_string())
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn start-redis.sh run");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                panic!("redis-server exited ({status}):\n{}", self.log());
            }
            if self.ping() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} not answering PING within 10 s:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url().as_str()) else {
            return false;
        };
        let Ok(mut con) = client.get_connection_with_timeout(Duration::from_millis(300)) else {
            return false;
        };
        redis::cmd("PING").query::<String>(&mut con).is_ok()
    }

    pub fn admin(&self) -> redis::Connection {
        let client = redis::Client::open(self.url().as_str()).unwrap();
        let con = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .expect("admin connection");
        con.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        con
    }

    /// SIGKILL, reaped.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port and directory (loading `dump.rdb` if
    /// one was saved).
    pub fn restart(&mut self) {
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
