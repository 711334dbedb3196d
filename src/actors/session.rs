//! `WsSession`: one actor per browser.
//!
//! It owns the socket's conversation: the connection's pump ([`crate::websocket`]) decodes
//! what the browser sends and hands each frame to it ([`FromBrowser`]); it parses each text
//! frame once into a [`ClientFrame`], answers protocol errors itself, and forwards
//! subscriptions and publishes to the router ([`FromSession`], never waiting: a full router
//! intake answers `rate_limited`). A browser over `ws.max_frames_per_second`, or one the router
//! cannot keep up with, gets one `rate_limited` error per one-second window, not one per
//! dropped frame.
//!
//! Everything the browser receives goes through the session's [`Lane`], which the pump writes
//! to the socket: the session's own frames (welcome, errors, pongs, its close) and the
//! router's (events, replies, the heartbeat's pings, a close it asks for, which ends the
//! session once written). The lane's byte budget is the bounded outbound queue, so a full lane
//! means a slow reader. A socket that takes nothing for `ws.client_timeout_ms` is dropped by
//! the pump; a browser that sends nothing for as long is closed by the router's heartbeat.
//!
//! Why a plain actor `Context` under the pump rather than actix-web-actors'
//! `WebsocketContext`: the latter keeps its own encoder, frame queue and read buffer in every
//! session, about a kilobyte of an idle browser's memory, for work the lane and the pump
//! already do.
//!
//! With `auth.mode = "jwt"` the session also enforces its token ([`Access`]): nothing but
//! `auth` and `ping` before one, the desks' rights on every request, an `expiring` warning a
//! minute before `exp`, `refresh`, and close 4401 at `exp` — by its own timer, and by a check
//! on every outgoing frame, so no event leaves after the token expired.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_http::ws::{self, CloseCode, CloseReason, ProtocolError};
use uuid::Uuid;

use crate::actors::messages::{FromSession, Outbox, Publish, ReplyFromWeb, RouterIntake};
use crate::admission::SessionSlot;
use crate::auth::{AuthError, Identity, Right, Verifier};
use crate::config::Config;
use crate::lane::{Frame, Lane, QueueError};
use crate::metrics::{Dropped, Metrics};
use crate::protocol::{
    parse_client_frame, ClientFrame, ErrorCode, Refusal, ServerFrame, Token, CLOSE_UNAUTHORIZED,
    DEFAULT_TIMEOUT, MAX_TIMEOUT,
};

/// Longest close reason RFC 6455 allows (125 bytes of payload less the 2-byte code).
const MAX_CLOSE_REASON: usize = 123;

/// Longest a token is trusted for: an absurd `exp` must not overflow the session's clock.
const MAX_TOKEN_LIFE: Duration = Duration::from_secs(366 * 24 * 3600);

/// What every session shares, set up once: one pointer per session.
pub struct SessionEnv {
    /// Shared configuration.
    pub config: Arc<Config>,
    /// Shared counters.
    pub metrics: Arc<Metrics>,
    /// The router's intake.
    pub router: RouterIntake,
    /// Token verification; `None` with `auth.mode = "none"`.
    pub verifier: Option<Verifier>,
}

/// How far a session is allowed.
enum Access {
    /// `auth.mode = "none"`: everything.
    Open,
    /// Waiting for the `auth` frame from this peer.
    Waiting(Box<Peer>),
    /// A verified token, until it expires.
    Signed(Box<Signed>),
    /// The token expired or never came; the session is closing and sends nothing more.
    Closed,
}

/// The browser's address, for the log lines of refused tokens.
type Peer = Option<std::net::SocketAddr>;

/// A verified token and the timers that enforce it.
struct Signed {
    identity: Identity,
    peer: Peer,
    /// The `expiring` warning and the expiry, cancelled on refresh (none until started).
    timers: Option<[SpawnHandle; 2]>,
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

/// What the connection's pump read from the browser.
#[derive(Message)]
#[rtype(result = "()")]
pub enum FromBrowser {
    /// One decoded frame.
    Frame(ws::Frame),
    /// The bytes broke the WebSocket protocol; nothing more is read.
    Broken(ProtocolError),
}

/// One browser connection.
pub struct WsSession {
    id: Uuid,
    env: Arc<SessionEnv>,
    access: Access,
    /// Everything the browser receives, written by the connection's pump.
    outbox: Outbox,
    rate: RateWindow,
    /// A fragmented message being reassembled: (is_text, bytes so far).
    fragments: Option<Box<(bool, Vec<u8>)>>,
    _slot: SessionSlot,
}

impl WsSession {
    /// A session for a new connection, holding `slot` until it ends; `identity` is the token
    /// verified at the handshake (`?token=`), if there was one.
    pub fn new(env: Arc<SessionEnv>, slot: SessionSlot, peer: Peer, identity: Option<Identity>) -> Self {
        let access = match (&env.verifier, identity) {
            (None, _) => Access::Open,
            (Some(_), None) => Access::Waiting(Box::new(peer)),
            // Timers are armed when the actor starts.
            (Some(_), Some(identity)) => Access::Signed(Box::new(Signed {
                identity,
                peer,
                timers: None,
            })),
        };
        let ws = &env.config.ws;
        let outbox = Outbox::new(Lane::new(ws.outbound_queue_bytes, ws.outbound_queue_frames));
        WsSession {
            id: Uuid::new_v4(),
            env,
            access,
            outbox,
            rate: RateWindow::new(Instant::now()),
            fragments: None,
            _slot: slot,
        }
    }

    /// The link whose lane holds everything this session's browser receives, for the connection's
    /// pump.
    pub fn outbox(&self) -> Outbox {
        self.outbox.clone()
    }

    /// What the pump calls once a session that fell behind has room again: the router is
    /// told, and feeds it.
    pub fn drained_notice(&self) -> impl Fn() + 'static {
        let (router, id) = (Arc::clone(&self.env.router), self.id);
        move || router.do_send(FromSession::Drained(id))
    }

    /// Refuses a frame that could not be read; before `auth`, whatever it was, the answer is
    /// `unauthenticated`.
    fn refuse_frame(&self, refusal: Refusal) {
        match self.access {
            Access::Waiting(_) => self.refuse(Refusal {
                reference: refusal.reference,
                ..unauthenticated()
            }),
            _ => self.refuse(refusal),
        }
    }

    fn refuse(&self, refusal: Refusal) {
        self.env.metrics.ws_error(refusal.code);
        self.send(&refusal.framed());
    }

    /// Queues one of the session's own frames, after whatever the router queued before it.
    fn send(&self, frame: &Frame) {
        if self.outbox.lane().push(frame) == Err(QueueError::Full) {
            self.env.metrics.answers_unread(&self.id);
        }
    }

    /// Closes with `code`: the close frame is the last one written.
    fn close(&self, ctx: &mut Context<Self>, code: CloseCode, reason: &str) {
        self.end(ctx, &close_frame(code, reason));
    }

    /// Queues `last` (a close frame) as the last frame and stops.
    fn end(&self, ctx: &mut Context<Self>, last: &Frame) {
        self.outbox.lane().finish(last);
        ctx.stop();
    }

    /// False when this frame exceeds the per-second budget (it is then dropped).
    fn within_rate(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.rate.started) >= Duration::from_secs(1) {
            self.rate = RateWindow::new(now);
        }
        self.rate.frames += 1;
        if self.rate.frames > self.env.config.ws.max_frames_per_second {
            // Dropped unread: parsing it for its `ref` is the work the budget saves.
            self.dropped(Dropped::RateLimited, None);
            return false;
        }
        true
    }

    /// Counts a dropped frame; the first drop of a window is told to the browser, with the
    /// frame's `ref` when it was read.
    fn dropped(&mut self, reason: Dropped, reference: Option<String>) {
        self.env.metrics.frame_dropped(reason);
        if std::mem::replace(&mut self.rate.told, true) {
            return;
        }
        let message = match reason {
            Dropped::RateLimited => format!(
                "more than {} frames per second (ws.max_frames_per_second); frames are dropped \
                 without further notice until the second is over",
                self.env.config.ws.max_frames_per_second
            ),
            Dropped::RouterBusy => "the bridge is overloaded; requests are dropped without further \
                                    notice until the second is over: retry later"
                .to_string(),
        };
        self.refuse(Refusal {
            reference,
            ..Refusal::new(ErrorCode::RateLimited, message)
        });
    }

    /// Hands a request to the router without waiting; a full router intake drops it.
    fn ask_router(&mut self, request: FromSession) {
        match self.env.router.try_send(request) {
            Ok(()) => {}
            Err(SendError::Full(request)) => self.dropped(Dropped::RouterBusy, request.into_reference()),
            // The router stops only at shutdown, which closes this session too.
            Err(SendError::Closed(_)) => {}
        }
    }

    fn on_text(&mut self, text: &str, ctx: &mut Context<Self>) {
        if !self.within_rate() {
            return;
        }
        let frame = match parse_client_frame(text) {
            Ok(frame) => frame,
            Err(refusal) => return self.refuse_frame(refusal),
        };
        match (&self.access, frame) {
            (_, ClientFrame::Ping { reference }) => {
                let reference = reference.as_deref();
                self.send(&ServerFrame::Pong { reference }.framed())
            }
            (Access::Closed, _) => {}
            (Access::Waiting(_), ClientFrame::Auth { token, reference }) => {
                self.authenticate(&token, reference, ctx)
            }
            (Access::Waiting(_), frame) => self.refuse(Refusal {
                reference: frame.into_reference(),
                ..unauthenticated()
            }),
            (Access::Signed(_), ClientFrame::Refresh { token, reference }) => {
                self.refresh(&token, reference, ctx)
            }
            (Access::Open, frame @ (ClientFrame::Auth { .. } | ClientFrame::Refresh { .. })) => {
                let message = "auth.mode is \"none\" on this bridge: no token is needed";
                self.refuse(Refusal {
                    reference: frame.into_reference(),
                    ..Refusal::new(ErrorCode::BadRequest, message)
                });
            }
            (Access::Signed(_), ClientFrame::Auth { reference, .. }) => {
                let message = "this session is authenticated already; send `refresh` for a new token";
                self.refuse(Refusal {
                    reference,
                    ..Refusal::new(ErrorCode::BadRequest, message)
                });
            }
            (_, request) => self.request(request),
        }
    }

    /// A subscribe, unsubscribe or publish from a session that may send one.
    fn request(&mut self, frame: ClientFrame) {
        let session = self.id;
        match frame {
            ClientFrame::Subscribe { desks, reference, .. }
            | ClientFrame::Unsubscribe { desks, reference }
                if desks.len() > self.env.config.ws.max_desks_per_subscribe =>
            {
                let message = format!(
                    "at most {} desks per request (ws.max_desks_per_subscribe)",
                    self.env.config.ws.max_desks_per_subscribe
                );
                let refusal = Refusal::new(ErrorCode::BadRequest, message);
                self.refuse(Refusal { reference, ..refusal });
            }
            ClientFrame::Subscribe {
                desks,
                since,
                presence,
                reference,
            } => match self.allowed(&desks, Right::Subscribe) {
                // All or nothing: one forbidden desk refuses the whole request.
                Err(refusal) => self.refuse(Refusal { reference, ..refusal }),
                Ok(()) => {
                    let subscribe = FromSession::Subscribe {
                        session,
                        desks,
                        since: since.map(Box::new),
                        presence,
                        reference,
                    };
                    self.ask_router(subscribe)
                }
            },
            // Who reads a desk is as private as the desk.
            ClientFrame::Presence { desk, reference } => {
                match self.allowed(std::slice::from_ref(&desk), Right::Subscribe) {
                    Err(refusal) => self.refuse(Refusal { reference, ..refusal }),
                    Ok(()) => self.ask_router(FromSession::Presence(session, desk, reference)),
                }
            }
            ClientFrame::Unsubscribe { desks, reference } => {
                self.ask_router(FromSession::Unsubscribe(session, desks, reference))
            }
            ClientFrame::Publish {
                desk,
                event,
                data,
                reference,
                ttl_ms,
            } => match self.outgoing(Right::Publish, desk, event, data, reference, ttl_ms) {
                Ok(publish) => self.ask_router(FromSession::Publish(publish)),
                Err(refusal) => self.refuse(refusal),
            },
            ClientFrame::Request {
                desk,
                event,
                data,
                reference,
                timeout_ms,
                ttl_ms,
            } => {
                let timeout = timeout_ms.map_or(DEFAULT_TIMEOUT, Duration::from_millis);
                if timeout.is_zero() || timeout > MAX_TIMEOUT {
                    let message = format!(
                        "`timeout_ms` must be between 1 and {} (default {})",
                        MAX_TIMEOUT.as_millis(),
                        DEFAULT_TIMEOUT.as_millis()
                    );
                    let refusal = Refusal::new(ErrorCode::BadRequest, message);
                    return self.refuse(Refusal { reference, ..refusal });
                }
                match self.outgoing(Right::Request, desk, event, data, reference, ttl_ms) {
                    Ok(request) => self.ask_router(FromSession::Request(request, timeout)),
                    Err(refusal) => self.refuse(refusal),
                }
            }
            ClientFrame::Reply {
                reply_id,
                data,
                reference,
            } => {
                let reply = ReplyFromWeb {
                    session,
                    user: self.user(),
                    reply_id,
                    data,
                    reference,
                };
                self.ask_router(FromSession::Reply(reply));
            }
            ClientFrame::Ping { .. } | ClientFrame::Auth { .. } | ClientFrame::Refresh { .. } => {}
        }
    }

    /// A `publish` or `request` for the router, if the token grants `right` (`publish` or
    /// `request`, spec v2 A) on `desk`.
    fn outgoing(
        &self,
        right: Right,
        desk: String,
        event: String,
        data: crate::transform::Data,
        reference: Option<String>,
        ttl_ms: Option<u64>,
    ) -> Result<Publish, Refusal> {
        if let Err(refusal) = self.allowed(std::slice::from_ref(&desk), right) {
            return Err(Refusal { reference, ..refusal });
        }
        Ok(Publish {
            session: self.id,
            ttl: ttl_ms.map(Duration::from_millis),
            user: self.user(),
            desk,
            event,
            data,
            reference,
        })
    }

    /// `forbidden` for the first desk the token does not grant `right` on.
    fn allowed(&self, desks: &[String], right: Right) -> Result<(), Refusal> {
        let Access::Signed(signed) = &self.access else {
            return Ok(());
        };
        match desks
            .iter()
            .find(|desk| !signed.identity.rights.allows(desk, right))
        {
            None => Ok(()),
            Some(desk) => Err(Refusal::new(
                ErrorCode::Forbidden,
                format!("your token does not allow `{}` on desk `{desk}`", right.as_str()),
            )),
        }
    }

    fn user(&self) -> Option<Arc<str>> {
        match &self.access {
            Access::Signed(signed) => Some(Arc::clone(&signed.identity.user)),
            _ => None,
        }
    }

    fn on_continuation(&mut self, item: actix_http::ws::Item, ctx: &mut Context<Self>) {
        let (is_text, chunk, last) = match item {
            actix_http::ws::Item::FirstText(bytes) => (Some(true), bytes, false),
            actix_http::ws::Item::FirstBinary(bytes) => (Some(false), bytes, false),
            actix_http::ws::Item::Continue(bytes) => (None, bytes, false),
            actix_http::ws::Item::Last(bytes) => (None, bytes, true),
        };
        match (is_text, self.fragments.as_deref_mut()) {
            (Some(is_text), _) => self.fragments = Some(Box::new((is_text, chunk.to_vec()))),
            (None, Some((_, buffer))) => buffer.extend_from_slice(&chunk),
            (None, None) => {
                return self.close(
                    ctx,
                    CloseCode::Protocol,
                    "continuation frame without a first frame",
                )
            }
        }
        let max = self.env.config.ws.max_frame_bytes;
        if self
            .fragments
            .as_ref()
            .is_some_and(|fragments| fragments.1.len() > max)
        {
            return self.close(ctx, CloseCode::Size, &format!("message exceeds {max} bytes"));
        }
        if !last {
            return;
        }
        match self.fragments.take().map(|fragments| *fragments) {
            Some((true, bytes)) => match String::from_utf8(bytes) {
                Ok(text) => self.on_text(&text, ctx),
                Err(_) => self.close(ctx, CloseCode::Invalid, NOT_UTF8),
            },
            _ => self.refuse_frame(binary_refusal()),
        }
    }
}

/// How long `identity` may be trusted from now, capped at [`MAX_TOKEN_LIFE`].
fn life(identity: &Identity) -> Duration {
    identity.remaining().min(MAX_TOKEN_LIFE)
}

/// Token handling: sign in, refresh, warn, expire.
impl WsSession {
    fn verifier(&self) -> &Verifier {
        // Only sessions of a bridge with a verifier leave `Access::Open`.
        self.env
            .verifier
            .as_ref()
            .expect("auth.mode = jwt has a verifier")
    }

    /// Where this session's browser is, for log lines.
    fn peer(&self) -> String {
        let peer = match &self.access {
            Access::Waiting(peer) => **peer,
            Access::Signed(signed) => signed.peer,
            Access::Open | Access::Closed => None,
        };
        match peer {
            Some(addr) => format!("{addr} (session {})", self.id),
            None => format!("session {}", self.id),
        }
    }

    /// The `auth` frame of a waiting session: welcome, or 4401 (both with the op's `ref`).
    fn authenticate(&mut self, token: &Token, reference: Option<String>, ctx: &mut Context<Self>) {
        match self.verifier().verify(&token.0) {
            Ok(identity) => {
                let peer = match &self.access {
                    Access::Waiting(peer) => **peer,
                    _ => None,
                };
                self.sign_in(identity, peer, ctx);
                self.welcome(reference.as_deref());
            }
            Err(error) => self.turn_away(error, reference, ctx),
        }
    }

    /// Counts and logs a refused token, tells the browser why (echoing the `auth` op's `ref`),
    /// and closes with 4401.
    fn turn_away(&mut self, error: AuthError, reference: Option<String>, ctx: &mut Context<Self>) {
        self.env.metrics.auth_failed(&self.peer(), &error);
        let refusal = Refusal {
            reference,
            ..Refusal::new(ErrorCode::Unauthorized, error.to_string())
        };
        self.shut_out(ctx, refusal, "unauthorized");
    }

    /// Tells the browser `refusal` and closes with 4401; nothing queued for it before is
    /// written, nor anything after.
    fn shut_out(&mut self, ctx: &mut Context<Self>, refusal: Refusal, reason: &str) {
        self.env.metrics.ws_error(refusal.code);
        self.access = Access::Closed;
        let close = close_frame(CloseCode::Other(CLOSE_UNAUTHORIZED), reason);
        self.outbox.lane().end_with(&[refusal.framed(), close]);
        ctx.stop();
    }

    /// Holds `identity` and arms its timers: `expiring` a minute before `exp`, the close at it.
    fn sign_in(&mut self, identity: Identity, peer: Peer, ctx: &mut Context<Self>) {
        let remaining = life(&identity);
        let expires_at = identity.expires_at;
        // do_send: the router must know who this is (and what it may read) whatever its
        // intake holds.
        let (user, rights) = (Arc::clone(&identity.user), identity.rights.clone());
        self.env
            .router
            .do_send(FromSession::Identify(self.id, user, rights));
        let warn_in = remaining.saturating_sub(Duration::from_secs(60));
        let timers = [
            ctx.run_later(warn_in, move |session, _| {
                session.send(&ServerFrame::Expiring { expires_at }.framed());
            }),
            ctx.run_later(remaining, |session, ctx| session.expire(ctx)),
        ];
        if let Access::Signed(old) = &self.access {
            for timer in old.timers.iter().flatten() {
                ctx.cancel_future(*timer);
            }
        }
        // No event leaves after `exp`, even if the expiry timer runs late.
        self.outbox.lane().expire_at(Some(Instant::now() + remaining));
        self.access = Access::Signed(Box::new(Signed {
            identity,
            peer,
            timers: Some(timers),
        }));
    }

    /// `refresh`: the same user's newer token replaces the rights and the expiry; desks it no
    /// longer allows are left (the router says so with `reason: permission`).
    fn refresh(&mut self, token: &Token, reference: Option<String>, ctx: &mut Context<Self>) {
        let identity = match self.verifier().verify(&token.0) {
            Ok(identity) => identity,
            Err(error) => {
                self.env.metrics.auth_failed(&self.peer(), &error);
                let message = format!("{error}; the current token stays in force until it expires");
                let refusal = Refusal::new(ErrorCode::Unauthorized, message);
                return self.refuse(Refusal { reference, ..refusal });
            }
        };
        let Access::Signed(signed) = &self.access else {
            return;
        };
        if identity.user != signed.identity.user {
            let error = AuthError::OtherUser;
            self.env.metrics.auth_failed(&self.peer(), &error);
            let refusal = Refusal::new(ErrorCode::Forbidden, error.to_string());
            return self.refuse(Refusal { reference, ..refusal });
        }
        let (expires_at, peer) = (identity.expires_at, signed.peer);
        let reference = reference.as_deref();
        self.send(
            &ServerFrame::Refreshed {
                expires_at,
                reference,
            }
            .framed(),
        );
        // Tells the router the new rights too (desks no longer allowed are left).
        self.sign_in(identity, peer, ctx);
    }

    /// `exp` has come: `token_expired`, close 4401, and nothing more for this browser.
    fn expire(&mut self, ctx: &mut Context<Self>) {
        if !matches!(self.access, Access::Signed(_)) {
            return;
        }
        let message = "your token expired: reconnect with a new one";
        let refusal = Refusal::new(ErrorCode::TokenExpired, message);
        self.shut_out(ctx, refusal, "token expired");
    }

    /// The first frame; `reference` is the `ref` of the `auth` op it answers.
    fn welcome(&self, reference: Option<&str>) {
        let session = self.id.to_string();
        let signed = match &self.access {
            Access::Signed(signed) => Some(&signed.identity),
            _ => None,
        };
        let welcome = ServerFrame::Welcome {
            session: &session,
            version: crate::VERSION,
            desks: &self.env.config.desks,
            user: signed.map(|identity| &*identity.user),
            expires_at: signed.map(|identity| identity.expires_at),
            reference,
        };
        self.send(&welcome.framed());
    }

    /// No `auth` frame in `auth.timeout_ms`: 4401.
    fn auth_timed_out(&mut self, ctx: &mut Context<Self>) {
        if matches!(self.access, Access::Waiting(_)) {
            self.turn_away(AuthError::Timeout, None, ctx);
        }
    }
}

fn unauthenticated() -> Refusal {
    Refusal::new(
        ErrorCode::Unauthenticated,
        "authenticate first: send {\"op\":\"auth\",\"token\":\"<jwt>\"}",
    )
}

fn binary_refusal() -> Refusal {
    Refusal::new(
        ErrorCode::BadRequest,
        "binary frames are not supported; send JSON text frames",
    )
}

impl Actor for WsSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // The welcome is the first frame: queued before the router knows the session.
        if !matches!(self.access, Access::Waiting(_)) {
            self.welcome(None);
        }
        // do_send: connect and disconnect must never be dropped, whatever the intake holds.
        self.env
            .router
            .do_send(FromSession::Connect(self.id, self.outbox.clone()));
        match std::mem::replace(&mut self.access, Access::Open) {
            Access::Signed(signed) => self.sign_in(signed.identity, signed.peer, ctx),
            Access::Waiting(peer) => {
                self.access = Access::Waiting(peer);
                let timeout = Duration::from_millis(self.env.config.auth.timeout_ms);
                ctx.run_later(timeout, |session, ctx| session.auth_timed_out(ctx));
            }
            access => self.access = access,
        }
    }

    fn stopping(&mut self, ctx: &mut Self::Context) -> Running {
        // actix also asks when no address of the actor is left, which for a session is always
        // (its pump drives it, nobody sends to it): it lives until it or its pump stops it.
        if ctx.state() == ActorState::Running {
            return Running::Continue;
        }
        self.outbox.lane().close();
        self.env.router.do_send(FromSession::Disconnect(self.id));
        Running::Stop
    }
}

impl Handler<FromBrowser> for WsSession {
    type Result = ();

    fn handle(&mut self, msg: FromBrowser, ctx: &mut Self::Context) {
        let frame = match msg {
            FromBrowser::Frame(frame) => frame,
            FromBrowser::Broken(ProtocolError::Overflow) => {
                let max = self.env.config.ws.max_frame_bytes;
                return self.close(ctx, CloseCode::Size, &format!("frame exceeds {max} bytes"));
            }
            FromBrowser::Broken(error) => {
                let detail = crate::log_text::Untrusted(&error);
                log::debug!("session {}: protocol error: {detail}", self.id);
                return self.close(ctx, CloseCode::Protocol, &error.to_string());
            }
        };
        match frame {
            ws::Frame::Text(bytes) => match std::str::from_utf8(&bytes) {
                Ok(text) => self.on_text(text, ctx),
                // RFC 6455 asks for 1007, as for a fragmented message (`on_continuation`).
                Err(_) => self.close(ctx, CloseCode::Invalid, NOT_UTF8),
            },
            ws::Frame::Binary(_) => {
                if self.within_rate() {
                    self.refuse_frame(binary_refusal());
                }
            }
            ws::Frame::Continuation(item) => self.on_continuation(item, ctx),
            // Control frames count like any other: a ping flood would otherwise have the
            // bridge write a pong for each. Over the limit a ping gets no pong (the window's
            // `rate_limited` says why), and the browser's heartbeat is its own business.
            ws::Frame::Ping(bytes) => {
                if self.within_rate() {
                    self.send(&Frame::pong(&bytes));
                }
            }
            ws::Frame::Pong(_) => {
                self.within_rate();
            }
            ws::Frame::Close(reason) => {
                // The answer repeats the browser's code, as RFC 6455 asks.
                let answer = match reason {
                    Some(CloseReason { code, .. }) => Frame::close(code.into(), ""),
                    None => Frame::close_without_code(),
                };
                self.end(ctx, &answer);
            }
        }
    }
}

const NOT_UTF8: &str = "text message is not valid UTF-8";

/// A close frame with `code` and `reason`, the reason cut to the 123 bytes a close frame may
/// carry, so that a long one cannot make the frame invalid (the browser would see 1006).
fn close_frame(code: CloseCode, reason: &str) -> Frame {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Frame::close(code.into(), &reason[..end])
}
