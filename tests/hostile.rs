//! A hostile client at the connection level (issue #20): oversized frame headers, answers that
//! are never read, DNS rebinding, malformed `Origin`s and control-frame floods — real bridge
//! on port 0, real broker, hand-made HTTP and WebSocket bytes where a well-behaved client
//! library would refuse to send them.

mod common;

use std::net::SocketAddr;
use std::time::Instant;

use common::bridge::{hs256_token, jwt_test_config, unix_now};
use common::browser::{small_receive_buffer, ws_url};
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "hostile-test-secret";

/// A token for user `mallory` that may read and publish everything, valid for an hour.
fn token() -> String {
    let claims =
        json!({"sub": "mallory", "exp": unix_now() + 3600, "desks": {"*": ["subscribe", "publish"]}});
    hs256_token(SECRET, &claims)
}

/// An upgrade request for `path` with `Host: host` and the extra header lines in `extra`
/// (each ending in CRLF), as raw bytes: header values need not be text.
fn upgrade_request(path: &str, host: &str, extra: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    )
    .into_bytes();
    request.extend_from_slice(extra);
    request.extend_from_slice(b"\r\n");
    request
}

/// Sends `request` on a new connection and reads the answer's head (byte by byte, so that no
/// WebSocket frame after it is consumed): its status, its head, and the connection.
async fn raw_upgrade(addr: SocketAddr, request: &[u8]) -> (u16, String, TcpStream) {
    let mut stream = TcpStream::connect(addr).await.expect("connect to the bridge");
    stream.write_all(request).await.expect("send the upgrade");
    let mut head = Vec::new();
    let read_head = async {
        while !head.ends_with(b"\r\n\r\n") {
            let byte = stream.read_u8().await.expect("the bridge answers the upgrade");
            head.push(byte);
        }
    };
    tokio::time::timeout(DEADLINE, read_head)
        .await
        .expect("an answer to the upgrade before the deadline");
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {head}"));
    (status, head, stream)
}

/// The status of the answer to an upgrade with these headers (connection dropped).
async fn upgrade_status(addr: SocketAddr, host: &str, extra: &[u8]) -> (u16, String) {
    let (status, head, _) = raw_upgrade(addr, &upgrade_request("/ws", host, extra)).await;
    (status, head)
}

/// A masked client frame header (RFC 6455 §5.2) declaring `len` payload bytes, with the
/// all-zero mask (so the payload goes as is).
fn frame_header(first_byte: u8, len: u64) -> Vec<u8> {
    let mut header = vec![first_byte];
    match len {
        0..=125 => header.push(0x80 | len as u8),
        126..=0xFFFF => {
            header.push(0x80 | 126);
            header.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            header.push(0x80 | 127);
            header.extend_from_slice(&len.to_be_bytes());
        }
    }
    header.extend_from_slice(&[0; 4]);
    header
}

/// Reads server frames (unmasked) until a close frame; returns its code (0 when it has none).
/// Fails when the connection ends without one or nothing comes before the deadline.
async fn close_code(stream: &mut TcpStream) -> u16 {
    let read = async {
        loop {
            let mut head = [0u8; 2];
            stream
                .read_exact(&mut head)
                .await
                .expect("a frame, not the end of the connection");
            let len = match head[1] & 0x7F {
                126 => u64::from(stream.read_u16().await.expect("16-bit length")),
                127 => stream.read_u64().await.expect("64-bit length"),
                len => u64::from(len),
            };
            let mut payload = vec![0u8; usize::try_from(len).expect("a sane server frame")];
            stream
                .read_exact(&mut payload)
                .await
                .expect("the frame's payload");
            if head[0] & 0x0F == 0x8 {
                return payload
                    .get(..2)
                    .map_or(0, |code| u16::from_be_bytes([code[0], code[1]]));
            }
        }
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .expect("a close frame before the deadline")
}

/// Opens a raw WebSocket on `path` and sends a text frame header declaring `declared` bytes,
/// then a little of that payload; the bridge must answer 1009 without waiting for the rest.
async fn assert_oversized_header_closed(addr: SocketAddr, path: &str, declared: u64) {
    let (status, head, mut stream) = raw_upgrade(addr, &upgrade_request(path, &addr.to_string(), b"")).await;
    assert_eq!(status, 101, "{head}");
    stream
        .write_all(&frame_header(0x81, declared))
        .await
        .expect("send the header");
    // 64 KiB of the payload, no more: a bridge that buffers until the whole frame is there
    // (or its auth timeout) never answers in time.
    stream
        .write_all(&vec![b' '; 64 * 1024])
        .await
        .expect("send some payload");
    assert_eq!(
        close_code(&mut stream).await,
        1009,
        "a {declared}-byte frame on {path}"
    );
}

/// A session that works: connects (with `token` if given), subscribes and gets a pong.
async fn assert_healthy(bridge: &TestBridge, token: Option<&str>) {
    let url = match token {
        Some(token) => format!("{}?token={token}", ws_url(bridge.addr)),
        None => ws_url(bridge.addr),
    };
    let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("upgrade");
    let mut browser = Browser::from_stream(ws).await;
    browser.subscribe(&["A"]).await;
    browser.assert_quiet().await;
    bridge.wait_health(200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_header_over_max_frame_bytes_is_closed_1009_before_its_payload() {
    let bridge = TestBridge::start_healthy(jwt_test_config("hostile-header", SECRET)).await;
    let signed = format!("/ws?token={}", token());
    for declared in [100 << 20, 1 << 40] {
        // Before sign-in (the token would come in the first frame) and after.
        assert_oversized_header_closed(bridge.addr, "/ws", declared).await;
        assert_oversized_header_closed(bridge.addr, &signed, declared).await;
    }
    assert_healthy(&bridge, Some(&token())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_that_would_push_a_message_over_the_limit_is_closed_1009_at_its_header() {
    let bridge = TestBridge::start_healthy(test_config("hostile-fragments")).await;
    let addr = bridge.addr;
    let (status, head, mut stream) = raw_upgrade(addr, &upgrade_request("/ws", &addr.to_string(), b"")).await;
    assert_eq!(status, 101, "{head}");
    let max = bridge.config.ws.max_frame_bytes as u64;
    // A first fragment of most of the limit, whole; then a continuation whose header alone
    // says the message would exceed it.
    let first = max * 3 / 4;
    let mut fragment = frame_header(0x01, first);
    fragment.resize(fragment.len() + first as usize, b' ');
    stream
        .write_all(&fragment)
        .await
        .expect("send the first fragment");
    stream
        .write_all(&frame_header(0x00, first))
        .await
        .expect("send the continuation header");
    assert_eq!(close_code(&mut stream).await, 1009);
    assert_healthy(&bridge, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_answers_never_read_count_against_the_byte_budget_and_close_1013() {
    let mut config = test_config("hostile-answers");
    config.ws.outbound_queue_bytes = 256 * 1024;
    // The queries stay within the rate limit: only the unread answers may end the session.
    config.ws.max_frames_per_second = 1_000_000;
    let bridge = TestBridge::start_healthy(config).await;
    // Readers of desk A make each presence answer about 2 KiB.
    let mut readers = Vec::new();
    for _ in 0..30 {
        let mut reader = Browser::connect(&bridge).await;
        reader.subscribe(&["A"]).await;
        readers.push(reader);
    }
    let stream = small_receive_buffer(bridge.addr).await;
    let (ws, _) = tokio_tungstenite::client_async(ws_url(bridge.addr), stream)
        .await
        .expect("upgrade");
    let (mut sink, mut frames) = ws.split();
    // 10 000 answers (about 20 MiB): many times the socket buffers and the 256 KiB budget.
    // Sent from a task of its own: once the bridge stops reading, sends wait.
    let query = json!({"op": "presence", "desk": "A", "ref": "q"}).to_string();
    let flood = tokio::spawn(async move {
        for _ in 0..10_000 {
            if sink.send(Message::Text(query.clone())).await.is_err() {
                break;
            }
        }
        sink
    });
    bridge
        .wait_metric("deskbridge_sessions_slow_closed_total 1")
        .await;
    // Now read: what was written, then the close.
    let read = async {
        while let Some(message) = frames.next().await {
            match message {
                Ok(Message::Close(frame)) => return frame,
                Ok(_) => continue,
                Err(error) => panic!("the connection failed before the close: {error}"),
            }
        }
        None
    };
    let close = tokio::time::timeout(DEADLINE, read)
        .await
        .expect("the close before the deadline")
        .expect("a close frame");
    assert_eq!(close.code, CloseCode::Again, "{}", close.reason);
    drop(flood);
    for reader in &mut readers {
        reader.assert_quiet().await;
    }
    bridge.wait_health(200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_is_not_loopback_is_refused_on_a_loopback_bind() {
    let bridge = TestBridge::start_healthy(test_config("hostile-host")).await;
    let addr = bridge.addr;
    let port = addr.port();
    // DNS rebinding: the page's own origin, on a name that now resolves to 127.0.0.1.
    let evil = format!("evil.example:{port}");
    let origin = format!("Origin: http://{evil}\r\n");
    let (status, head) = upgrade_status(addr, &evil, origin.as_bytes()).await;
    assert_eq!(status, 403, "{head}");
    let (status, head) = upgrade_status(addr, &evil, b"").await;
    assert_eq!(status, 403, "without Origin too: {head}");
    let second = format!("Host: {evil}\r\n");
    let (status, head) = upgrade_status(addr, &format!("localhost:{port}"), second.as_bytes()).await;
    // actix-http refuses a request with two `Host`s itself, before any upgrade.
    assert_eq!(status, 400, "a second Host: {head}");
    bridge
        .wait_metric("deskbridge_handshakes_refused_total{reason=\"host\"} 2")
        .await;
    for host in [
        format!("localhost:{port}"),
        format!("LocalHost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("127.1.2.3:{port}"),
        format!("[::1]:{port}"),
        "localhost".to_string(),
    ] {
        let (status, head) = upgrade_status(addr, &host, b"").await;
        assert_eq!(status, 101, "Host: {host}: {head}");
    }
    assert_healthy(&bridge, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_hosts_admits_a_listed_name_with_or_without_its_port() {
    let mut config = test_config("hostile-allowed");
    config.ws.allowed_hosts = vec!["desk.internal".into(), "bridge.internal:1".into()];
    let bridge = TestBridge::start_healthy(config).await;
    let addr = bridge.addr;
    let port = addr.port();
    for (host, expected) in [
        (format!("desk.internal:{port}"), 101),
        ("DESK.internal".to_string(), 101),
        ("bridge.internal:1".to_string(), 101),
        (format!("bridge.internal:{port}"), 403),
        (format!("evil.example:{port}"), 403),
    ] {
        let (status, head) = upgrade_status(addr, &host, b"").await;
        assert_eq!(status, expected, "Host: {host}: {head}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_that_is_not_text_or_comes_twice_is_refused() {
    let bridge = TestBridge::start_healthy(test_config("hostile-origin")).await;
    let addr = bridge.addr;
    let own = format!("Origin: http://{addr}\r\n");
    let (status, head) = upgrade_status(addr, &addr.to_string(), own.as_bytes()).await;
    assert_eq!(status, 101, "the bridge's own origin: {head}");
    let (status, head) =
        upgrade_status(addr, &addr.to_string(), b"Origin: http://\xff\xfe.example\r\n").await;
    assert_eq!(status, 403, "an Origin that is not text: {head}");
    let twice = format!("{own}Origin: https://evil.example\r\n");
    let (status, head) = upgrade_status(addr, &addr.to_string(), twice.as_bytes()).await;
    assert_eq!(status, 403, "two Origins: {head}");
    bridge
        .wait_metric("deskbridge_handshakes_refused_total{reason=\"origin\"} 2")
        .await;
    assert_healthy(&bridge, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_counts_against_max_frames_per_second() {
    let mut config = test_config("hostile-pings");
    config.ws.max_frames_per_second = 100;
    let bridge = TestBridge::start_healthy(config).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(bridge.addr))
        .await
        .expect("upgrade");
    let welcome = ws.next().await.expect("welcome").expect("a frame");
    assert!(matches!(welcome, Message::Text(_)), "{welcome:?}");
    let started = Instant::now();
    for _ in 0..5000 {
        ws.feed(Message::Ping(b"flood".to_vec()))
            .await
            .expect("send a ping");
    }
    ws.flush().await.expect("flush the pings");
    // The pongs of the first window come first, then the one `rate_limited` of that window.
    let mut pongs = 0;
    let error = loop {
        let message = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("rate_limited before the deadline")
            .expect("the connection stays open")
            .expect("a valid frame");
        match message {
            Message::Pong(_) => pongs += 1,
            Message::Text(text) => break serde_json::from_str::<Value>(&text).expect("JSON"),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(error["code"], "rate_limited", "{error}");
    // One window's share, or two when the flood straddled a window's end.
    let windows = started.elapsed().as_secs() + 2;
    assert!(pongs <= 100 * windows, "{pongs} pongs in {windows} windows");
    bridge
        .wait_metric_at_least(
            "deskbridge_ws_frames_dropped_total{reason=\"rate_limited\"}",
            1000,
        )
        .await;
    drop(ws);
    assert_healthy(&bridge, None).await;
}
