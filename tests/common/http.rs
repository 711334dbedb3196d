//! Minimal HTTP/1.0 over a fresh TCP connection per request, and waiting for `/health`.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::poll;

/// A GET request for `path`.
fn get(addr: SocketAddr, path: &str) -> String {
    format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")
}

/// A minimal HTTP/1.0 GET: (status, body); fails the test when the bridge does not answer.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, &get(addr, path)).await
}

/// Sends `request` as is and reads the answer until the server closes: (status, body); fails
/// the test when the bridge does not answer.
pub async fn http_request(addr: SocketAddr, request: &str) -> (u16, String) {
    let (status, _, body) = exchange(addr, request)
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    (status, body)
}

/// A GET that also returns the answer's header lines: (status, head, body).
pub async fn http_get_with_head(addr: SocketAddr, path: &str) -> (u16, String, String) {
    exchange(addr, &get(addr, path))
        .await
        .unwrap_or_else(|error| panic!("{error}"))
}

/// A GET that tolerates a bridge that is not (yet, or any more) answering: `None` when the
/// connection fails or the answer is not HTTP.
pub async fn try_http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let (status, _, body) = exchange(addr, &get(addr, path)).await.ok()?;
    Some((status, body))
}

/// One request and its answer: (status, head, body), or what went wrong.
async fn exchange(addr: SocketAddr, request: &str) -> Result<(u16, String, String), String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|error| format!("connect to bridge at {addr}: {error}"))?;
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|error| format!("send request: {error}"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .map_err(|error| format!("read response: {error}"))?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {head}"))?;
    Ok((status, head.to_string(), body.to_string()))
}

/// Waits until the bridge at `addr` answers `/health` with `status`, polling every 20 ms;
/// returns its body. Fails after `within`.
pub async fn wait_health(addr: SocketAddr, status: u16, within: Duration) -> Value {
    poll(within, Duration::from_millis(20), || async move {
        let (code, body) = http_get(addr, "/health").await;
        if code == status {
            Ok(serde_json::from_str(&body).expect("health is JSON"))
        } else {
            // Links that never come up are most often a broker that is not there.
            let hint = if status == 200 {
                format!("\n{}", super::amqp::NO_BROKER)
            } else {
                String::new()
            };
            Err(format!("/health stayed {code} (wanted {status}): {body}{hint}"))
        }
    })
    .await
}
