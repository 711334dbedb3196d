//! `WsSession`: one actor per browser.
//!
//! It owns the socket: parses each frame once into a [`ClientFrame`], answers protocol errors
//! itself, forwards subscriptions and publishes to the router, and writes what the router sends
//! it ([`ToSession`]). It pings every `ws.heartbeat_interval_ms` and closes after
//! `ws.client_timeout_ms` of silence. Its mailbox is its bounded outbound queue: the router
//! `try_send`s into it, and the connection's pump ([`crate::websocket`]) stops polling the actor
//! while the socket cannot take more, so a full mailbox means a slow reader. A socket that
//! takes nothing for `ws.client_timeout_ms` is dropped by the pump.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web_actors::ws::{self, CloseCode, CloseReason, ProtocolError};
use bytestring::ByteString;
use uuid::Uuid;

use crate::actors::router::{Connect, Disconnect, Publish, Router, Subscribe, Unsubscribe};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::protocol::{parse_client_frame, ClientFrame, ErrorCode, Refusal, ServerFrame};

/// Something the router sends to a session.
#[derive(Message)]
#[rtype(result = "()")]
pub enum ToSession {
    /// A serialized frame to write (shared bytes: one serialization for every receiver).
    Frame(ByteString),
    /// Close the socket with this code and reason.
    Close(CloseCode, &'static str),
}

/// Why a frame could not be queued for a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueError {
    /// Its outbound queue (frames or bytes) is full: the browser reads too slowly.
    Full,
    /// The session has ended.
    Gone,
}

/// The router's handle to a session: its mailbox plus the byte count queued in it.
#[derive(Clone)]
pub struct Outbox {
    recipient: Recipient<ToSession>,
    queued_bytes: Arc<AtomicUsize>,
    max_bytes: usize,
}

impl Outbox {
    /// A handle to a session's mailbox that refuses frames past `max_bytes` queued.
    pub fn new(recipient: Recipient<ToSession>, queued_bytes: Arc<AtomicUsize>, max_bytes: usize) -> Self {
        Outbox {
            recipient,
            queued_bytes,
            max_bytes,
        }
    }

    /// Queues a fan-out frame without waiting; `Full` means the session is too slow.
    pub fn try_frame(&self, frame: ByteString) -> Result<(), QueueError> {
        let len = frame.len();
        if self.queued_bytes.fetch_add(len, Ordering::Relaxed) + len > self.max_bytes {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            return Err(QueueError::Full);
        }
        self.recipient.try_send(ToSession::Frame(frame)).map_err(|error| {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            match error {
                SendError::Full(_) => QueueError::Full,
                SendError::Closed(_) => QueueError::Gone,
            }
        })
    }

    /// Queues a reply (ack, error, subscribed...) whatever the queue's length: replies are
    /// bounded by the session's own requests, and dropping one would leave a request unanswered.
    pub fn reply(&self, frame: ByteString) {
        self.queued_bytes.fetch_add(frame.len(), Ordering::Relaxed);
        // A closed mailbox means the session is ending; its Disconnect is on its way.
        self.recipient.do_send(ToSession::Frame(frame));
    }

    /// Asks the session to close.
    pub fn close(&self, code: CloseCode, reason: &'static str) {
        self.recipient.do_send(ToSession::Close(code, reason));
    }
}

/// A place under `ws.max_sessions`, held for the life of a session and given back on drop,
/// even when the upgrade fails before the actor starts.
pub struct SessionSlot(Arc<Metrics>);

impl SessionSlot {
    /// Takes a place, or `None` when `max` sessions are open.
    pub fn acquire(metrics: &Arc<Metrics>, max: usize) -> Option<SessionSlot> {
        metrics
            .try_open_session(max)
            .then(|| SessionSlot(Arc::clone(metrics)))
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.0.session_closed();
    }
}

/// Counts frames in the current one-second window for `ws.max_frames_per_second`.
struct RateWindow {
    started: Instant,
    frames: u32,
}

/// One browser connection.
pub struct WsSession {
    id: Uuid,
    router: Addr<Router>,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    queued_bytes: Arc<AtomicUsize>,
    /// Last time the peer showed life; refreshed by every frame, pongs included.
    heartbeat: Instant,
    rate: RateWindow,
    /// A fragmented message being reassembled: (is_text, bytes so far).
    fragments: Option<(bool, Vec<u8>)>,
    _slot: SessionSlot,
}

impl WsSession {
    /// A session for a new connection, holding `slot` until it ends.
    pub fn new(router: Addr<Router>, config: Arc<Config>, metrics: Arc<Metrics>, slot: SessionSlot) -> Self {
        WsSession {
            id: Uuid::new_v4(),
            router,
            config,
            metrics,
            queued_bytes: Arc::new(AtomicUsize::new(0)),
            heartbeat: Instant::now(),
            rate: RateWindow {
                started: Instant::now(),
                frames: 0,
            },
            fragments: None,
            _slot: slot,
        }
    }

    fn refuse(&self, ctx: &mut ws::WebsocketContext<Self>, refusal: Refusal) {
        self.metrics.ws_error(refusal.code);
        ctx.text(refusal.to_frame());
    }

    fn close(ctx: &mut ws::WebsocketContext<Self>, code: CloseCode, reason: String) {
        ctx.close(Some(CloseReason {
            code,
            description: Some(reason),
        }));
        ctx.stop();
    }

    /// False (and a `rate_limited` error) when this frame exceeds the per-second budget.
    fn within_rate(&mut self, ctx: &mut ws::WebsocketContext<Self>) -> bool {
        let now = Instant::now();
        if now.duration_since(self.rate.started) >= Duration::from_secs(1) {
            self.rate = RateWindow {
                started: now,
                frames: 0,
            };
        }
        self.rate.frames += 1;
        let limit = self.config.ws.max_frames_per_second;
        if self.rate.frames > limit {
            let message = format!("more than {limit} frames per second; this frame was dropped");
            self.refuse(ctx, Refusal::new(ErrorCode::RateLimited, message));
            return false;
        }
        true
    }

    fn on_text(&mut self, text: &str, ctx: &mut ws::WebsocketContext<Self>) {
        if !self.within_rate(ctx) {
            return;
        }
        let frame = match parse_client_frame(text) {
            Ok(frame) => frame,
            Err(refusal) => return self.refuse(ctx, refusal),
        };
        let session = self.id;
        match frame {
            ClientFrame::Ping => ctx.text(ServerFrame::Pong.to_text()),
            ClientFrame::Subscribe { desks } | ClientFrame::Unsubscribe { desks }
                if desks.len() > self.config.ws.max_desks_per_subscribe =>
            {
                let message = format!(
                    "at most {} desks per request (ws.max_desks_per_subscribe)",
                    self.config.ws.max_desks_per_subscribe
                );
                self.refuse(ctx, Refusal::new(ErrorCode::BadRequest, message));
            }
            ClientFrame::Subscribe { desks } => self.router.do_send(Subscribe { session, desks }),
            ClientFrame::Unsubscribe { desks } => self.router.do_send(Unsubscribe { session, desks }),
            ClientFrame::Publish {
                desk,
                event,
                data,
                reference,
            } => self.router.do_send(Publish {
                session,
                desk,
                event,
                data,
                reference,
            }),
        }
    }

    fn on_continuation(&mut self, item: actix_http::ws::Item, ctx: &mut ws::WebsocketContext<Self>) {
        let (is_text, chunk, last) = match item {
            actix_http::ws::Item::FirstText(bytes) => (Some(true), bytes, false),
            actix_http::ws::Item::FirstBinary(bytes) => (Some(false), bytes, false),
            actix_http::ws::Item::Continue(bytes) => (None, bytes, false),
            actix_http::ws::Item::Last(bytes) => (None, bytes, true),
        };
        match (is_text, self.fragments.as_mut()) {
            (Some(is_text), _) => self.fragments = Some((is_text, chunk.to_vec())),
            (None, Some((_, buffer))) => buffer.extend_from_slice(&chunk),
            (None, None) => {
                return Self::close(
                    ctx,
                    CloseCode::Protocol,
                    "continuation frame without a first frame".into(),
                )
            }
        }
        let max = self.config.ws.max_frame_bytes;
        if self
            .fragments
            .as_ref()
            .is_some_and(|(_, buffer)| buffer.len() > max)
        {
            return Self::close(ctx, CloseCode::Size, format!("message exceeds {max} bytes"));
        }
        if !last {
            return;
        }
        match self.fragments.take() {
            Some((true, bytes)) => match String::from_utf8(bytes) {
                Ok(text) => self.on_text(&text, ctx),
                Err(_) => Self::close(ctx, CloseCode::Invalid, "text message is not valid UTF-8".into()),
            },
            _ => self.refuse(ctx, binary_refusal()),
        }
    }
}

fn binary_refusal() -> Refusal {
    Refusal::new(
        ErrorCode::BadRequest,
        "binary frames are not supported; send JSON text frames",
    )
}

impl Actor for WsSession {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.config.ws.outbound_queue_frames);
        let outbox = Outbox::new(
            ctx.address().recipient(),
            Arc::clone(&self.queued_bytes),
            self.config.ws.outbound_queue_bytes,
        );
        self.router.do_send(Connect {
            session: self.id,
            outbox,
        });
        let session = self.id.to_string();
        ctx.text(
            ServerFrame::Welcome {
                session: &session,
                version: crate::VERSION,
                desks: &self.config.desks,
            }
            .to_text(),
        );
        let timeout = Duration::from_millis(self.config.ws.client_timeout_ms);
        ctx.run_interval(
            Duration::from_millis(self.config.ws.heartbeat_interval_ms),
            move |session, ctx| {
                if session.heartbeat.elapsed() > timeout {
                    log::info!("session {}: no frame for {timeout:?}, closing", session.id);
                    Self::close(ctx, CloseCode::Away, "heartbeat timeout".into());
                } else {
                    ctx.ping(b"");
                }
            },
        );
    }

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        self.router.do_send(Disconnect { session: self.id });
        Running::Stop
    }
}

impl Handler<ToSession> for WsSession {
    type Result = ();

    fn handle(&mut self, msg: ToSession, ctx: &mut Self::Context) {
        match msg {
            ToSession::Frame(frame) => {
                self.queued_bytes.fetch_sub(frame.len(), Ordering::Relaxed);
                ctx.text(frame);
            }
            ToSession::Close(code, reason) => Self::close(ctx, code, reason.into()),
        }
    }
}

impl StreamHandler<Result<ws::Message, ProtocolError>> for WsSession {
    fn handle(&mut self, msg: Result<ws::Message, ProtocolError>, ctx: &mut Self::Context) {
        let msg = match msg {
            Ok(msg) => msg,
            Err(ProtocolError::Overflow) => {
                let max = self.config.ws.max_frame_bytes;
                return Self::close(ctx, CloseCode::Size, format!("frame exceeds {max} bytes"));
            }
            Err(error) => {
                log::debug!("session {}: protocol error: {error}", self.id);
                return Self::close(ctx, CloseCode::Protocol, error.to_string());
            }
        };
        self.heartbeat = Instant::now();
        match msg {
            ws::Message::Text(text) => self.on_text(&text, ctx),
            ws::Message::Binary(_) => {
                if self.within_rate(ctx) {
                    self.refuse(ctx, binary_refusal());
                }
            }
            ws::Message::Continuation(item) => self.on_continuation(item, ctx),
            ws::Message::Ping(bytes) => ctx.pong(&bytes),
            ws::Message::Pong(_) | ws::Message::Nop => {}
            ws::Message::Close(reason) => {
                ctx.close(reason);
                ctx.stop();
            }
        }
    }
}
