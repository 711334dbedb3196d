//! `WsSession`: one actor per browser.
//!
//! It owns the socket: parses each frame once into a [`ClientFrame`], answers protocol errors
//! itself, forwards subscriptions and publishes to the router ([`FromSession`], never waiting:
//! a full router intake answers `rate_limited`), and writes what the router sends it
//! ([`ToSession`]). A browser over `ws.max_frames_per_second`, or one the router cannot keep
//! up with, gets one `rate_limited` error per one-second window, not one per dropped frame. It pings every `ws.heartbeat_interval_ms` and closes after
//! `ws.client_timeout_ms` of silence. Its mailbox is its bounded outbound queue: the router
//! `try_send`s into it, and the connection's pump ([`crate::websocket`]) stops polling the actor
//! while the socket cannot take more, so a full mailbox means a slow reader. A socket that
//! takes nothing for `ws.client_timeout_ms` is dropped by the pump.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web_actors::ws::{self, CloseCode, CloseReason, ProtocolError};
use uuid::Uuid;

use crate::actors::messages::{FromSession, Outbox, Publish, RouterIntake, ToSession};
use crate::config::Config;
use crate::metrics::{Dropped, Metrics};
use crate::protocol::{parse_client_frame, ClientFrame, ErrorCode, Refusal, ServerFrame};

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
    /// A `rate_limited` error went out in this window; further drops are only counted.
    told: bool,
}

impl RateWindow {
    fn new(now: Instant) -> Self {
        RateWindow {
            started: now,
            frames: 0,
            told: false,
        }
    }
}

/// One browser connection.
pub struct WsSession {
    id: Uuid,
    router: RouterIntake,
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
    pub fn new(router: RouterIntake, config: Arc<Config>, metrics: Arc<Metrics>, slot: SessionSlot) -> Self {
        WsSession {
            id: Uuid::new_v4(),
            router,
            config,
            metrics,
            queued_bytes: Arc::new(AtomicUsize::new(0)),
            heartbeat: Instant::now(),
            rate: RateWindow::new(Instant::now()),
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

    /// False when this frame exceeds the per-second budget (it is then dropped).
    fn within_rate(&mut self, ctx: &mut ws::WebsocketContext<Self>) -> bool {
        let now = Instant::now();
        if now.duration_since(self.rate.started) >= Duration::from_secs(1) {
            self.rate = RateWindow::new(now);
        }
        self.rate.frames += 1;
        if self.rate.frames > self.config.ws.max_frames_per_second {
            self.dropped(Dropped::RateLimited, ctx);
            return false;
        }
        true
    }

    /// Counts a dropped frame; the first drop of a window is told to the browser.
    fn dropped(&mut self, reason: Dropped, ctx: &mut ws::WebsocketContext<Self>) {
        self.metrics.frame_dropped(reason);
        if std::mem::replace(&mut self.rate.told, true) {
            return;
        }
        let message = match reason {
            Dropped::RateLimited => format!(
                "more than {} frames per second (ws.max_frames_per_second); frames are dropped \
                 without further notice until the second is over",
                self.config.ws.max_frames_per_second
            ),
            Dropped::RouterBusy => "the bridge is overloaded; requests are dropped without further \
                                    notice until the second is over: retry later"
                .to_string(),
        };
        self.refuse(ctx, Refusal::new(ErrorCode::RateLimited, message));
    }

    /// Hands a request to the router without waiting; a full router intake drops it.
    fn ask_router(&mut self, request: FromSession, ctx: &mut ws::WebsocketContext<Self>) {
        match self.router.try_send(request) {
            Ok(()) => {}
            Err(SendError::Full(_)) => self.dropped(Dropped::RouterBusy, ctx),
            // The router stops only at shutdown, which closes this session too.
            Err(SendError::Closed(_)) => {}
        }
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
            ClientFrame::Subscribe { desks } => self.ask_router(FromSession::Subscribe(session, desks), ctx),
            ClientFrame::Unsubscribe { desks } => {
                self.ask_router(FromSession::Unsubscribe(session, desks), ctx)
            }
            ClientFrame::Publish {
                desk,
                event,
                data,
                reference,
            } => {
                let publish = Publish {
                    session,
                    desk,
                    event,
                    data,
                    reference,
                };
                self.ask_router(FromSession::Publish(publish), ctx);
            }
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
        // do_send: connect and disconnect must never be dropped, whatever the intake holds.
        self.router.do_send(FromSession::Connect(self.id, outbox));
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
        self.router.do_send(FromSession::Disconnect(self.id));
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
            // actix-web-actors reports a text frame that is not UTF-8 as an I/O error naming
            // UTF-8; RFC 6455 asks for 1007, as for a fragmented message (`on_continuation`).
            Err(ProtocolError::Io(error)) if error.to_string().contains("utf-8") => {
                return Self::close(ctx, CloseCode::Invalid, "text message is not valid UTF-8".into());
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
