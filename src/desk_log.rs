//! `DeskLog`: the newest events of one desk's stream, already framed, in offset order.
//!
//! The router keeps one per desk (history on) within `history.memory_bytes`. It serves resumes
//! and slow readers from memory — a frame is built once and shared by everyone who reads it —
//! and says when a cursor is older than what it holds, so the rest comes from the stream.

use std::collections::VecDeque;

use crate::lane::Frame;
use uuid::Uuid;

/// One event as every browser gets it.
#[derive(Debug, Clone)]
pub struct Logged {
    /// Stream offset.
    pub offset: u64,
    /// The `event` frame, framed for the wire.
    pub frame: Frame,
    /// The session that published it, which never gets it back.
    pub except: Option<Uuid>,
    /// The value of the desk's `conflate_key` in its data, for `latest` desks.
    pub key: Option<Box<str>>,
}

impl Logged {
    fn cost(&self) -> usize {
        self.frame.len() + self.key.as_ref().map_or(0, |key| key.len()) + std::mem::size_of::<Logged>()
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct DeskLog {
    entries: VecDeque<Logged>,
    bytes: usize,
    max_bytes: usize,
    /// Every deliverable event after this offset is in `entries` (`None`: not attached yet).
    base: Option<u64>,
}

impl DeskLog {
    /// An empty log that holds at most `max_bytes` of frames.
    pub fn new(max_bytes: usize) -> Self {
        DeskLog {
            entries: VecDeque::new(),
            bytes: 0,
            max_bytes,
            base: None,
        }
    }

    /// Starts again: everything after `base` will come through [`DeskLog::push`].
    pub fn reset(&mut self, base: u64) {
        self.entries.clear();
        self.bytes = 0;
        self.base = Some(base);
    }

    /// Appends the next event, dropping the oldest ones past the byte budget.
    pub fn push(&mut self, logged: Logged) {
        self.bytes += logged.cost();
        self.entries.push_back(logged);
        while self.bytes > self.max_bytes {
            let Some(oldest) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= oldest.cost();
            self.base = Some(self.base.map_or(oldest.offset, |base| base.max(oldest.offset)));
        }
    }

    /// The offset after which everything is held; `None` before the stream was attached.
    pub fn base(&self) -> Option<u64> {
        self.base
    }

    /// The newest offset held, or the base when nothing newer came.
    pub fn last(&self) -> Option<u64> {
        self.entries.back().map(|logged| logged.offset).or(self.base)
    }

    /// True when every event after `after` is held here.
    pub fn covers(&self, after: u64) -> bool {
        self.base.is_some_and(|base| after >= base)
    }

    /// The events after offset `after`, oldest first.
    pub fn after(&self, after: u64) -> impl Iterator<Item = &Logged> {
        let start = self.entries.partition_point(|logged| logged.offset <= after);
        self.entries.range(start..)
    }

    /// The cursor that yields the last `count` events, if this log holds that many.
    pub fn last_n(&self, count: usize) -> Option<u64> {
        if count == 0 {
            return self.last();
        }
        let index = self.entries.len().checked_sub(count)?;
        // Offsets of held entries are past `base`, so at least 1 when there is a base; the
        // first entry of a stream (offset 0) is always a genesis marker, never an event.
        Some(self.entries[index].offset.saturating_sub(1))
    }

    /// Events held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no event is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logged(offset: u64) -> Logged {
        Logged {
            offset,
            frame: Frame::text(&format!("{offset:>10}")),
            except: None,
            key: None,
        }
    }

    fn offsets<'a>(events: impl Iterator<Item = &'a Logged>) -> Vec<u64> {
        events.map(|logged| logged.offset).collect()
    }

    #[test]
    fn it_serves_what_follows_a_cursor_and_knows_what_it_does_not_hold() {
        let mut log = DeskLog::new(1 << 20);
        assert!(!log.covers(5), "nothing is covered before the stream is attached");
        log.reset(10);
        for offset in [11, 12, 14, 15] {
            log.push(logged(offset));
        }
        assert_eq!(offsets(log.after(12)), [14, 15]);
        assert_eq!(
            offsets(log.after(13)),
            [14, 15],
            "offsets may skip (segment starts, markers)"
        );
        assert!(log.covers(10) && log.covers(99));
        assert!(
            !log.covers(9),
            "offset 10 itself may hold an event this log never saw"
        );
        assert_eq!(log.last_n(2), Some(13));
        assert_eq!(log.last_n(5), None);
        assert_eq!(log.last(), Some(15));
    }

    #[test]
    fn the_oldest_events_leave_first_and_the_base_follows_them() {
        let cost = logged(1).cost();
        let mut log = DeskLog::new(cost * 3);
        log.reset(0);
        for offset in 1..=5 {
            log.push(logged(offset));
        }
        assert_eq!(log.len(), 3);
        assert_eq!(log.base(), Some(2));
        assert!(!log.covers(1) && log.covers(2));
        assert_eq!(offsets(log.after(0)), [3, 4, 5]);
    }
}
