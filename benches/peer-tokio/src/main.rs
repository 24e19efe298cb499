//! The comparison peer for fanout's benchmarks (`benches/compare.sh`): the
//! idiomatic tokio-tungstenite server, on tokio's `current_thread` runtime
//! so that, like fanout, it uses one core.
//!
//! Endpoints (one listener):
//! - `/sub`: every connection is a subscriber of the one broadcast stream;
//!   whatever it sends is ignored (pings are answered by tungstenite).
//! - `/pub`: every text message is published. The peer wraps it, without
//!   parsing it, in the same envelope fanout sends its subscribers,
//!   `{"type":"message","channel":"bench","offset":N,"ts":MILLIS,"data":<text>}`,
//!   encodes that once and shares it (a refcounted `Bytes`) with every
//!   subscriber, so both servers put the same bytes on the wire per delivery.
//!   A binary message is rebroadcast verbatim. No ack is sent.
//! - any other path: echo of every text and binary message.
//!
//! A subscriber more than `--broadcast-capacity` messages behind loses the
//! oldest ones (tokio's `broadcast` lag), as fanout drops for a full queue.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{future, SinkExt, StreamExt, TryStreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

struct Shared {
    tx: broadcast::Sender<Message>,
    offset: AtomicU64,
}

fn lagged(n: u64) {
    eprintln!("peer-tokio: a subscriber lagged and lost {n} message(s)");
}

fn usage() -> ! {
    eprintln!("usage: peer-tokio [--listen 127.0.0.1:PORT] [--broadcast-capacity N]");
    std::process::exit(2);
}

fn main() {
    let mut listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut capacity = 4096usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--listen" => listen = value.parse().unwrap_or_else(|_| usage()),
            "--broadcast-capacity" => capacity = value.parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(serve(listen, capacity));
}

async fn serve(listen: SocketAddr, capacity: usize) {
    let listener = TcpListener::bind(listen).await.unwrap_or_else(|e| {
        eprintln!("peer-tokio: cannot bind {listen}: {e}");
        std::process::exit(1);
    });
    println!("peer-tokio listening on ws://{}", listener.local_addr().unwrap());
    let (tx, _) = broadcast::channel(capacity);
    let shared = Arc::new(Shared { tx, offset: AtomicU64::new(0) });
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection(stream, shared.clone()));
            }
            // Out of descriptors: wait for some to close, like fanout.
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn connection(stream: TcpStream, shared: Arc<Shared>) {
    let mut path = String::new();
    let callback = |request: &Request, response: Response| {
        path = request.uri().path().to_owned();
        Ok(response)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    match path.as_str() {
        "/sub" => {
            let rx = shared.tx.subscribe();
            let (mut sink, mut stream) = ws.split();
            let mut rx = rx;
            loop {
                tokio::select! {
                    received = rx.recv() => {
                        let message = match received {
                            Ok(message) => message,
                            Err(RecvError::Lagged(n)) => {
                                lagged(n);
                                continue;
                            }
                            Err(RecvError::Closed) => break,
                        };
                        // Queue everything already waiting, then write once.
                        if sink.feed(message).await.is_err() {
                            break;
                        }
                        loop {
                            match rx.try_recv() {
                                Ok(message) => {
                                    if sink.feed(message).await.is_err() {
                                        return;
                                    }
                                }
                                Err(TryRecvError::Lagged(n)) => {
                                    lagged(n);
                                }
                                Err(_) => break,
                            }
                        }
                        if sink.flush().await.is_err() {
                            break;
                        }
                    }
                    incoming = stream.next() => match incoming {
                        Some(Ok(_)) => {}
                        _ => break,
                    },
                }
            }
        }
        "/pub" => {
            let mut ws = ws;
            while let Some(Ok(message)) = ws.next().await {
                let out = match message {
                    Message::Text(data) => {
                        let offset = shared.offset.fetch_add(1, Ordering::Relaxed) + 1;
                        let ts = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
                        let envelope = format!(
                            r#"{{"type":"message","channel":"bench","offset":{offset},"ts":{ts},"data":{}}}"#,
                            data.as_str()
                        );
                        Message::Text(Utf8Bytes::from(envelope))
                    }
                    Message::Binary(data) => Message::Binary(data),
                    Message::Close(_) => break,
                    _ => continue,
                };
                // No subscriber is not an error.
                let _ = shared.tx.send(out);
            }
        }
        _ => {
            // The tokio-tungstenite echo example: feed while input is ready,
            // flush when it is not.
            let (sink, stream) = ws.split();
            let _ = stream
                .try_filter(|m| future::ready(m.is_text() || m.is_binary()))
                .forward(sink)
                .await;
        }
    }
}
