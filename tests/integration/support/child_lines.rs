//! A child process's output, line by line, on a channel: a thread reads it
//! until the child closes it, and keeps reading after the receiver is gone
//! so that a late print never meets a closed pipe.

use std::io::{BufRead, BufReader, Read};
use std::sync::mpsc::{self, Receiver};

pub fn lines_of(output: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(output).lines() {
            let Ok(line) = line else { break };
            // Once nobody listens, the lines are only drained.
            let _ = tx.send(line);
        }
    });
    rx
}
