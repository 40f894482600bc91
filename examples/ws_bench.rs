//! WebSocket echo round trips for `bench/ws.py`: an echo upstream and a load generator.
//!
//! ```sh
//! cargo build --release --example ws_bench
//! target/release/examples/ws_bench echo 127.0.0.1:9000
//! target/release/examples/ws_bench load ws://127.0.0.1:8080/ws 50 5
//! ```
//!
//! `echo ADDR` accepts WebSocket connections and sends every data message back. It refuses
//! (401) a handshake without `Authorization: Bearer …` or `DPoP …`, so a run through a proxy
//! proves that the proxy injected a credential.
//!
//! `load URL CONNS SECONDS [SIZE]` opens CONNS connections, then on each sends a SIZE-byte
//! (64) binary message and waits for its echo, again and again, for SECONDS. It prints one
//! JSON line: round trips, round trips per second, latency percentiles in ms, errors.
//! With `WS_BENCH_AUTH` set, its value is sent as `Authorization` (to load the echo directly).
//! Everything is bounded: the run stops at its deadline, and each connection at its first error.

// A load generator measures wall-clock time (the crate's injected clock is for the product),
// and tungstenite's handshake callback returns its own large error type.
#![allow(clippy::disallowed_types, clippy::result_large_err)]

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::Message;

fn usage() -> ! {
    eprintln!("usage: ws_bench echo ADDR | ws_bench load URL CONNS SECONDS [SIZE]");
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ws_bench: cannot start a runtime: {e}");
            std::process::exit(1)
        }
    };
    let result = match args.first().map(String::as_str) {
        Some("echo") if args.len() == 2 => runtime.block_on(echo(&args[1])),
        Some("load") if args.len() == 4 || args.len() == 5 => {
            let (Ok(conns), Ok(seconds)) = (args[2].parse::<usize>(), args[3].parse::<f64>())
            else {
                usage()
            };
            let size = match args.get(4).map(|s| s.parse::<usize>()) {
                None => 64,
                Some(Ok(n)) => n,
                Some(Err(_)) => usage(),
            };
            runtime.block_on(load(
                &args[1],
                conns,
                Duration::from_secs_f64(seconds),
                size,
            ))
        }
        _ => usage(),
    };
    if let Err(e) = result {
        eprintln!("ws_bench: {e}");
        std::process::exit(1)
    }
}

type Error = Box<dyn std::error::Error + Send + Sync>;

async fn echo(addr: &str) -> Result<(), Error> {
    let listener = TcpListener::bind(addr).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let check = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
                let credential = req
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("Bearer ") || v.starts_with("DPoP "));
                if credential {
                    Ok(resp)
                } else {
                    let mut refusal = ErrorResponse::new(Some("no credential".into()));
                    *refusal.status_mut() = StatusCode::UNAUTHORIZED;
                    Err(refusal)
                }
            };
            let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, check).await else {
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                if (msg.is_binary() || msg.is_text()) && ws.send(msg).await.is_err() {
                    return;
                }
            }
        });
    }
}

struct Outcome {
    latencies_us: Vec<u32>,
    error: Option<String>,
}

async fn one_connection(
    url: String,
    credential: Option<String>,
    deadline: Instant,
    size: usize,
) -> Outcome {
    let mut out = Outcome {
        latencies_us: Vec::new(),
        error: None,
    };
    let result: Result<(), Error> = async {
        let authority = url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .ok_or("the URL must start with ws://")?;
        let stream = TcpStream::connect(authority).await?;
        stream.set_nodelay(true)?;
        let mut request = url.as_str().into_client_request()?;
        if let Some(credential) = credential {
            request
                .headers_mut()
                .insert("authorization", HeaderValue::from_str(&credential)?);
        }
        let (mut ws, _) = tokio_tungstenite::client_async(request, stream).await?;
        let payload = bytes::Bytes::from(vec![b'x'; size]);
        while Instant::now() < deadline {
            let start = Instant::now();
            ws.send(Message::Binary(payload.clone())).await?;
            loop {
                match ws.next().await {
                    Some(Ok(Message::Binary(b))) if b.len() == size => break,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(other)) => return Err(format!("unexpected message {other:?}").into()),
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err("the connection closed".into()),
                }
            }
            let us = start.elapsed().as_micros();
            out.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
        }
        let _ = ws.close(None).await;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        out.error = Some(e.to_string());
    }
    out
}

async fn load(url: &str, conns: usize, duration: Duration, size: usize) -> Result<(), Error> {
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let credential = std::env::var("WS_BENCH_AUTH").ok();
            tokio::spawn(one_connection(url.to_owned(), credential, deadline, size))
        })
        .collect();
    let mut latencies: Vec<u32> = Vec::new();
    let mut errors = 0usize;
    let mut first_error = None;
    for task in tasks {
        let outcome = tokio::time::timeout(duration + Duration::from_secs(10), task).await;
        match outcome {
            Ok(Ok(o)) => {
                latencies.extend_from_slice(&o.latencies_us);
                if let Some(e) = o.error {
                    errors += 1;
                    first_error.get_or_insert(e);
                }
            }
            _ => errors += 1,
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        f64::from(latencies[i.min(latencies.len() - 1)]) / 1000.0
    };
    println!(
        "{{\"round_trips\": {}, \"seconds\": {:.3}, \"rps\": {:.1}, \"p50_ms\": {:.3}, \
         \"p99_ms\": {:.3}, \"p999_ms\": {:.3}, \"errors\": {}, \"first_error\": {}}}",
        latencies.len(),
        seconds,
        latencies.len() as f64 / seconds,
        pct(0.50),
        pct(0.99),
        pct(0.999),
        errors,
        match first_error {
            Some(e) => format!("{:?}", e),
            None => "null".to_owned(),
        }
    );
    Ok(())
}
