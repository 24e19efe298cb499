//! `--replay FILE`: events from an NDJSON file, paced by their timestamps.
//!
//! One JSON object per line, with a string `"type"` and an integer `"ts"`
//! (unix milliseconds, not negative); the object is handed on as it is.
//! Blank lines are ignored. Any other line (not UTF-8, not JSON, not an
//! object, no `type`, no or bad `ts`, longer than [`MAX_LINE_BYTES`]) is
//! skipped with a warning naming its line number and the reason, and
//! counted; a bad line is never fatal, and neither is a read error, which
//! ends the replay early.
//!
//! Pacing: the first event is due at `start`, event *i* at
//! `start + (ts_i - ts_first) / speed`. A `ts` lower than one already seen
//! (out of order) is not rescheduled into the past: that event is due with
//! the latest one seen so far, i.e. right away, and is counted in
//! [`ReplayStats::out_of_order`]. The file is read lazily, at most one
//! parsed event ahead, and at most [`MAX_EVENTS_PER_POLL`] events and
//! [`MAX_LINES_PER_POLL`] lines per [`ReplayFeed::poll`].
//!
//! ```text
//! {"type":"trade","symbol":"BTC-USD","price":"45012.37","qty":"0.0153","side":"buy","ts":1748465400123}
//! {"type":"payment","from":"GA…","to":"GB…","asset_code":"USDC","amount":"100.0000000","ts":1748465400500}
//! ```

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{info, warn};
use serde_json::{Map, Value};

/// At most this many events per [`ReplayFeed::poll`]; the rest stays due.
pub const MAX_EVENTS_PER_POLL: usize = 1000;
/// At most this many lines (blank and bad ones included) read per poll.
pub const MAX_LINES_PER_POLL: u64 = 10_000;
/// Longer lines are bad lines, skipped without being held in memory.
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// Bad lines logged and kept in [`ReplayStats::bad`] one by one; beyond
/// this they are only counted (and one warning says so).
pub const MAX_BAD_LINES_REPORTED: usize = 100;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayStats {
    /// Lines read so far, blank and bad ones included.
    pub lines: u64,
    /// Events handed out by [`ReplayFeed::poll`] so far.
    pub events: u64,
    /// Bad lines skipped so far.
    pub bad_lines: u64,
    /// Events whose `ts` was lower than an earlier event's.
    pub out_of_order: u64,
    /// `(line number, reason)` of the first [`MAX_BAD_LINES_REPORTED`] bad
    /// lines, as logged.
    pub bad: Vec<(u64, String)>,
}

#[derive(Debug)]
pub struct ReplayFeed {
    path: PathBuf,
    reader: BufReader<File>,
    speed: f64,
    start: Instant,
    /// `ts` of the first event, and the highest so far.
    first_ts: Option<i64>,
    max_ts: i64,
    /// The next event and when it is due.
    ahead: Option<(Instant, Map<String, Value>)>,
    /// End of file (or a read error) reached.
    eof: bool,
    /// `eof` and everything handed out; the info line was logged.
    finished: bool,
    stats: ReplayStats,
    line: Vec<u8>,
}

impl ReplayFeed {
    /// Opens `path` for replay at `speed` (1.0 is real time, 10.0 ten times
    /// faster) with the first event due at `start`. Errors name the file.
    pub fn open(path: &Path, speed: f64, start: Instant) -> io::Result<ReplayFeed> {
        if !(speed.is_finite() && speed > 0.0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "replay {}: speed must be a number above 0, got {speed}",
                    path.display()
                ),
            ));
        }
        let file = File::open(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot open replay file {}: {e}", path.display()),
            )
        })?;
        if file.metadata().is_ok_and(|m| m.is_dir()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot replay {}: it is a directory", path.display()),
            ));
        }
        Ok(ReplayFeed {
            path: path.to_owned(),
            reader: BufReader::new(file),
            speed,
            start,
            first_ts: None,
            max_ts: 0,
            ahead: None,
            eof: false,
            finished: false,
            stats: ReplayStats::default(),
            line: Vec::new(),
        })
    }

    /// When to poll next: the next event's due time; an instant not after
    /// `start` (poll now) while the next event is still to be read; `None`
    /// once finished.
    pub fn next_due(&self) -> Option<Instant> {
        match &self.ahead {
            Some((due, _)) => Some(*due),
            None if self.finished => None,
            None => Some(self.start),
        }
    }

    /// The events due at `now`, in file order, bounded per call.
    pub fn poll(&mut self, now: Instant) -> Vec<Map<String, Value>> {
        let mut out = Vec::new();
        let mut line_budget = MAX_LINES_PER_POLL;
        while out.len() < MAX_EVENTS_PER_POLL {
            if self.ahead.is_none() {
                if self.eof || line_budget == 0 {
                    break;
                }
                self.read_ahead(&mut line_budget);
            }
            match self.ahead.take() {
                Some((due, event)) if due <= now => {
                    self.stats.events += 1;
                    out.push(event);
                }
                other => {
                    self.ahead = other;
                    break;
                }
            }
        }
        if self.eof && self.ahead.is_none() && !self.finished {
            self.finished = true;
            info!(
                "replay {} finished: {} events, {} bad lines skipped",
                self.path.display(),
                self.stats.events,
                self.stats.bad_lines
            );
        }
        out
    }

    /// The whole file has been read and handed out.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The event that says the replay is over, published after its last
    /// event: `{"type":"replay_end","events":N,"lines":L,"bad_lines":B,
    /// "out_of_order":O,"ts":T}`, where `ts` is the latest event time
    /// replayed (absent when there was no event), so that it does not move
    /// event time backwards.
    pub fn end_event(&self) -> Map<String, Value> {
        let mut event = Map::new();
        event.insert("type".into(), Value::from(super::REPLAY_END));
        event.insert("events".into(), Value::from(self.stats.events));
        event.insert("lines".into(), Value::from(self.stats.lines));
        event.insert("bad_lines".into(), Value::from(self.stats.bad_lines));
        event.insert("out_of_order".into(), Value::from(self.stats.out_of_order));
        if self.first_ts.is_some() {
            event.insert("ts".into(), Value::from(self.max_ts));
        }
        event
    }

    pub fn stats(&self) -> ReplayStats {
        self.stats.clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads lines until the next event (into `ahead`), the end of the file
    /// or the end of the budget.
    fn read_ahead(&mut self, budget: &mut u64) {
        while *budget > 0 {
            *budget -= 1;
            let too_long = match read_line_bounded(&mut self.reader, &mut self.line) {
                Ok(None) => {
                    self.eof = true;
                    return;
                }
                Ok(Some(too_long)) => too_long,
                Err(e) => {
                    warn!(
                        "replay {}: read error after line {}: {e}; stopping",
                        self.path.display(),
                        self.stats.lines
                    );
                    self.eof = true;
                    return;
                }
            };
            self.stats.lines += 1;
            let line_no = self.stats.lines;
            if too_long {
                self.bad_line(line_no, format!("longer than {MAX_LINE_BYTES} bytes"));
                continue;
            }
            match parse_line(&self.line, line_no == 1) {
                Ok(None) => {}
                Ok(Some((ts, event))) => {
                    let due = self.schedule(ts);
                    self.ahead = Some((due, event));
                    return;
                }
                Err(reason) => self.bad_line(line_no, reason),
            }
        }
    }

    fn schedule(&mut self, ts: i64) -> Instant {
        let first = *self.first_ts.get_or_insert(ts);
        // `max_ts` starts at 0 and a `ts` is never negative.
        if ts < self.max_ts {
            self.stats.out_of_order += 1;
        }
        self.max_ts = self.max_ts.max(ts);
        let offset_ms = (self.max_ts - first) as f64 / self.speed;
        // About 100 years: later than any sane replay, and safe to add.
        let offset = Duration::try_from_secs_f64(offset_ms / 1000.0)
            .unwrap_or(Duration::MAX)
            .min(Duration::from_secs(100 * 365 * 86_400));
        self.start
            .checked_add(offset)
            .unwrap_or_else(|| self.start + Duration::from_secs(86_400))
    }

    fn bad_line(&mut self, line_no: u64, reason: String) {
        self.stats.bad_lines += 1;
        if self.stats.bad.len() < MAX_BAD_LINES_REPORTED {
            warn!(
                "replay {} line {line_no}: {reason}; skipped",
                self.path.display()
            );
            self.stats.bad.push((line_no, reason));
        } else if self.stats.bad.len() == MAX_BAD_LINES_REPORTED
            && self.stats.bad_lines == MAX_BAD_LINES_REPORTED as u64 + 1
        {
            warn!(
                "replay {}: more than {MAX_BAD_LINES_REPORTED} bad lines; the rest are counted, not logged",
                self.path.display()
            );
        }
    }
}

/// Reads one line (without its `\n`) into `line`. `Ok(None)` at end of
/// file; `Ok(Some(true))` when the line was longer than [`MAX_LINE_BYTES`]
/// (its bytes are consumed, not kept).
fn read_line_bounded(reader: &mut impl BufRead, line: &mut Vec<u8>) -> io::Result<Option<bool>> {
    line.clear();
    let mut too_long = false;
    let mut read_any = false;
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(read_any.then_some(too_long));
        }
        read_any = true;
        let (chunk, used, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], i + 1, true),
            None => (buf, buf.len(), false),
        };
        if !too_long {
            if line.len() + chunk.len() > MAX_LINE_BYTES {
                too_long = true;
                line.clear();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        reader.consume(used);
        if done {
            return Ok(Some(too_long));
        }
    }
}

/// A line's `ts` and event; `None` for a blank line.
type Parsed = Option<(i64, Map<String, Value>)>;

/// The line's event, or why the line is bad.
fn parse_line(bytes: &[u8], first_line: bool) -> Result<Parsed, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not valid UTF-8".to_owned())?;
    let text = if first_line {
        text.strip_prefix('\u{feff}').unwrap_or(text)
    } else {
        text
    };
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON ({e})"))?;
    let Value::Object(event) = value else {
        return Err(format!("not a JSON object (got {})", kind(&value)));
    };
    match event.get("type") {
        Some(Value::String(t)) if !t.is_empty() => {}
        None => return Err("missing \"type\"".to_owned()),
        Some(other) => {
            return Err(format!(
                "\"type\" must be a non-empty string, got {}",
                short(other)
            ))
        }
    }
    let ts = match event.get("ts") {
        None => return Err("missing \"ts\" (unix milliseconds)".to_owned()),
        Some(value) => match value.as_i64() {
            Some(ts) if ts >= 0 => ts,
            _ => {
                return Err(format!(
                    "\"ts\" must be a non-negative integer (unix milliseconds), got {}",
                    short(value)
                ))
            }
        },
    };
    Ok(Some((ts, event)))
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A value for a message, cut to a readable length.
fn short(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() <= 40 {
        text
    } else {
        let cut: String = text.chars().take(40).collect();
        format!("{cut}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(content: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(content.as_bytes()).unwrap();
        f.flush().unwrap();
        f
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    const THREE: &str = "{\"type\":\"trade\",\"ts\":1000,\"n\":1}\n\
                         {\"type\":\"trade\",\"ts\":1500,\"n\":2}\n\
                         {\"type\":\"trade\",\"ts\":3000,\"n\":3}\n";

    fn ns(events: &[Map<String, Value>]) -> Vec<i64> {
        events.iter().map(|e| e["n"].as_i64().unwrap()).collect()
    }

    #[test]
    fn paces_in_real_time() {
        let f = file(THREE);
        let start = Instant::now();
        let mut feed = ReplayFeed::open(f.path(), 1.0, start).unwrap();
        assert!(feed.next_due().unwrap() <= start);
        assert_eq!(ns(&feed.poll(start)), [1]);
        assert_eq!(feed.next_due(), Some(start + ms(500)));
        assert!(feed.poll(start + ms(499)).is_empty());
        assert_eq!(ns(&feed.poll(start + ms(500))), [2]);
        assert_eq!(feed.next_due(), Some(start + ms(2000)));
        assert!(!feed.is_finished());
        assert_eq!(ns(&feed.poll(start + ms(2000))), [3]);
        assert!(feed.is_finished());
        assert_eq!(feed.next_due(), None);
        assert!(feed.poll(start + ms(5000)).is_empty());
        let stats = feed.stats();
        assert_eq!((stats.lines, stats.events, stats.bad_lines), (3, 3, 0));
    }

    #[test]
    fn paces_ten_times_faster() {
        let f = file(THREE);
        let start = Instant::now();
        let mut feed = ReplayFeed::open(f.path(), 10.0, start).unwrap();
        assert_eq!(ns(&feed.poll(start)), [1]);
        assert_eq!(feed.next_due(), Some(start + ms(50)));
        assert_eq!(ns(&feed.poll(start + ms(50))), [2]);
        assert_eq!(feed.next_due(), Some(start + ms(200)));
        // A late poll gets everything due at once.
        let f = file(THREE);
        let mut feed = ReplayFeed::open(f.path(), 10.0, start).unwrap();
        assert_eq!(ns(&feed.poll(start + ms(200))), [1, 2, 3]);
        assert!(feed.is_finished());
    }

    #[test]
    fn bad_lines_are_skipped_counted_and_numbered() {
        let content = "{\"type\":\"trade\",\"ts\":1000,\"n\":1}\n\
                       not json\n\
                       [1,2]\n\
                       {\"type\":\"trade\",\"n\":0}\n\
                       {\"type\":\"trade\",\"ts\":\"1200\",\"n\":0}\n\
                       {\"type\":\"trade\",\"ts\":12.5,\"n\":0}\n\
                       {\"type\":\"trade\",\"ts\":-5,\"n\":0}\n\
                       {\"ts\":1300,\"n\":0}\n\
                       {\"type\":\"trade\",\"ts\":1400,\"n\":2}\n\
                       {\"type\":\"trade\",\"ts\":1400\n";
        let f = file(content);
        let start = Instant::now();
        let mut feed = ReplayFeed::open(f.path(), 1.0, start).unwrap();
        let events = feed.poll(start + ms(1000));
        assert_eq!(ns(&events), [1, 2]);
        assert!(feed.is_finished());
        let stats = feed.stats();
        assert_eq!(stats.lines, 10);
        assert_eq!(stats.events, 2);
        assert_eq!(stats.bad_lines, 8);
        let lines: Vec<u64> = stats.bad.iter().map(|(n, _)| *n).collect();
        assert_eq!(lines, [2, 3, 4, 5, 6, 7, 8, 10]);
        let reason = |n: u64| stats.bad.iter().find(|(l, _)| *l == n).unwrap().1.clone();
        assert!(reason(2).starts_with("not valid JSON"), "{}", reason(2));
        assert_eq!(reason(3), "not a JSON object (got an array)");
        assert_eq!(reason(4), "missing \"ts\" (unix milliseconds)");
        assert!(reason(5).contains("\"1200\""), "{}", reason(5));
        assert!(reason(6).contains("12.5"), "{}", reason(6));
        assert!(reason(7).contains("-5"), "{}", reason(7));
        assert_eq!(reason(8), "missing \"type\"");
        assert!(reason(10).starts_with("not valid JSON"), "{}", reason(10));
    }

    #[test]
    fn blank_lines_crlf_bom_and_no_final_newline() {
        let content = "\u{feff}\n\r\n   \n{\"type\":\"a\",\"ts\":5,\"n\":1}\r\n\n\t\n{\"type\":\"b\",\"ts\":5,\"n\":2}";
        let f = file(content);
        let start = Instant::now();
        let mut feed = ReplayFeed::open(f.path(), 1.0, start).unwrap();
        assert_eq!(ns(&feed.poll(start)), [1, 2]);
        assert!(feed.is_finished());
        let stats = feed.stats();
        assert_eq!((stats.lines, stats.events, stats.bad_lines), (7, 2, 0));
    }

    #[test]
    fn bom_on_an_event_line() {
        let f = file("\u{feff}{\"type\":\"a\",\"ts\":5,\"n\":1}\n");
        let start = Instant::now();
        let mut feed = ReplayFeed::open(f.path(), 1.0, start).unwrap();
        assert_eq!(ns(&feed.poll(start)), [1]);
    }

    #[test]
    fn backwards_ts_is_due_right_away() {
        let content = "{\"type\":\"t\",\"ts\":1000,\"n\":1}\n\
                       {\"type\":\"t\",\"ts\":2000,\"n\":2}\n\
                       {\"type\":\"t\",\"ts\":1500,\"n\":3}\n\
                       {\"type\":\"t\",\"ts\":500,\"n\":4}\n\
                       {\"type\":\"t\",\"ts\":2500,\"n\":5}\n";
        let f = file(content);
        let start = Instant::now();
        let mut feed = ReplayFeed::open(f.path(), 1.0, start).unwrap();
        assert_eq!(ns(&feed.poll(start + ms(999))), [1]);
        // 3 and 4 are due with 2, the latest seen; 5 half a second later.
        assert_eq!(ns(&feed.poll(start + ms(1000))), [2, 3, 4]);
        assert_eq!(feed.next_due(), Some(start + ms(1500)));
        assert_eq!(ns(&feed.poll(start + ms(1500))), [5]);
        let stats = feed.stats();
        assert_eq!(stats.out_of_order, 2);
        assert_eq!(stats.bad_lines, 0);
        // The events are handed on unchanged, ts included.
        assert!(feed.is_finished());
    }

    #[test]
    fn polls_are_bounded() {
        let mut content = String::new();
        for n in 0..2500 {
            content.push_str(&format!("{{\"type\":\"t\",\"ts\":7,\"n\":{n}}}\n"));
        }
        let f = file(&content);
        let start = Instant::now();
        let mut feed = ReplayFeed::open(f.path(), 1.0, start).unwrap();
        assert_eq!(feed.poll(start).len(), MAX_EVENTS_PER_POLL);
        assert!(feed.next_due().unwrap() <= start);
        assert_eq!(feed.poll(start).len(), MAX_EVENTS_PER_POLL);
        let last = feed.poll(start);
        assert_eq!(last.len(), 500);
        assert_eq!(last.last().unwrap()["n"], 2499);
        assert!(feed.is_finished());
        assert_eq!(feed.stats().events, 2500);
    }

    #[test]
    fn many_blank_or_bad_lines_are_read_a_bounded_amount_per_poll() {
        let mut content = "x\n".repeat(25_000);
        content.push_str("{\"type\":\"t\",\"ts\":1,\"n\":1}\n");
        let f = file(&content);
        let start = Instant::now();
        let mut feed = ReplayFeed::open(f.path(), 1.0, start).unwrap();
        assert!(feed.poll(start).is_empty());
        assert_eq!(feed.stats().lines, MAX_LINES_PER_POLL);
        assert!(!feed.is_finished());
        assert!(feed.next_due().unwrap() <= start);
        assert!(feed.poll(start).is_empty());
        assert_eq!(ns(&feed.poll(start)), [1]);
        let stats = feed.stats();
        assert!(feed.is_finished());
        assert_eq!(stats.bad_lines, 25_000);
        assert_eq!(stats.bad.len(), MAX_BAD_LINES_REPORTED);
    }

    #[test]
    fn overlong_lines_are_bad_not_buffered() {
        let mut content = format!(
            "{{\"type\":\"t\",\"ts\":1,\"pad\":\"{}\"}}\n",
            "a".repeat(MAX_LINE_BYTES)
        );
        content.push_str("{\"type\":\"t\",\"ts\":1,\"n\":2}\n");
        let f = file(&content);
        let start = Instant::now();
        let mut feed = ReplayFeed::open(f.path(), 1.0, start).unwrap();
        assert_eq!(ns(&feed.poll(start)), [2]);
        let stats = feed.stats();
        assert_eq!(
            stats.bad,
            [(1, format!("longer than {MAX_LINE_BYTES} bytes"))]
        );
    }

    #[test]
    fn invalid_utf8_is_a_bad_line() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"\xff\xfe{}\n{\"type\":\"t\",\"ts\":1,\"n\":1}\n")
            .unwrap();
        f.flush().unwrap();
        let start = Instant::now();
        let mut feed = ReplayFeed::open(f.path(), 1.0, start).unwrap();
        assert_eq!(ns(&feed.poll(start)), [1]);
        assert_eq!(feed.stats().bad, [(1, "not valid UTF-8".to_owned())]);
    }

    #[test]
    fn the_end_event_sums_the_replay_up_at_its_latest_time() {
        let content = "{\"type\":\"t\",\"ts\":1000,\"n\":1}\n\
                       not json\n\
                       {\"type\":\"t\",\"ts\":3000,\"n\":2}\n\
                       {\"type\":\"t\",\"ts\":2000,\"n\":3}\n";
        let f = file(content);
        let start = Instant::now();
        let mut feed = ReplayFeed::open(f.path(), 1000.0, start).unwrap();
        assert_eq!(ns(&feed.poll(start + ms(10))), [1, 2, 3]);
        assert!(feed.is_finished());
        assert_eq!(
            Value::Object(feed.end_event()),
            serde_json::json!({"type":"replay_end","events":3,"lines":4,"bad_lines":1,
                               "out_of_order":1,"ts":3000})
        );
        // Without an event there is no event time to give.
        let empty = file("\n");
        let mut feed = ReplayFeed::open(empty.path(), 1.0, start).unwrap();
        assert!(feed.poll(start).is_empty());
        assert_eq!(
            Value::Object(feed.end_event()),
            serde_json::json!({"type":"replay_end","events":0,"lines":1,"bad_lines":0,
                               "out_of_order":0})
        );
    }

    #[test]
    fn empty_file_finishes_on_first_poll() {
        let f = file("");
        let start = Instant::now();
        let mut feed = ReplayFeed::open(f.path(), 1.0, start).unwrap();
        assert!(!feed.is_finished());
        assert!(feed.poll(start).is_empty());
        assert!(feed.is_finished());
        assert_eq!(feed.next_due(), None);
    }

    #[test]
    fn open_errors_name_the_file() {
        let start = Instant::now();
        let missing = Path::new("/nonexistent/replay.ndjson");
        let err = ReplayFeed::open(missing, 1.0, start).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(
            err.to_string().contains("/nonexistent/replay.ndjson"),
            "{err}"
        );
        let f = file(THREE);
        for speed in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = ReplayFeed::open(f.path(), speed, start).err().unwrap();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
            assert!(err.to_string().contains(&f.path().display().to_string()));
        }
        let dir = tempfile::tempdir().unwrap();
        let err = ReplayFeed::open(dir.path(), 1.0, start).err().unwrap();
        assert!(
            err.to_string().contains(&dir.path().display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn big_numbers_and_fields_pass_through_unchanged() {
        let line = "{\"type\":\"trade\",\"ts\":1748465400123,\"price\":0.0010010979158340965,\"z\":1,\"a\":2}\n";
        let f = file(line);
        let start = Instant::now();
        let mut feed = ReplayFeed::open(f.path(), 1.0, start).unwrap();
        let events = feed.poll(start);
        assert_eq!(serde_json::to_string(&events[0]).unwrap() + "\n", line);
    }
}
