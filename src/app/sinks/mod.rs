//! Alert firings (and, by choice, channel messages) delivered outside:
//! to a generic webhook (`webhook`) or a Telegram chat (`telegram`).
//!
//! The sinks are configured as `[[sink]]` tables in the config file
//! (`settings`), or `--webhook URL` for alerts. The app offers each firing
//! where it is made (`publishing`'s event effects) and each channel message
//! this node publishes; a sink whose `source` matches turns it into its
//! request body on the loop (the firing's JSON as its owner receives it, a
//! channel message as subscribers receive it, or Telegram's one line), and
//! hands it to its worker thread through a bounded queue with `try_send`.
//! So the loop never waits for the network: a full queue drops the item
//! and counts it. The worker (`worker`) does the HTTP with retries and
//! backoff (`backoff`); `counters` are what `/metrics` shows per sink.
//!
//! In a cluster each node delivers what it made: the firings of its own
//! clients' alerts and the messages published on it, so a sink configured
//! alike on every node delivers each item once.
//!
//! At shutdown (when the loop has returned) each worker gets the sink's
//! `flush-timeout` for what is queued and being retried; the rest is
//! counted as dropped (`reason="shutdown"`).

pub mod backoff;
mod counters;
pub mod settings;
pub mod telegram;
pub mod webhook;
mod worker;

use std::fmt;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{info, warn};
use serde_json::Value;

use self::counters::Counters;
use self::settings::{SinkConfig, SinkKind, SinkSource};
use self::worker::{Job, Policy, Stop, Target, Worker};
use super::channels::name::pattern_matches;
use crate::metrics::Metrics;

/// Every configured sink, each with its worker.
#[derive(Default)]
pub struct Sinks {
    sinks: Vec<Sink>,
}

struct Sink {
    config: SinkConfig,
    queue: Option<SyncSender<Job>>,
    counters: Arc<Counters>,
    stop: Arc<Stop>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for Sinks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.sinks.iter().map(|s| &s.config))
            .finish()
    }
}

impl Sinks {
    /// Starts one worker thread per sink.
    pub fn start(configs: &[SinkConfig]) -> io::Result<Sinks> {
        let mut sinks = Sinks::default();
        for config in configs {
            let (queue, taken) = sync_channel(config.queue);
            let counters = Arc::new(Counters::default());
            let stop = Arc::new(Stop::default());
            let target = match &config.kind {
                SinkKind::Webhook { url, secret } => Target {
                    url: url.clone(),
                    secret: Some(secret.as_bytes().to_vec()),
                },
                SinkKind::Telegram {
                    api_url, bot_token, ..
                } => Target {
                    url: telegram::send_message_url(api_url, bot_token),
                    secret: None,
                },
            };
            let worker = Worker {
                name: config.name.clone(),
                target,
                policy: Policy {
                    timeout: config.timeout,
                    max_attempts: config.max_attempts,
                    retry_backoff: config.retry_backoff,
                    retry_backoff_max: config.retry_backoff_max,
                },
                counters: counters.clone(),
                stop: stop.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("sink-{}", config.name))
                .spawn(move || worker.run(taken))?;
            info!(
                "sink `{}`: {} of {}",
                config.name,
                match config.kind {
                    SinkKind::Webhook { .. } => "webhook",
                    SinkKind::Telegram { .. } => "telegram",
                },
                match &config.source {
                    SinkSource::Alerts => "alert firings".to_owned(),
                    SinkSource::Channel(p) => format!("messages published here on `{p}`"),
                }
            );
            sinks.sinks.push(Sink {
                config: config.clone(),
                queue: Some(queue),
                counters,
                stop,
                thread: Some(thread),
            });
        }
        Ok(sinks)
    }

    /// An alert fired; `encoded` is `firing` as its owner receives it.
    pub fn offer_alert(&self, firing: &Value, encoded: &str) {
        for sink in &self.sinks {
            if sink.config.source != SinkSource::Alerts {
                continue;
            }
            let body = match &sink.config.kind {
                SinkKind::Webhook { .. } => encoded.to_owned(),
                SinkKind::Telegram { chat_id, .. } => {
                    telegram::send_message_body(chat_id, &telegram::alert_text(firing))
                }
            };
            sink.offer(body);
        }
    }

    /// Whether any sink takes this channel's messages (checked before the
    /// message is encoded for them).
    pub fn want_channel(&self, channel: &str) -> bool {
        self.sinks.iter().any(|s| s.takes(channel))
    }

    /// A message published on this node; `encoded` is the message as its
    /// subscribers receive it.
    pub fn offer_channel(&self, channel: &str, data: &Value, encoded: &str) {
        for sink in self.sinks.iter().filter(|s| s.takes(channel)) {
            let body = match &sink.config.kind {
                SinkKind::Webhook { .. } => encoded.to_owned(),
                SinkKind::Telegram { chat_id, .. } => {
                    telegram::send_message_body(chat_id, &telegram::channel_text(channel, data))
                }
            };
            sink.offer(body);
        }
    }

    /// Each sink's counters, labelled with its name.
    pub fn write_metrics(&self, m: &mut Metrics) {
        if self.sinks.is_empty() {
            return;
        }
        let load = |s: &Sink, f: fn(&Counters) -> &std::sync::atomic::AtomicU64| {
            f(&s.counters).load(Ordering::Relaxed) as f64
        };
        let per_sink = |f: fn(&Counters) -> &std::sync::atomic::AtomicU64| {
            self.sinks
                .iter()
                .map(|s| (s.config.name.as_str(), load(s, f)))
                .collect::<Vec<_>>()
        };
        for (name, help, kind, values) in [
            (
                "fanout_sink_sent_total",
                "Items a sink delivered (a 2xx answer).",
                "counter",
                per_sink(|c| &c.sent),
            ),
            (
                "fanout_sink_retries_total",
                "Delivery attempts after an item's first (after a 429, a 5xx, a timeout or a connection error).",
                "counter",
                per_sink(|c| &c.retried),
            ),
            (
                "fanout_sink_failed_total",
                "Items a sink gave up on: refused (another 4xx) or out of attempts.",
                "counter",
                per_sink(|c| &c.failed),
            ),
            (
                "fanout_sink_queued",
                "Items waiting for a sink's worker.",
                "gauge",
                per_sink(|c| &c.queued),
            ),
        ] {
            let labels: Vec<[(&str, &str); 1]> =
                values.iter().map(|(name, _)| [("sink", *name)]).collect();
            let samples: Vec<(&[(&str, &str)], f64)> = labels
                .iter()
                .zip(&values)
                .map(|(l, (_, v))| (&l[..], *v))
                .collect();
            m.family(name, help, kind, &samples);
        }
        let dropped: Vec<(&str, &str, f64)> = self
            .sinks
            .iter()
            .flat_map(|s| {
                let name = s.config.name.as_str();
                [
                    (name, "queue_full", load(s, |c| &c.dropped_queue_full)),
                    (name, "shutdown", load(s, |c| &c.dropped_shutdown)),
                ]
            })
            .collect();
        let labels: Vec<[(&str, &str); 2]> = dropped
            .iter()
            .map(|(name, reason, _)| [("sink", *name), ("reason", *reason)])
            .collect();
        let samples: Vec<(&[(&str, &str)], f64)> = labels
            .iter()
            .zip(&dropped)
            .map(|(l, (_, _, v))| (&l[..], *v))
            .collect();
        m.family(
            "fanout_sink_dropped_total",
            "Items a sink never delivered nor tried to the end, by reason: its queue was full, or the flush time at shutdown ran out.",
            "counter",
            &samples,
        );
    }

    /// Gives every worker its flush time, then waits for them (a worker
    /// stuck past it is left to end with the process).
    fn stop(&mut self) {
        let now = Instant::now();
        let mut longest = Duration::ZERO;
        for sink in &mut self.sinks {
            sink.stop.begin(now + sink.config.flush_timeout);
            longest = longest.max(sink.config.flush_timeout);
            // The worker ends once it has taken what is queued.
            sink.queue = None;
        }
        // An attempt's timeout is cut to the flush deadline; the margin is
        // for the thread to notice and return.
        let give_up = now + longest + Duration::from_secs(1);
        for sink in &mut self.sinks {
            let Some(thread) = sink.thread.take() else {
                continue;
            };
            while !thread.is_finished() && Instant::now() < give_up {
                std::thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                warn!(
                    "sink `{}`: worker still busy after its flush time; leaving it",
                    sink.config.name
                );
            }
            let c = &sink.counters;
            let dropped = c.dropped_shutdown.load(Ordering::Relaxed);
            if dropped > 0 {
                warn!(
                    "sink `{}`: {dropped} item(s) not delivered by the end of the flush time",
                    sink.config.name
                );
            }
        }
    }
}

impl Sink {
    fn takes(&self, channel: &str) -> bool {
        matches!(&self.config.source, SinkSource::Channel(p) if pattern_matches(p, channel))
    }

    fn offer(&self, body: String) {
        let Some(queue) = &self.queue else {
            return;
        };
        let c = &self.counters;
        // Counted before the send so the worker's decrement never runs first.
        c.queued.fetch_add(1, Ordering::Relaxed);
        match queue.try_send(Job { body }) {
            Ok(()) => {}
            // Disconnected: the worker is gone, which only a panic in it
            // could do; its items are as lost as a full queue's.
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                c.queued.fetch_sub(1, Ordering::Relaxed);
                let before = c.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
                // Once per power of two, so an outage does not flood the log.
                if (before + 1).is_power_of_two() {
                    warn!(
                        "sink `{}`: queue full ({} items); {} item(s) dropped so far",
                        self.config.name,
                        self.config.queue,
                        before + 1
                    );
                }
            }
        }
    }
}

impl Drop for Sinks {
    fn drop(&mut self) {
        self.stop();
    }
}
