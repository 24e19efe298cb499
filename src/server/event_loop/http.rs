//! The HTTP side of a connection before it is a WebSocket: the request
//! head, the upgrade, and the plain answers on every other path (the page,
//! the liveness and readiness probes, `/metrics` and its document), each a
//! `Connection: close` response after which the connection goes.

use std::collections::BTreeMap;

use log::debug;

use super::Core;
use crate::app::tokens::Grant;
use crate::app::{resolve, Endpoint, Role, Target};
use crate::metrics::{Labels, Metrics};
use crate::server::connection::{Handshake, Open, Phase};
use crate::server::pending_states::PendingStates;
use crate::ws::extensions::DeflateParams;
use crate::ws::handshake::{self, Rejection};
use crate::ws::{self, Session};

impl Core {
    /// The whole `GET /metrics` document.
    pub(super) fn metrics(&self) -> String {
        let mut m = Metrics::new();
        let mut open: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        let (mut queued, mut deepest) = (0usize, 0usize);
        for (_, conn) in &self.conns {
            let (role, endpoint) = match &conn.phase {
                Phase::Open(open) => (Some(open.role), endpoint_name(open.endpoint)),
                Phase::Handshake(handshake) => (Some(handshake.info.role), "handshake"),
                Phase::Responding { .. } => (None, "http"),
            };
            let listener = match role {
                Some(Role::Public) => "public",
                Some(Role::Internal) => "internal",
                None => "unknown",
            };
            *open.entry((listener, endpoint)).or_default() += 1;
            queued += conn.out.len();
            deepest = deepest.max(conn.out.len());
        }
        let samples: Vec<([(&str, &str); 2], f64)> = open
            .iter()
            .map(|((l, e), n)| ([("listener", *l), ("endpoint", *e)], *n as f64))
            .collect();
        let samples: Vec<(Labels<'_>, f64)> = samples.iter().map(|(l, n)| (&l[..], *n)).collect();
        m.family(
            "fanout_connections",
            "Open connections by listener and endpoint (handshake and http: not upgraded).",
            "gauge",
            &samples,
        );
        m.gauge(
            "fanout_outbound_queued_bytes",
            "Bytes queued for all clients.",
            queued as f64,
        );
        m.gauge(
            "fanout_outbound_queue_max_bytes",
            "The deepest client queue, in bytes.",
            deepest as f64,
        );
        m.gauge(
            "fanout_held_states",
            "State updates held for slow recipients now, waiting for room in their queues.",
            self.held_states
                .values()
                .map(PendingStates::len)
                .sum::<usize>() as f64,
        );
        self.stats.write_metrics(&mut m);
        self.compressors.write_metrics(&mut m);
        self.app.write_metrics(&mut m);
        m.finish()
    }

    pub(super) fn handshake_input(&mut self, token: usize, input: &[u8]) {
        let max = self.config.max_header_bytes;
        let too_large = || Rejection::new(431, format!("request head larger than {max} bytes"));
        let Phase::Handshake(handshake) = &mut self.conns[token].phase else {
            return;
        };
        let request = &mut handshake.request;
        let scan_from = request.len().saturating_sub(2);
        request.extend_from_slice(input);
        // Parse only once a blank line may have arrived, so a client that
        // dribbles one byte at a time does not cost a full parse per byte.
        let blank_line = request[scan_from..].windows(2).any(|w| w == b"\n\n")
            || request[scan_from.saturating_sub(1)..]
                .windows(3)
                .any(|w| w == b"\n\r\n");
        let received = request.len();
        let parsed = if blank_line {
            handshake::parse_request(request)
        } else {
            Ok(None)
        };
        let (request_head, consumed) = match parsed {
            Err(rejection) => return self.reject(token, rejection),
            Ok(None) if received > max => return self.reject(token, too_large()),
            Ok(None) => return,
            Ok(Some((_, consumed))) if consumed > max => return self.reject(token, too_large()),
            Ok(Some(found)) => found,
        };
        let target = resolve(&request_head.path);
        let plain = !matches!(target, Target::WebSocket(_) | Target::NotFound);
        let head_only = request_head.method == "HEAD";
        if plain && request_head.method != "GET" && !head_only {
            let reason = format!("{} answers GET and HEAD only", request_head.path);
            let rejection = Rejection::new(405, reason).with_header("Allow", "GET, HEAD");
            return self.reject(token, rejection);
        }
        match target {
            Target::Page => {
                let page = crate::app::PAGE_HTML.as_bytes();
                let response = handshake::http_response(200, &[], "text/html; charset=utf-8", page);
                self.respond(token, head_or_whole(&response, head_only), "web page");
            }
            Target::Health => {
                let response =
                    handshake::http_response(200, &[], "text/plain; charset=utf-8", b"ok\n");
                self.respond(token, head_or_whole(&response, head_only), "health check");
            }
            Target::Ready if self.stopping_at.is_some() => {
                self.reject(token, Rejection::new(503, "shutting down"));
            }
            Target::Ready if self.app.cluster_ready() == Some(false) => {
                self.reject(token, Rejection::new(503, "redis link not up"));
            }
            Target::Ready => {
                // Listeners are bound before the loop runs; a node with a
                // cluster link also requires it to be up.
                let response =
                    handshake::http_response(200, &[], "text/plain; charset=utf-8", b"ready\n");
                self.respond(
                    token,
                    head_or_whole(&response, head_only),
                    "readiness check",
                );
            }
            Target::Metrics
                if self.config.metrics_internal_only && handshake.info.role != Role::Internal =>
            {
                self.reject(
                    token,
                    Rejection::new(403, "metrics are served on internal listeners only"),
                );
            }
            Target::Metrics => {
                let text = self.metrics();
                let response = handshake::http_response(
                    200,
                    &[],
                    "text/plain; version=0.0.4; charset=utf-8",
                    text.as_bytes(),
                );
                self.respond(token, head_or_whole(&response, head_only), "metrics");
            }
            Target::NotFound => {
                let reason = format!("no endpoint at {}", request_head.path);
                self.reject(token, Rejection::new(404, reason));
            }
            Target::WebSocket(endpoint) => {
                match handshake::validate_upgrade(&request_head, &self.policy) {
                    Err(rejection) => self.reject(token, rejection),
                    Ok(_) if self.open_websockets >= self.config.max_connections => {
                        let reason = format!(
                            "connection limit of {} reached",
                            self.config.max_connections
                        );
                        self.reject(token, Rejection::new(503, reason));
                    }
                    Ok(accepted) => {
                        // The token, if any, decides last: a request that
                        // fails anything else is not charged a signature
                        // check.
                        let role = handshake.info.role;
                        let grant = match request_head.bearer_token() {
                            Err(rejection) => {
                                self.app.count_token_form_refusal();
                                return self.reject(token, rejection);
                            }
                            Ok(presented) => self.app.admit(role, presented),
                        };
                        match grant {
                            Err(reason) => self.reject(token, handshake::unauthorized(reason)),
                            Ok(grant) => self.upgrade(
                                token,
                                endpoint,
                                &handshake::accept_response(&accepted),
                                consumed,
                                accepted.deflate.map(|(params, _)| params),
                                grant,
                            ),
                        }
                    }
                }
            }
        }
    }

    fn upgrade(
        &mut self,
        token: usize,
        endpoint: Endpoint,
        response: &[u8],
        consumed: usize,
        deflate: Option<DeflateParams>,
        grant: Option<Grant>,
    ) {
        let conn = &mut self.conns[token];
        let Phase::Handshake(handshake) = &conn.phase else {
            unreachable!("upgrade is only called during the handshake");
        };
        let open = Phase::Open(Open {
            session: Session::new(ws::Role::Server, deflate, self.tick, &self.session_config),
            endpoint,
            role: handshake.info.role,
            fragmented_echo: None,
        });
        let Phase::Handshake(handshake) = std::mem::replace(&mut conn.phase, open) else {
            unreachable!("upgrade is only called during the handshake");
        };
        // The request buffer goes with the handshake; frames the client
        // sent right behind its request are decoded from it once.
        let Handshake {
            mut request, info, ..
        } = *handshake;
        conn.out.push_bytes(response);
        self.pending_handshakes -= 1;
        self.open_websockets += 1;
        self.stats.upgrades += 1;
        self.mark_dirty(token);
        let deadline = self.conns[token].next_deadline(self.config.idle_timeout);
        self.schedule(token, deadline);
        let now = self.now;
        let (app, mut out) = self.app_and_outbox();
        app.on_open(token, endpoint, info, grant, now, &mut out);
        if request.len() > consumed {
            self.websocket_input(token, &mut request[consumed..]);
        }
    }

    /// A client spoke plain HTTP to a TLS listener: it gets a plain HTTP
    /// 400 saying so (it could read nothing else), then the close.
    pub(super) fn plain_http_on_tls(&mut self, token: usize) {
        *self.stats.tls_failures.entry("plain_http").or_default() += 1;
        let conn = &mut self.conns[token];
        if let Some(key) = conn.tls.take() {
            self.tls.remove(key);
        }
        let reason = "this port speaks TLS only: use https:// or wss://";
        self.reject(token, Rejection::new(400, reason));
    }

    pub(super) fn reject(&mut self, token: usize, rejection: Rejection) {
        *self.stats.rejections.entry(rejection.status).or_default() += 1;
        let response = rejection.to_response();
        self.respond(token, &response, &rejection.reason);
    }

    /// Queues a final HTTP response; the connection closes once it is sent.
    fn respond(&mut self, token: usize, response: &[u8], what: &str) {
        let conn = &mut self.conns[token];
        debug!("conn {token}: HTTP response: {what}");
        if matches!(conn.phase, Phase::Handshake(_)) {
            self.pending_handshakes -= 1;
        }
        let deadline = conn.phase.respond(self.tick, self.config.close_timeout);
        conn.out.push_bytes(response);
        self.mark_dirty(token);
        self.schedule(token, deadline);
    }
}

fn endpoint_name(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Echo => "echo",
        Endpoint::Ws => "ws",
        Endpoint::Chat => "chat",
        Endpoint::Kline => "kline",
    }
}

/// A response as a `HEAD` request gets it: the head only, with the
/// `Content-Length` the body would have (RFC 9110 §9.3.2).
fn head_or_whole(response: &[u8], head_only: bool) -> &[u8] {
    if !head_only {
        return response;
    }
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(response.len(), |at| at + 4);
    &response[..end]
}
