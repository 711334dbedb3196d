//! `/ws`: the WebSocket handshake on the raw HTTP/1 connection, and the pump that joins the
//! socket to its [`WsSession`].
//!
//! Why not actix-web's usual upgrade (`actix_web_actors::ws::start`): it keeps the HTTP/1
//! dispatcher alive for the whole life of the socket, with an 8 KiB read and an 8 KiB write
//! buffer that no setting shrinks, which would dominate the memory of thousands of mostly idle
//! browsers. So the server hands upgrade requests here instead (actix-http's `upgrade` hook):
//! once the 101 is written the dispatcher's task ends, and the session runs in a task of its
//! own. Its pump reads into a stack buffer, decodes whole frames and hands them to the session
//! actor, whose context it polls in place; what the session and the router queue in the
//! session's lane it writes straight to the socket. An idle session holds no I/O buffer at
//! all, and its task holds only the session: about 1 KiB.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use actix::dev::ContextFut;
use actix::{ActorContext, ActorState, AsyncContext, Context as ActorCtx};
use actix_codec::{Decoder, Framed};
use actix_http::body::{BodySize, BoxBody, MessageBody};
use actix_http::h1::{Codec, Message};
use actix_http::{header, Request, Response, StatusCode};
use actix_web::web::{Buf, Bytes, BytesMut, Data};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::actors::messages::Outbox;
use crate::actors::session::{FromBrowser, WsSession};
use crate::admission::{origin_allowed, Refused, SessionSlot};
use crate::auth::Identity;
use crate::frame_limit::FrameLimit;
use crate::host::host_allowed;
use crate::lane;
use crate::protocol::HttpError;
use crate::state::AppState;

/// The one path that speaks WebSocket.
pub const PATH: &str = "/ws";

/// Bytes read from the socket per call; on the stack, so idle sessions do not pay for it.
const READ_CHUNK: usize = 8 * 1024;

/// How long a closed connection waits for the browser to close its side.
const LINGER: Duration = Duration::from_secs(2);

/// How a connection ended other than by a clean close.
#[derive(Debug, thiserror::Error)]
enum Ended {
    /// The browser took no bytes for this long (`ws.client_timeout_ms`).
    #[error("the browser took no bytes for {0:?} (ws.client_timeout_ms)")]
    Stalled(Duration),
    /// The socket failed or the peer vanished.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Handles one upgrade request from the HTTP/1 dispatcher: answers it, and for an accepted
/// WebSocket handshake on `/ws` starts the session in a task of its own, on this worker. The
/// dispatcher's task then ends: it is sized for all of HTTP/1 (about 1.1 KiB), which an idle
/// session would otherwise keep for its whole life. Failures are the peer's business (it went
/// away or sent garbage), so they are logged here, never returned.
pub async fn upgrade(
    req: Request,
    mut framed: Framed<TcpStream, Codec>,
    state: Data<AppState>,
) -> Result<(), Infallible> {
    let peer = req.peer_addr();
    match handshake(req, &mut framed, &state).await {
        Ok(Some((slot, identity))) => {
            let session = run(framed, slot, peer, identity, &state);
            actix_web::rt::spawn(state.session_tasks.track_future(session));
        }
        Ok(None) => {}
        Err(error) => log::debug!("websocket handshake with {peer:?} failed: {error}"),
    }
    Ok(())
}

/// Answers the upgrade request: the 101 and what the session starts with, or a refusal
/// (then `None`).
async fn handshake(
    req: Request,
    framed: &mut Framed<TcpStream, Codec>,
    state: &AppState,
) -> io::Result<Option<(SessionSlot, Option<Identity>)>> {
    let verdict = answer(&req, state);
    drop(req);
    match verdict {
        Err(refusal) => respond(framed, refusal).await.map(|()| None),
        Ok(accepted) => {
            respond(framed, accepted.response).await?;
            Ok(Some((accepted.slot, accepted.identity)))
        }
    }
}

/// A peer's address for log lines, formatted only when one is written.
struct Peer(Option<std::net::SocketAddr>);

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => write!(f, "{addr}"),
            None => f.write_str("an unknown peer"),
        }
    }
}

/// What an accepted handshake hands to the session.
struct Accepted {
    response: Response<BoxBody>,
    slot: SessionSlot,
    identity: Option<Identity>,
}

/// The 101, a place under the session limits and the `?token=`'s identity for a WebSocket
/// handshake on `/ws`, or the refusal to send instead. Cheap checks first: a flood of bad
/// handshakes costs no signature verification beyond the per-IP limit.
fn answer(req: &Request, state: &AppState) -> Result<Accepted, Response<BoxBody>> {
    if req.path() != PATH {
        let message = format!("WebSocket upgrades are served on {PATH} only");
        return Err(json(StatusCode::NOT_FOUND, "not_found", message));
    }
    let response = actix_http::ws::handshake(req.head())
        .map_err(Response::from)?
        .finish()
        .map_into_boxed_body();
    let peer = Peer(req.peer_addr());
    let host = single_header(req, &header::HOST, "Host");
    let ws = &state.config.ws;
    if state.config.loopback_bind() {
        if let Err(message) = check_host(host, &ws.allowed_hosts) {
            state.metrics.handshake_refused(&peer, "host", &message);
            return Err(json(StatusCode::FORBIDDEN, "host_not_allowed", message));
        }
    }
    let origin = single_header(req, &header::ORIGIN, "Origin").map_err(|problem| {
        let message = format!("{problem}: a browser sends it once, as text");
        state.metrics.handshake_refused(&peer, "origin", &message);
        json(StatusCode::FORBIDDEN, "origin_not_allowed", message)
    })?;
    if !origin_allowed(origin, host.ok().flatten(), &ws.allowed_origins) {
        let origin = origin.unwrap_or_default();
        state.metrics.handshake_refused(&peer, "origin", origin);
        let message = format!("pages from {origin} may not connect here (ws.allowed_origins)");
        return Err(json(StatusCode::FORBIDDEN, "origin_not_allowed", message));
    }
    let slot = state
        .admission
        .admit(req.peer_addr().map(|addr| addr.ip()))
        .map_err(|refused| too_many(refused, state, &peer))?;
    let identity = match (&state.sessions.verifier, query_token(req)) {
        (Some(verifier), Some(token)) => Some(verifier.verify(&token).map_err(|error| {
            state.metrics.auth_failed(&peer, &error);
            json(StatusCode::UNAUTHORIZED, "unauthorized", error.to_string())
        })?),
        // Without `?token=`, the token comes in the first frame; without auth, none is read.
        _ => None,
    };
    Ok(Accepted {
        response,
        slot,
        identity,
    })
}

/// Why a header that a browser sends once, as text, was refused.
#[derive(Debug, Clone, Copy, thiserror::Error)]
enum BadHeader {
    /// It came more than once: which one to check would be a guess.
    #[error("the {0} header comes more than once")]
    Twice(&'static str),
    /// Its value is not visible ASCII text.
    #[error("the {0} header is not text")]
    NotText(&'static str),
}

/// The one value of header `name` (called `label` in refusals), if any; a header that comes
/// twice, or whose value is not text, is refused rather than read in part.
fn single_header<'r>(
    req: &'r Request,
    name: &header::HeaderName,
    label: &'static str,
) -> Result<Option<&'r str>, BadHeader> {
    let mut values = req.head().headers().get_all(name);
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(BadHeader::Twice(label));
    }
    value.to_str().map(Some).map_err(|_| BadHeader::NotText(label))
}

/// On a loopback bind, refuses a `Host` that is neither a loopback name nor listed
/// (`ws.allowed_hosts`): the message says why. A request without `Host` is not a browser's,
/// and is let through like one without `Origin`.
fn check_host(host: Result<Option<&str>, BadHeader>, allowed: &[String]) -> Result<(), String> {
    match host {
        Err(problem) => Err(format!("{problem}: a browser sends it once, as text")),
        Ok(Some(host)) if !host_allowed(host, allowed) => Err(format!(
            "this bridge listens on a loopback address and is not known as `{host}` \
             (ws.allowed_hosts); a page from a domain that resolves to this machine may not \
             connect (DNS rebinding)"
        )),
        Ok(_) => Ok(()),
    }
}

/// The `token` query parameter, if the request has one (empty counts: it is refused).
fn query_token(req: &Request) -> Option<String> {
    let query = req.uri().query()?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "token")
        .map(|(_, token)| token.into_owned())
}

/// 503 when the bridge is full, 429 when this address has its share.
fn too_many(refused: Refused, state: &AppState, peer: &Peer) -> Response<BoxBody> {
    let (status, message) = match refused {
        Refused::Full => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "this bridge already serves {} sessions (ws.max_sessions); retry later",
                state.config.ws.max_sessions
            ),
        ),
        Refused::PerIp => {
            let max = state.config.ws.max_sessions_per_ip;
            state.metrics.handshake_refused(peer, "too_many_per_ip", "");
            (
                StatusCode::TOO_MANY_REQUESTS,
                format!("your address already has {max} sessions here (ws.max_sessions_per_ip)"),
            )
        }
    };
    let mut refusal = json(status, "too_many_sessions", message);
    refusal
        .headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
    refusal
}

/// An accepted session, as the future of its task: it runs until either side ends it, then
/// closes the connection the way RFC 6455 asks: FIN, then read until the browser closes its
/// side (bounded by [`LINGER`]), so that its close frame is not lost to a reset.
///
/// An `async` block that uses what it captures in place: an `async fn` would move its
/// arguments into locals and store them twice, for the life of every idle session.
fn run(
    framed: Framed<TcpStream, Codec>,
    slot: SessionSlot,
    peer: Option<std::net::SocketAddr>,
    identity: Option<Identity>,
    state: &AppState,
) -> impl Future<Output = ()> {
    let (mut socket, early) = detach(framed);
    let session = WsSession::new(Arc::clone(&state.sessions), slot, peer, identity);
    let outbound = Outbound {
        link: session.outbox(),
        drained: session.drained_notice(),
    };
    let mut reader = Reader {
        decoder: actix_http::ws::Codec::new().max_size(state.config.ws.max_frame_bytes),
        limit: FrameLimit::new(state.config.ws.max_frame_bytes),
        pending: early.map(BytesMut::from).unwrap_or_default(),
        open: true,
    };
    let mut session = SessionActor(ActorCtx::new().into_future(session));
    let stall = Duration::from_millis(state.config.ws.client_timeout_ms);
    let metrics = Arc::clone(&state.metrics);
    async move {
        let served = pump(&mut session, &mut reader, &outbound, &socket, stall).await;
        drop(session);
        match served {
            Ok(()) => {}
            Err(Ended::Stalled(stall)) => return metrics.session_stalled(peer, stall),
            Err(Ended::Io(error)) => {
                return log::debug!("websocket connection from {peer:?} ended: {error}");
            }
        }
        if socket.shutdown().await.is_ok() {
            // Boxed, like the stall timer: a timer's state would otherwise sit in every idle
            // session's task for its whole life.
            let _ = Box::pin(tokio::time::timeout(
                LINGER,
                poll_fn(|cx| discard_until_eof(&socket, cx)),
            ))
            .await;
        }
    }
}

/// The session actor, run by its connection's pump, and stopped when dropped however the
/// pump ends (a failed write included): actix stops a dropped actor only while it counts as
/// alive (an address or a timer left), which a session without timers (`auth.mode = "none"`)
/// never is, and the router must hear of every session's end.
struct SessionActor(ContextFut<WsSession, ActorCtx<WsSession>>);

impl SessionActor {
    fn ctx(&mut self) -> &mut ActorCtx<WsSession> {
        self.0.ctx()
    }
}

impl Future for SessionActor {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl Drop for SessionActor {
    fn drop(&mut self) {
        if self.ctx().state() != ActorState::Stopped {
            self.ctx().stop();
            // Stopping runs the actor's `stopping` (which tells the router) on this poll.
            let _ = Pin::new(&mut self.0).poll(&mut Context::from_waker(Waker::noop()));
        }
    }
}

/// The router's side of a session's output: its lane, and how to say it has room again.
struct Outbound<Drained> {
    link: Outbox,
    drained: Drained,
}

/// What the pump does next.
enum Next {
    /// The session has stopped.
    Ended,
    /// Write what the lane holds.
    Lane(lane::Taken),
}

/// What the browser sent, turned into WebSocket frames for the session.
struct Reader {
    decoder: actix_http::ws::Codec,
    /// `ws.max_frame_bytes` on each header, before the decoder waits for the payload.
    limit: FrameLimit,
    /// The start of a frame not yet whole (or what came with the handshake); empty, and
    /// holding no memory, between frames.
    pending: BytesMut,
    /// False once the browser closed its side, the socket failed or the protocol broke.
    open: bool,
}

/// What one read brought.
enum Read {
    /// A frame (or the news that the bytes broke the protocol) for the session.
    Frame,
    /// The browser is gone: end of stream or a failed socket.
    Gone,
}

impl Reader {
    /// Hands the session the next whole frame, reading the socket when none waits. One at a
    /// time: the session must handle each before the next is handed over, since the actor
    /// context does not keep spawned messages in order.
    fn poll_read(
        &mut self,
        socket: &TcpStream,
        lane: &lane::Lane,
        session: &mut SessionActor,
        cx: &mut Context<'_>,
    ) -> Poll<Read> {
        loop {
            if !self.open {
                return Poll::Pending;
            }
            // The header alone says whether the frame fits: its payload is never buffered.
            if let Err(error) = self.limit.check(&self.pending) {
                session.ctx().notify(FromBrowser::Broken(error));
                self.open = false;
                self.pending = BytesMut::new();
                return Poll::Ready(Read::Frame);
            }
            let decoded = self.decoder.decode(&mut self.pending);
            if self.pending.is_empty() {
                // Frames handed on share the read's allocation; this keeps none of it.
                self.pending = BytesMut::new();
            }
            match decoded {
                Ok(Some(frame)) => {
                    self.limit.passed(&frame);
                    session.ctx().notify(FromBrowser::Frame(frame));
                    return Poll::Ready(Read::Frame);
                }
                Ok(None) => {}
                Err(error) => {
                    session.ctx().notify(FromBrowser::Broken(error));
                    self.open = false;
                    return Poll::Ready(Read::Frame);
                }
            }
            if ready!(socket.poll_read_ready(cx)).is_err() {
                self.open = false;
                return Poll::Ready(Read::Gone);
            }
            let mut chunk = [0u8; READ_CHUNK];
            match socket.try_read(&mut chunk) {
                Ok(0) => {
                    self.open = false;
                    return Poll::Ready(Read::Gone);
                }
                Ok(n) => {
                    lane.saw_life();
                    self.pending.extend_from_slice(&chunk[..n]);
                }
                // Readiness was stale; `try_read` cleared it, so the next poll waits.
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => {
                    log::debug!("reading from a browser failed: {error}");
                    self.open = false;
                    return Poll::Ready(Read::Gone);
                }
            }
        }
    }
}

/// Leaves HTTP/1: the socket, and what the browser sent after its request head (its first
/// WebSocket frames, which must reach the decoder before anything read later). The codec and
/// both HTTP buffers are freed here, not held for the life of the session.
fn detach(framed: Framed<TcpStream, Codec>) -> (TcpStream, Option<Bytes>) {
    let parts = framed.into_parts();
    let early = (!parts.read_buf.is_empty()).then(|| Bytes::copy_from_slice(&parts.read_buf));
    (parts.io, early)
}

/// Writes a whole response (head and body) on a connection that is still HTTP/1.
async fn respond(framed: &mut Framed<TcpStream, Codec>, response: Response<BoxBody>) -> io::Result<()> {
    let (head, body) = response.into_parts();
    let size = body.size();
    // Every answer here is built in memory (handshake, JSON refusals), never streamed.
    let body = body
        .try_into_bytes()
        .map_err(|_| io::Error::other("a streamed response cannot answer an upgrade"))?;
    let mut framed = Pin::new(framed);
    framed.as_mut().write(Message::Item((head, size)))?;
    if size != BodySize::None {
        framed.as_mut().write(Message::Chunk(Some(body)))?;
        framed.as_mut().write(Message::Chunk(None))?;
    }
    poll_fn(|cx| framed.as_mut().flush(cx)).await
}

/// An HTTP error answer with a JSON `{error, message}` body.
fn json(status: StatusCode, error: &'static str, message: String) -> Response<BoxBody> {
    // A struct of a &str and a String always serializes.
    let text = serde_json::to_string(&HttpError { error, message }).unwrap_or_default();
    let mut response = Response::with_body(status, text).map_into_boxed_body();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Runs the session until it ends, writing what its lane holds.
///
/// Each wake hands the session what the browser sent, lets it act, then takes everything its
/// lane holds (its own frames and the router's, in the order they were queued) and writes it
/// with as few (vectored) writes as the socket allows. A lane that ends with a close the
/// router asked for stops the session once written.
///
/// A browser that takes no byte for `stall` is dropped at once: while its socket is full
/// nothing else is done for it, so no close frame could reach it either.
async fn pump(
    session: &mut SessionActor,
    reader: &mut Reader,
    outbound: &Outbound<impl Fn()>,
    socket: &TcpStream,
    stall: Duration,
) -> Result<(), Ended> {
    let lane = outbound.link.lane();
    loop {
        let next = poll_fn(|cx| loop {
            if Pin::new(&mut *session).poll(cx).is_ready() {
                return Poll::Ready(Next::Ended);
            }
            match reader.poll_read(socket, lane, session, cx) {
                Poll::Ready(Read::Frame) => continue,
                Poll::Ready(Read::Gone) => {
                    session.ctx().stop();
                    continue;
                }
                Poll::Pending => return lane.poll_take(cx).map(Next::Lane),
            }
        })
        .await;
        match next {
            Next::Ended => {
                // A close the session or the router queued follows what was queued before.
                write_batch(socket, lane, lane.take_rest(), stall).await?;
                return Ok(());
            }
            Next::Lane(taken) => {
                let written = write_batch(socket, lane, taken.frames, stall).await?;
                if taken.last {
                    // The router's close is written: the session ends (and tells the router).
                    session.ctx().stop();
                    poll_fn(|cx| Pin::new(&mut *session).poll(cx)).await;
                    return Ok(());
                }
                if lane.written(written) {
                    (outbound.drained)();
                }
            }
        }
    }
}

/// Reads and drops whatever the browser still sends until it closes (or fails).
fn discard_until_eof(socket: &TcpStream, cx: &mut Context<'_>) -> Poll<()> {
    loop {
        if ready!(socket.poll_read_ready(cx)).is_err() {
            return Poll::Ready(());
        }
        let mut sink = [0u8; 512];
        match socket.try_read(&mut sink) {
            Ok(1..) => {}
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Ok(0) | Err(_) => return Poll::Ready(()),
        }
    }
}

/// Most slices one vectored write takes (Linux's `IOV_MAX` is 1024).
const MAX_SLICES: usize = 64;

/// Writes every frame of `batch`, many per syscall; returns their cost to the lane's byte
/// budget.
async fn write_batch(
    socket: &TcpStream,
    lane: &lane::Lane,
    mut batch: Vec<Bytes>,
    stall: Duration,
) -> Result<usize, Ended> {
    let cost = lane::cost_of(&batch);
    // The first frame not yet fully written.
    let mut next = 0;
    while next < batch.len() {
        match write_some(socket, &batch[next..]) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
            Ok(mut written) => {
                while let Some(frame) = batch.get_mut(next) {
                    if written < frame.len() {
                        frame.advance(written);
                        break;
                    }
                    written -= frame.len();
                    next += 1;
                }
            }
            // Only a full socket arms the stall timer, so the usual write costs no timer.
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                Box::pin(tokio::time::timeout(stall, socket.writable()))
                    .await
                    .map_err(|_| Ended::Stalled(stall))??;
                // Room again means the browser took bytes: alive, however long this batch is
                // (the pump reads nothing, so its pongs are not seen, until it is written).
                lane.saw_life();
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok(cost)
}

/// One vectored write of the batch's first frames. Not async: its slice array lives on the
/// stack for the call only, never in the connection's future.
fn write_some(socket: &TcpStream, batch: &[Bytes]) -> io::Result<usize> {
    let mut slices = [io::IoSlice::new(&[]); MAX_SLICES];
    let mut used = 0;
    for (slice, frame) in slices.iter_mut().zip(batch) {
        *slice = io::IoSlice::new(frame);
        used += 1;
    }
    socket.try_write_vectored(&slices[..used])
}
