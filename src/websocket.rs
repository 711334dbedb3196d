//! `/ws`: the WebSocket handshake on the raw HTTP/1 connection, and the pump that joins the
//! socket to its [`WsSession`].
//!
//! Why not actix-web's usual upgrade (`actix_web_actors::ws::start`): it keeps the HTTP/1
//! dispatcher alive for the whole life of the socket, with an 8 KiB read and an 8 KiB write
//! buffer that no setting shrinks, which would dominate the memory of thousands of mostly idle
//! browsers. So the server hands upgrade requests here instead (actix-http's `upgrade` hook):
//! once the 101 is written the dispatcher is gone, reads land in a stack buffer and are handed
//! to the session's decoder, and the session's encoded frames are written straight to the
//! socket. An idle session holds no I/O buffer at all. The session is still an actix-web-actors
//! `WebsocketContext` actor; only the bytes underneath take a shorter path.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use actix::prelude::Stream;
use actix_codec::Framed;
use actix_http::body::{BodySize, BoxBody, MessageBody};
use actix_http::error::PayloadError;
use actix_http::h1::{Codec, Message};
use actix_http::{header, Request, Response, StatusCode};
use actix_web::web::{Buf, Bytes, Data};
use actix_web_actors::ws::WebsocketContext;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::actors::messages::Outbox;
use crate::actors::session::WsSession;
use crate::admission::{origin_allowed, Refused, SessionSlot};
use crate::auth::Identity;
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

/// Handles one upgrade request from the HTTP/1 dispatcher: answers it, and for a WebSocket
/// handshake on `/ws` runs the session until either side ends it. Failures are the peer's
/// business (it went away or sent garbage), so they are logged here, never returned.
pub fn upgrade(req: Request, framed: Framed<TcpStream, Codec>, state: Data<AppState>) -> Upgrade {
    Upgrade(Phase::Handshake(Box::pin(answer_then_start(req, framed, state))))
}

/// The session's part of a connection: its pump, and what reports how it ended.
type Session = (
    Pin<Box<dyn Future<Output = Result<(), Ended>>>>,
    Data<AppState>,
    Option<std::net::SocketAddr>,
);

/// A connection's future, in two phases that are never stored side by side: the handshake
/// (request, HTTP framing, the 101 being written), then the session's pump. This future lives
/// as long as the connection, inside its task; as one `async fn` it would keep the handshake's
/// request and HTTP framing (an `async fn` stores its arguments for its whole life) in every
/// idle session.
pub struct Upgrade(Phase);

enum Phase {
    /// Answering the request.
    Handshake(Pin<Box<dyn Future<Output = Option<Session>>>>),
    /// Running the session.
    Session(Session),
    /// Over.
    Done,
}

impl Future for Upgrade {
    type Output = Result<(), Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let phase = &mut self.0;
        loop {
            match phase {
                Phase::Handshake(handshake) => match ready!(handshake.as_mut().poll(cx)) {
                    Some(session) => *phase = Phase::Session(session),
                    None => *phase = Phase::Done,
                },
                Phase::Session((pump, state, peer)) => {
                    match ready!(pump.as_mut().poll(cx)) {
                        Ok(()) => {}
                        Err(Ended::Stalled(stall)) => state.metrics.session_stalled(*peer, stall),
                        Err(Ended::Io(error)) => {
                            log::debug!("websocket connection from {peer:?} ended: {error}")
                        }
                    }
                    *phase = Phase::Done;
                }
                Phase::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// Answers the request; for an accepted WebSocket handshake, the session to run next.
async fn answer_then_start(
    req: Request,
    mut framed: Framed<TcpStream, Codec>,
    state: Data<AppState>,
) -> Option<Session> {
    let peer = req.peer_addr();
    match handshake(req, &mut framed, &state).await {
        Ok(Some((slot, identity))) => {
            let pump = Box::pin(run(framed, slot, peer, identity, &state));
            Some((pump, state, peer))
        }
        Ok(None) => None,
        Err(error) => {
            log::debug!("websocket handshake with {peer:?} failed: {error}");
            None
        }
    }
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
    let header = |name| {
        req.head()
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
    };
    let allowed = &state.config.ws.allowed_origins;
    if !origin_allowed(header(header::ORIGIN), header(header::HOST), allowed) {
        let origin = header(header::ORIGIN).unwrap_or_default();
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

/// Starts an accepted session; the future runs it to its end. Not an `async fn`: the set-up
/// would then be stored in the connection's task beside the pump, for the session's whole life.
fn run(
    framed: Framed<TcpStream, Codec>,
    slot: SessionSlot,
    peer: Option<std::net::SocketAddr>,
    identity: Option<Identity>,
    state: &AppState,
) -> impl Future<Output = Result<(), Ended>> {
    let (socket, early) = detach(framed);
    let socket = Rc::new(socket);
    let session = WsSession::new(Arc::clone(&state.sessions), slot, peer, identity);
    let outbound = Outbound {
        link: session.outbox(),
        drained: session.drained_notice(),
    };
    let reader = SocketReader {
        early,
        socket: Rc::clone(&socket),
    };
    let codec = actix_http::ws::Codec::new().max_size(state.config.ws.max_frame_bytes);
    let frames = WebsocketContext::with_codec(session, reader, codec);
    let stall = Duration::from_millis(state.config.ws.client_timeout_ms);
    pump(frames, outbound, socket, stall)
}

/// The router's side of a session's output: its lane, and how to say it has room again.
struct Outbound<Drained> {
    link: Outbox,
    drained: Drained,
}

/// What the pump writes next.
enum Next {
    /// Bytes the session encoded itself (its own frames, pings, the close), or its end.
    Own(Option<Result<Bytes, actix_web::Error>>),
    /// The router's frames, all that waited.
    Lane(Vec<Bytes>),
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

/// The socket as the byte stream the session's WebSocket decoder polls.
struct SocketReader {
    /// Bytes that arrived with the handshake.
    early: Option<Bytes>,
    socket: Rc<TcpStream>,
}

impl Stream for SocketReader {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(early) = self.early.take() {
            return Poll::Ready(Some(Ok(early)));
        }
        loop {
            if let Err(error) = ready!(self.socket.poll_read_ready(cx)) {
                return Poll::Ready(Some(Err(PayloadError::Io(error))));
            }
            let mut chunk = [0u8; READ_CHUNK];
            return Poll::Ready(match self.socket.try_read(&mut chunk) {
                Ok(0) => None,
                Ok(n) => Some(Ok(Bytes::copy_from_slice(&chunk[..n]))),
                // Readiness was stale; `try_read` cleared it, so the next poll waits.
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => Some(Err(PayloadError::Io(error))),
            });
        }
    }
}

/// Writes what the session encodes and what the router queued in its lane until the session
/// ends, then closes the connection the way RFC 6455 asks: FIN, then read until the browser
/// closes its side (bounded by [`LINGER`]), so that its close frame is not lost to a reset.
///
/// The session's own output goes first: its `welcome` precedes anything the router sends, and
/// once it has closed, nothing of the lane follows. The lane's frames are taken all at once
/// and written with as few (vectored) writes as the socket allows.
///
/// A browser that takes no byte for `stall` is dropped at once: while its socket is full the
/// session is not polled, so neither its heartbeat nor a close frame could reach it.
async fn pump(
    mut frames: impl Stream<Item = Result<Bytes, actix_web::Error>> + Unpin,
    outbound: Outbound<impl Fn()>,
    socket: Rc<TcpStream>,
    stall: Duration,
) -> Result<(), Ended> {
    {
        loop {
            // Polled in place (the stream is `Unpin`): pinning it into a local would store the
            // whole session a second time in this future, for the life of the connection.
            let next = poll_fn(|cx| match Pin::new(&mut frames).poll_next(cx) {
                Poll::Ready(own) => Poll::Ready(Next::Own(own)),
                Poll::Pending => outbound.link.lane().poll_take(cx).map(Next::Lane),
            })
            .await;
            match next {
                Next::Own(Some(chunk)) => {
                    let chunk = chunk.map_err(|error| io::Error::other(error.to_string()))?;
                    write_all(&socket, &chunk, stall).await?;
                }
                Next::Own(None) => {
                    // A close the router asked for follows what it queued before.
                    write_batch(&socket, outbound.link.lane().take_rest(), stall).await?;
                    break;
                }
                Next::Lane(batch) => {
                    let written = write_batch(&socket, batch, stall).await?;
                    if outbound.link.lane().written(written) {
                        (outbound.drained)();
                    }
                }
            }
        }
        drop(frames);
    }
    // The session (and with it the reader's handle) is gone now that its stream ended.
    let mut socket = Rc::into_inner(socket).ok_or_else(|| io::Error::other("socket still shared"))?;
    socket.shutdown().await?;
    // Boxed, like the stall timer below: a timer's state would otherwise sit in every idle
    // session's task for its whole life.
    let _ = Box::pin(tokio::time::timeout(
        LINGER,
        poll_fn(|cx| discard_until_eof(&socket, cx)),
    ))
    .await;
    Ok(())
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
async fn write_batch(socket: &TcpStream, mut batch: Vec<Bytes>, stall: Duration) -> Result<usize, Ended> {
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
                    .map_err(|_| Ended::Stalled(stall))??
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

async fn write_all(socket: &TcpStream, mut rest: &[u8], stall: Duration) -> Result<(), Ended> {
    while !rest.is_empty() {
        match socket.try_write(rest) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
            Ok(written) => rest = &rest[written..],
            // Only a full socket arms the stall timer, so the usual write costs no timer.
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                Box::pin(tokio::time::timeout(stall, socket.writable()))
                    .await
                    .map_err(|_| Ended::Stalled(stall))??
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}
