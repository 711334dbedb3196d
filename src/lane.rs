//! A session's outbound lane: server frames already in WebSocket framing, queued by the router
//! (on its own thread) and by the session itself, and written to the socket by the
//! connection's pump, all that waits in one write.
//!
//! Why not the session actor's mailbox: a mailbox message costs two heap allocations (the
//! envelope and the queue node, freed on another thread), a wake of the session and a copy
//! and re-encoding of the frame per browser. Server frames are unmasked, so one event's frame
//! is the same bytes for every browser: it is framed once ([`Frame`]), each lane holds a
//! reference to it, and the pump takes a whole batch per wake and writes it with one
//! vectored write.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use actix_web::web::{Buf, BufMut, Bytes, BytesMut};

/// What one queued frame costs beyond its bytes (its slot in the lane), so that the byte
/// budget bounds memory even for a flood of tiny frames.
pub const FRAME_OVERHEAD: usize = std::mem::size_of::<Bytes>();

/// The bit of a lane's queued-byte count that says "the router waits for room": set by
/// [`Lane::mark_behind`], cleared by the pump once half the budget is free (then the router is
/// told). One shared word, so that idle sessions pay nothing for it.
pub const BEHIND: usize = 1 << (usize::BITS - 1);

/// A server→browser text frame in WebSocket framing: header and payload, shared by every
/// lane it is queued in.
#[derive(Clone, Debug)]
pub struct Frame(Bytes);

/// The longest frame header: opcode byte, length byte, 64-bit length.
const MAX_HEADER: usize = 10;
/// Close code 1013 (try again later): the browser reads too slowly.
const CLOSE_TRY_AGAIN: u16 = 1013;
/// The reason of a close for answers left unread.
const UNREAD_ANSWERS: &str = "too slow: outbound queue full (answers not read)";
/// FIN and the text opcode.
const OPCODE_TEXT: u8 = 0x81;
/// FIN and the close opcode.
const OPCODE_CLOSE: u8 = 0x88;
/// FIN and the ping opcode.
const OPCODE_PING: u8 = 0x89;
/// FIN and the pong opcode.
const OPCODE_PONG: u8 = 0x8A;

impl Frame {
    /// `text` as one unmasked, final text frame (RFC 6455 §5.2); for tests (the bridge
    /// serializes straight into frames, [`Frame::json`]).
    #[cfg(test)]
    pub(crate) fn text(text: &str) -> Frame {
        let mut buffer = BytesMut::with_capacity(MAX_HEADER + text.len());
        buffer.extend_from_slice(&[0; MAX_HEADER]);
        buffer.extend_from_slice(text.as_bytes());
        Frame::framed(buffer)
    }

    /// `value` serialized as JSON straight into a text frame (no intermediate string).
    pub fn json<T: serde::Serialize + ?Sized>(value: &T) -> Result<Frame, serde_json::Error> {
        let mut buffer = BytesMut::with_capacity(256);
        buffer.extend_from_slice(&[0; MAX_HEADER]);
        let mut writer = buffer.writer();
        serde_json::to_writer(&mut writer, value)?;
        Ok(Frame::framed(writer.into_inner()))
    }

    /// A close frame with `code` and `reason` (at most 123 bytes, as RFC 6455 allows).
    pub fn close(code: u16, reason: &str) -> Frame {
        debug_assert!(reason.len() <= 123, "a close reason of {} bytes", reason.len());
        let mut payload = Vec::with_capacity(2 + reason.len());
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(reason.as_bytes());
        Frame::control(OPCODE_CLOSE, &payload)
    }

    /// A close frame without a code, the answer to a browser's close that had none.
    pub fn close_without_code() -> Frame {
        Frame::control(OPCODE_CLOSE, &[])
    }

    /// A ping with no payload: the heartbeat.
    pub fn ping() -> Frame {
        Frame::control(OPCODE_PING, &[])
    }

    /// The pong that answers a browser's ping carrying `payload`.
    pub fn pong(payload: &[u8]) -> Frame {
        Frame::control(OPCODE_PONG, payload)
    }

    /// A control frame (payload at most 125 bytes, which the browser's frames also obey).
    fn control(opcode: u8, payload: &[u8]) -> Frame {
        let mut buffer = BytesMut::with_capacity(MAX_HEADER + payload.len());
        buffer.extend_from_slice(&[0; MAX_HEADER]);
        buffer.extend_from_slice(payload);
        Frame::framed_as(opcode, buffer)
    }

    fn framed(buffer: BytesMut) -> Frame {
        Frame::framed_as(OPCODE_TEXT, buffer)
    }

    /// Writes the header into the [`MAX_HEADER`] bytes reserved before the payload and drops
    /// what it does not use.
    fn framed_as(opcode: u8, mut buffer: BytesMut) -> Frame {
        let len = buffer.len() - MAX_HEADER;
        let mut header = [0u8; MAX_HEADER];
        header[0] = opcode;
        let used = match len {
            0..=125 => {
                header[1] = len as u8;
                2
            }
            126..=0xFFFF => {
                header[1] = 126;
                header[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                4
            }
            _ => {
                header[1] = 127;
                header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
                10
            }
        };
        buffer[MAX_HEADER - used..MAX_HEADER].copy_from_slice(&header[..used]);
        buffer.advance(MAX_HEADER - used);
        Frame(buffer.freeze())
    }

    /// `frames` back to back in one buffer (copied once), to be queued as one.
    pub fn join<'a, I>(frames: I) -> Frame
    where
        I: IntoIterator<Item = &'a Frame>,
        I::IntoIter: Clone,
    {
        let frames = frames.into_iter();
        let mut rest = frames.clone();
        if let (Some(one), None) = (rest.next(), rest.next()) {
            return one.clone();
        }
        let len = frames.clone().map(Frame::len).sum();
        let mut joined = BytesMut::with_capacity(len);
        for frame in frames {
            joined.extend_from_slice(&frame.0);
        }
        Frame(joined.freeze())
    }

    /// Bytes on the wire.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true: a frame has at least its header.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// What this frame costs a lane's byte budget.
    pub fn cost(&self) -> usize {
        self.0.len() + FRAME_OVERHEAD
    }
}

/// What [`Lane::poll_take`] hands the pump.
pub struct Taken {
    /// The frames, in order.
    pub frames: Vec<Bytes>,
    /// They end with the lane's last frame (a close): nothing follows them.
    pub last: bool,
}

/// Milliseconds on a monotonic clock shared by every lane.
fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let elapsed = START.get_or_init(Instant::now).elapsed();
    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
}

/// What `frames` cost a lane's byte budget (as [`Frame::cost`] each).
pub fn cost_of(frames: &[Bytes]) -> usize {
    frames.iter().map(|frame| frame.len() + FRAME_OVERHEAD).sum()
}

/// Why a frame could not be queued for a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueError {
    /// Its outbound byte budget is used up: the browser reads too slowly.
    Full,
    /// Its outbound frame limit (`ws.outbound_queue_frames`) is reached.
    FrameLimit,
    /// The session has ended.
    Gone,
}

/// How far a lane is from its end.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Takes frames.
    #[default]
    Open,
    /// Takes no more frames; what is queued, up to a last (close) frame, is still written.
    Finishing,
    /// Takes and writes nothing more.
    Closed,
}

/// The queue between the router and one connection's pump.
pub struct Lane {
    state: Mutex<State>,
    /// Bytes queued and not yet written, plus [`BEHIND`].
    queued: AtomicUsize,
    /// When the browser last sent a byte ([`clock_ms`]), for the router's heartbeat.
    seen: AtomicU64,
    max_bytes: usize,
    /// 0: no frame limit.
    max_frames: usize,
}

#[derive(Default)]
struct State {
    frames: Vec<Bytes>,
    /// The pump, waiting for frames.
    waker: Option<Waker>,
    /// Open, finishing (a last frame is queued) or closed.
    ending: Ending,
    /// The session's token expires here: nothing is written from then on.
    expires: Option<Instant>,
}

impl Lane {
    /// An empty lane refusing frames past `max_bytes` queued, or `max_frames` (0: no limit).
    pub fn new(max_bytes: usize, max_frames: usize) -> Lane {
        Lane {
            state: Mutex::new(State::default()),
            queued: AtomicUsize::new(0),
            seen: AtomicU64::new(clock_ms()),
            max_bytes,
            max_frames,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves only a queue of bytes behind: still usable.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues a fan-out frame within the byte budget and frame limit, never waiting.
    pub fn try_push(&self, frame: &Frame) -> Result<(), QueueError> {
        let cost = frame.cost();
        if (self.queued.fetch_add(cost, Ordering::Relaxed) & !BEHIND) + cost > self.max_bytes {
            self.queued.fetch_sub(cost, Ordering::Relaxed);
            return Err(QueueError::Full);
        }
        let state = self.state();
        let refused = if state.ending != Ending::Open {
            Some(QueueError::Gone)
        } else if self.max_frames != 0 && state.frames.len() >= self.max_frames {
            Some(QueueError::FrameLimit)
        } else {
            None
        };
        if let Some(error) = refused {
            drop(state);
            self.queued.fetch_sub(cost, Ordering::Relaxed);
            return Err(error);
        }
        self.queue(state, frame);
        Ok(())
    }

    /// Queues an answer (ack, error, pong, `presence`, a desktop's reply, a ping...), whatever
    /// the frame limit. Answers count in the byte budget like events (they leave less room
    /// for events), and have a second budget's worth of room beyond it: a reader being caught
    /// up from the history has its budget full of events and must still get its answers. A
    /// browser that asks and never reads would otherwise grow its lane without bound; dropping
    /// one answer would leave a request unanswered, so past that the lane ends instead, with
    /// close 1013 as for any slow reader, and `Full` tells the caller to count it.
    pub fn push(&self, frame: &Frame) -> Result<(), QueueError> {
        let mut state = self.state();
        if state.ending != Ending::Open {
            return Err(QueueError::Gone);
        }
        let cost = frame.cost();
        let room = self.max_bytes.saturating_mul(2);
        if (self.queued.fetch_add(cost, Ordering::Relaxed) & !BEHIND) + cost > room {
            self.queued.fetch_sub(cost, Ordering::Relaxed);
            let close = Frame::close(CLOSE_TRY_AGAIN, UNREAD_ANSWERS);
            state.ending = Ending::Finishing;
            self.queued.fetch_add(close.cost(), Ordering::Relaxed);
            self.queue(state, &close);
            return Err(QueueError::Full);
        }
        self.queue(state, frame);
        Ok(())
    }

    fn queue(&self, mut state: MutexGuard<'_, State>, frame: &Frame) {
        state.frames.push(frame.0.clone());
        // Only the first frame of a batch wakes the pump; the rest ride along.
        wake_pump(state);
    }

    /// Every queued frame (in order), or `Pending` with the pump registered to be woken.
    /// Nothing is taken once the lane is closed or its token has expired.
    pub fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Taken> {
        let mut state = self.state();
        let expired = state.expires.is_some_and(|at| Instant::now() >= at);
        if state.ending == Ending::Closed || expired || state.frames.is_empty() {
            state.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(Taken {
            // The queue goes with the batch: an idle lane keeps no buffer from its last burst.
            frames: std::mem::take(&mut state.frames),
            // Nothing is queued after a finishing lane's last frame, so this batch holds it.
            last: state.ending == Ending::Finishing,
        })
    }

    /// True until the lane is finishing or closed.
    pub fn is_open(&self) -> bool {
        self.state().ending == Ending::Open
    }

    /// The browser sent something, or took bytes the socket could not: it is alive.
    pub fn saw_life(&self) {
        self.seen.store(clock_ms(), Ordering::Relaxed);
    }

    /// How long the browser has sent nothing.
    pub fn silent_for(&self) -> Duration {
        Duration::from_millis(clock_ms().saturating_sub(self.seen.load(Ordering::Relaxed)))
    }

    /// `len` queued bytes were written (or dropped); true when the router waits for room
    /// ([`Lane::mark_behind`]) and now has it: the caller tells it.
    pub fn written(&self, len: usize) -> bool {
        let before = self.queued.fetch_sub(len, Ordering::AcqRel);
        if before & BEHIND == 0 || (before & !BEHIND).saturating_sub(len) > self.max_bytes / 2 {
            return false;
        }
        self.queued.fetch_and(!BEHIND, Ordering::AcqRel) & BEHIND != 0
    }

    /// Asks to be told (through [`Lane::written`]) once half the byte budget is free. True
    /// when that is already so: then nothing will be said, and the caller goes on now.
    pub fn mark_behind(&self) -> bool {
        let queued = self.queued.fetch_or(BEHIND, Ordering::AcqRel) & !BEHIND;
        if queued <= self.max_bytes / 2 {
            // The pump may have drained before it could see the mark.
            self.queued.fetch_and(!BEHIND, Ordering::AcqRel);
            return true;
        }
        false
    }

    /// True when a frame of `len` bytes fits the byte budget at all (into an empty lane).
    pub fn could_take(&self, len: usize) -> bool {
        len + FRAME_OVERHEAD <= self.max_bytes
    }

    /// Queues `last` (a close frame) after what waits, and nothing more: the pump writes them
    /// all, even after the session has ended ([`Lane::take_rest`]).
    pub fn finish(&self, last: &Frame) {
        let mut state = self.state();
        if state.ending != Ending::Open {
            return;
        }
        state.ending = Ending::Finishing;
        self.queued.fetch_add(last.cost(), Ordering::Relaxed);
        self.queue(state, last);
    }

    /// What a finishing lane still holds, for the pump to write once the session has ended;
    /// nothing from a lane that was closed instead.
    pub fn take_rest(&self) -> Vec<Bytes> {
        let mut state = self.state();
        let expired = state.expires.is_some_and(|at| Instant::now() >= at);
        if state.ending == Ending::Finishing && !expired {
            return std::mem::take(&mut state.frames);
        }
        Vec::new()
    }

    /// Drops what waits and ends the lane with `last` (an error, then a close): for a session
    /// that may receive nothing more (its token expired or never came), which must still be
    /// told why. This replaces a close the router queued, which an expired token would
    /// otherwise hold back; nothing happens to a closed lane.
    pub fn end_with(&self, last: &[Frame]) {
        let mut state = self.state();
        if state.ending == Ending::Closed {
            return;
        }
        state.ending = Ending::Finishing;
        // The expiry kept events from leaving; these frames are the session's last word.
        state.expires = None;
        let dropped = cost_of(&state.frames);
        state.frames.clear();
        state.frames.extend(last.iter().map(|frame| frame.0.clone()));
        let added: usize = last.iter().map(Frame::cost).sum();
        self.queued.fetch_add(added, Ordering::AcqRel);
        self.queued.fetch_sub(dropped, Ordering::AcqRel);
        wake_pump(state);
    }

    /// Nothing more is queued; unless the lane is finishing, nothing more is written either
    /// and what waits is dropped. (The pump ends when the session stops.)
    pub fn close(&self) {
        let mut state = self.state();
        if state.ending == Ending::Finishing {
            return;
        }
        state.ending = Ending::Closed;
        let dropped = cost_of(&std::mem::take(&mut state.frames));
        self.queued.fetch_sub(dropped, Ordering::AcqRel);
        wake_pump(state);
    }

    /// From `at` on (the token's `exp`), nothing more is written; `None` lifts the limit
    /// (a refreshed token sets the new one).
    pub fn expire_at(&self, at: Option<Instant>) {
        let mut state = self.state();
        state.expires = at;
        wake_pump(state);
    }
}

/// Releases the lane's lock, then wakes the pump if it waits.
fn wake_pump(mut state: MutexGuard<'_, State>) {
    let waker = state.waker.take();
    drop(state);
    if let Some(waker) = waker {
        waker.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The payload of a single frame: the JSON text.
    fn payload(frame: &Frame) -> &[u8] {
        let header = match frame.0.get(1) {
            Some(126) => 4,
            Some(127) => 10,
            _ => 2,
        };
        &frame.0[header..]
    }

    fn header(len: usize) -> Vec<u8> {
        let frame = Frame::text(&"x".repeat(len));
        assert_eq!(payload(&frame).len(), len);
        frame.0[..frame.len() - len].to_vec()
    }

    #[test]
    fn a_finishing_lane_keeps_what_waits_and_ends_with_its_last_frame() {
        let lane = Lane::new(1 << 20, 0);
        lane.try_push(&Frame::text("event")).expect("room");
        lane.finish(&Frame::close(1013, "slow"));
        assert_eq!(lane.try_push(&Frame::text("late")), Err(QueueError::Gone));
        lane.close();
        let rest = lane.take_rest();
        assert_eq!(rest.len(), 2);
        assert_eq!(&rest[0][2..], b"event");
        assert_eq!(&rest[1][..], [0x88, 6, 0x03, 0xF5, b's', b'l', b'o', b'w']);
    }

    #[test]
    fn a_lane_ended_with_frames_drops_what_waited_and_writes_them_even_past_expiry() {
        let lane = Lane::new(1 << 20, 0);
        let waker = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        let mut cx = Context::from_waker(&waker);
        lane.try_push(&Frame::text("event")).expect("room");
        lane.expire_at(Some(Instant::now()));
        lane.end_with(&[Frame::text("expired"), Frame::close(4401, "token expired")]);
        let Poll::Ready(batch) = lane.poll_take(&mut cx) else {
            panic!("the last frames wait");
        };
        assert!(batch.last);
        assert_eq!(&batch.frames[0][2..], b"expired");
        assert_eq!(batch.frames[1][0], 0x88);
        assert_eq!(batch.frames.len(), 2);
        assert!(!lane.written(cost_of(&batch.frames)));
        assert_eq!(
            lane.queued.load(Ordering::SeqCst),
            0,
            "the dropped event was released"
        );
    }

    #[test]
    fn an_expired_token_still_gets_its_close_when_the_router_closed_first() {
        let lane = Lane::new(1 << 20, 0);
        let waker = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        let mut cx = Context::from_waker(&waker);
        lane.expire_at(Some(Instant::now()));
        lane.finish(&Frame::close(1013, "slow"));
        assert!(lane.poll_take(&mut cx).is_pending(), "nothing leaves after exp");
        lane.end_with(&[Frame::close(4401, "token expired")]);
        let Poll::Ready(batch) = lane.poll_take(&mut cx) else {
            panic!("the session's last word is written");
        };
        assert!(batch.last);
        assert_eq!(&batch.frames[0][2..4], 4401u16.to_be_bytes());
        assert_eq!(batch.frames.len(), 1);
    }

    #[test]
    fn control_frames_are_framed_as_rfc_6455_asks() {
        assert_eq!(&Frame::ping().0[..], [0x89, 0]);
        assert_eq!(&Frame::pong(b"hi").0[..], [0x8A, 2, b'h', b'i']);
        assert_eq!(&Frame::close_without_code().0[..], [0x88, 0]);
    }

    #[test]
    fn frames_carry_the_rfc_6455_length_forms() {
        assert_eq!(header(0), [0x81, 0]);
        assert_eq!(header(125), [0x81, 125]);
        assert_eq!(header(126), [0x81, 126, 0, 126]);
        assert_eq!(header(65_535), [0x81, 126, 0xFF, 0xFF]);
        assert_eq!(header(65_536), [0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        let frame = Frame::json(&serde_json::json!({"op": "pong"})).expect("serializes");
        assert_eq!(&frame.0[..2], [0x81, 13]);
        assert_eq!(payload(&frame), br#"{"op":"pong"}"#);
    }

    #[test]
    fn a_batch_wakes_the_pump_once_and_is_taken_in_order() {
        let lane = Lane::new(1 << 20, 0);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&count));
        let mut cx = Context::from_waker(&waker);
        assert!(lane.poll_take(&mut cx).is_pending());
        for text in ["a", "b", "c"] {
            lane.try_push(&Frame::text(text)).expect("room");
        }
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        let Poll::Ready(batch) = lane.poll_take(&mut cx) else {
            panic!("three frames wait");
        };
        let payloads: Vec<&[u8]> = batch.frames.iter().map(|frame| &frame[2..]).collect();
        assert_eq!(payloads, [b"a", b"b", b"c"]);
        assert!(!batch.last, "the lane is open");
    }

    #[test]
    fn the_budget_refuses_then_written_bytes_make_room_and_tell_the_router_once() {
        let frame = Frame::text(&"x".repeat(100));
        let lane = Lane::new(3 * frame.cost(), 0);
        for _ in 0..3 {
            lane.try_push(&frame).expect("within the budget");
        }
        assert_eq!(lane.try_push(&frame), Err(QueueError::Full));
        assert!(!lane.mark_behind(), "the lane is full, not half empty");
        assert!(!lane.written(frame.cost()), "two thirds still queued");
        assert!(lane.written(frame.cost()), "a third queued: the router is told");
        assert!(!lane.written(frame.cost()), "told once");
        lane.try_push(&frame).expect("room again");
    }

    #[test]
    fn answers_count_against_the_budget_and_past_it_end_the_lane_with_1013() {
        let answer = Frame::text(&"x".repeat(100));
        let lane = Lane::new(2 * answer.cost(), 1);
        for _ in 0..2 {
            lane.push(&answer)
                .expect("within the budget, past the frame limit");
        }
        assert_eq!(
            lane.try_push(&answer),
            Err(QueueError::Full),
            "no room for events"
        );
        for _ in 0..2 {
            lane.push(&answer).expect("answers have a second budget's worth");
        }
        assert_eq!(lane.push(&answer), Err(QueueError::Full));
        assert_eq!(lane.push(&answer), Err(QueueError::Gone), "the lane is finishing");
        let rest = lane.take_rest();
        assert_eq!(rest.len(), 5, "four answers, then the close");
        assert_eq!(&rest[4][..4], [0x88, rest[4].len() as u8 - 2, 0x03, 0xF5]);
    }

    #[test]
    fn the_frame_limit_and_closing_refuse() {
        let lane = Lane::new(1 << 20, 2);
        let frame = Frame::text("e");
        lane.try_push(&frame).expect("first");
        lane.try_push(&frame).expect("second");
        assert_eq!(lane.try_push(&frame), Err(QueueError::FrameLimit));
        lane.close();
        assert_eq!(lane.try_push(&frame), Err(QueueError::Gone));
        assert!(lane.mark_behind(), "closing released the queued bytes");
    }

    #[test]
    fn nothing_is_taken_after_the_token_expires() {
        let lane = Lane::new(1 << 20, 0);
        let waker = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        let mut cx = Context::from_waker(&waker);
        lane.push(&Frame::text("late")).expect("room");
        lane.expire_at(Some(Instant::now()));
        assert!(lane.poll_take(&mut cx).is_pending());
        lane.expire_at(None);
        assert!(lane.poll_take(&mut cx).is_ready());
    }
}
