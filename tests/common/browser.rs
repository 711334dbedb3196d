//! A browser: a WebSocket client of the bridge's `/ws`.

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::bridge::TestBridge;
use super::DEADLINE;

/// A client WebSocket over plain TCP.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The WebSocket endpoint of the bridge at `addr`.
pub fn ws_url(addr: SocketAddr) -> String {
    format!("ws://{addr}/ws")
}

/// A TCP connection to `addr` whose receive buffer is tiny (4 KiB asked; the kernel may
/// double it), so that a reader that stops reading backs the server up quickly.
pub async fn small_receive_buffer(addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket.connect(addr).await.expect("connect")
}

/// Opens a WebSocket with `request` (a URL, or a request with headers such as `Origin`); when
/// the bridge refuses the handshake, its HTTP status and JSON body.
pub async fn handshake(
    request: impl tokio_tungstenite::tungstenite::client::IntoClientRequest + Unpin,
) -> Result<Ws, (u16, Value)> {
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = response.body().as_deref().unwrap_or_default();
            let json = serde_json::from_slice(body)
                .unwrap_or_else(|_| panic!("refusal body is JSON: {}", String::from_utf8_lossy(body)));
            Err((response.status().as_u16(), json))
        }
        Err(other) => panic!("the handshake failed without an HTTP answer: {other}"),
    }
}

/// A browser connected to `/ws`.
pub struct Browser {
    ws: Ws,
    /// The session id from `welcome`.
    pub session: String,
    /// The whole `welcome` frame.
    pub welcome: Value,
}

impl Browser {
    /// Connects and reads the `welcome`.
    pub async fn connect(bridge: &TestBridge) -> Browser {
        Browser::connect_to(bridge.addr).await
    }

    /// Connects to the bridge at `addr` (e.g. a `BridgeProcess`) and reads the `welcome`.
    pub async fn connect_to(addr: SocketAddr) -> Browser {
        let (ws, _) = tokio_tungstenite::connect_async(ws_url(addr))
            .await
            .expect("websocket upgrade");
        Browser::from_stream(ws).await
    }

    /// Upgrades an already connected TCP stream (e.g. one with tuned socket buffers).
    pub async fn over(stream: TcpStream, url: &str) -> Browser {
        let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
            .await
            .expect("websocket upgrade");
        Browser::from_stream(ws).await
    }

    /// Wraps an upgraded socket whose session waits for an `auth` frame (no `welcome` yet).
    pub fn unauthenticated(ws: Ws) -> Browser {
        Browser {
            ws,
            session: String::new(),
            welcome: Value::Null,
        }
    }

    /// Reads the `welcome` that answers an `auth` frame.
    pub async fn welcomed(&mut self) -> &Value {
        let welcome = self.recv().await;
        assert_eq!(
            welcome["op"], "welcome",
            "auth is answered with welcome: {welcome}"
        );
        self.session = welcome["session"].as_str().expect("session id").to_string();
        self.welcome = welcome;
        &self.welcome
    }

    /// Wraps an upgraded socket and reads the `welcome`.
    pub async fn from_stream(ws: Ws) -> Browser {
        let mut browser = Browser {
            ws,
            session: String::new(),
            welcome: Value::Null,
        };
        let welcome = browser.recv().await;
        assert_eq!(welcome["op"], "welcome", "first frame is welcome: {welcome}");
        browser.session = welcome["session"].as_str().expect("session id").to_string();
        browser.welcome = welcome;
        browser
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.into()))
            .await
            .expect("send frame");
    }

    /// Sends a frame; `Err` once the connection is closed.
    pub async fn try_send(&mut self, frame: Value) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        self.ws.send(Message::Text(frame.to_string())).await
    }

    /// The next message of any kind, `None` when the stream ended (deadline applies).
    pub async fn next_frame(&mut self) -> Option<Message> {
        tokio::time::timeout(DEADLINE, self.ws.next())
            .await
            .expect("a frame arrives before the deadline")
            .and_then(Result::ok)
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.expect("send frame");
    }

    /// The next JSON text frame (pings are answered by tungstenite and skipped; the deadline
    /// covers the whole wait, so heartbeats cannot stretch it).
    pub async fn recv(&mut self) -> Value {
        serde_json::from_str(&self.recv_text().await).expect("server sends JSON")
    }

    /// The next text frame as the bridge wrote it, for tests of exact text (numbers).
    pub async fn recv_text(&mut self) -> String {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let message = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("a frame arrives before the deadline")
                .expect("socket still open")
                .expect("valid websocket frame");
            match message {
                Message::Text(text) => return text,
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Subscribes to desk A resuming after `offset` of stream life `epoch`; returns the answer
    /// (`subscribed`, saying whether the resume was recovered).
    pub async fn resume(&mut self, offset: u64, epoch: &str) -> Value {
        self.send(
            json!({"op": "subscribe", "desks": ["A"], "since": {"A": {"offset": offset, "epoch": epoch}}}),
        )
        .await;
        self.recv().await
    }

    /// Reads until the server closes; returns the close frame.
    pub async fn closed(&mut self) -> Option<CloseFrame<'static>> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("the server closes before the deadline");
            match next {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }

    pub async fn subscribe(&mut self, desks: &[&str]) {
        self.send(json!({"op": "subscribe", "desks": desks})).await;
        let reply = self.recv().await;
        assert_eq!(reply, json!({"op": "subscribed", "desks": desks}));
    }

    /// Sends ping and expects pong as the very next frame: proves the session is usable and
    /// that nothing else was queued for it before.
    pub async fn assert_quiet(&mut self) {
        self.send(json!({"op": "ping"})).await;
        assert_eq!(self.recv().await, json!({"op": "pong"}));
    }

    /// Asks `presence` for `desk`; the sessions of the answer, as (session, user) pairs.
    pub async fn presence(&mut self, desk: &str) -> Vec<(String, Option<String>)> {
        self.send(json!({"op": "presence", "desk": desk, "ref": "q"}))
            .await;
        let answer = self.recv().await;
        assert_eq!(
            (
                answer["op"].as_str(),
                answer["desk"].as_str(),
                answer["ref"].as_str()
            ),
            (Some("presence"), Some(desk), Some("q")),
            "{answer}"
        );
        answer["sessions"]
            .as_array()
            .expect("sessions is a list")
            .iter()
            .map(|s| {
                (
                    s["session"].as_str().expect("session id").to_string(),
                    s["user"].as_str().map(String::from),
                )
            })
            .collect()
    }

    /// Asks `presence` until the answer holds exactly `expected` sessions (other instances'
    /// changes arrive through the broker); fails after the deadline.
    pub async fn wait_presence(&mut self, desk: &str, expected: &[String]) {
        let mut want = expected.to_vec();
        want.sort();
        let started = std::time::Instant::now();
        loop {
            let got: Vec<String> = self.presence(desk).await.into_iter().map(|(s, _)| s).collect();
            if got == want {
                return;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "presence of {desk} is {got:?}, expected {want:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Publishes and returns the `ack` or `error` reply.
    pub async fn publish(&mut self, desk: &str, event: &str, data: Value, reference: &str) -> Value {
        self.send(json!({"op": "publish", "desk": desk, "event": event, "data": data, "ref": reference}))
            .await;
        self.recv().await
    }
}
