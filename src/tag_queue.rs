//! [`TagQueue`]: AMQP delivery tags that must be answered in the order they were issued.
//!
//! Both AMQP workers keep one: the publisher for messages awaiting their confirm, the consumer
//! for deliveries awaiting the router's verdict. An answer for any tag but the oldest means the
//! bookkeeping and the broker disagree; acting on it could ack the wrong browser's publish or
//! the wrong delivery, so the caller treats [`OutOfStep`] as a lost link and starts over.

use std::collections::VecDeque;

/// An answer that does not match the oldest outstanding tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("got an answer for tag {got} while the oldest outstanding tag is {expected:?}")]
pub struct OutOfStep {
    /// The oldest outstanding tag, if any.
    pub expected: Option<u64>,
    /// The tag answered.
    pub got: u64,
}

/// Items keyed by strictly increasing tags, taken out oldest first.
#[derive(Debug)]
pub struct TagQueue<T> {
    items: VecDeque<(u64, T)>,
}

impl<T> Default for TagQueue<T> {
    fn default() -> Self {
        TagQueue {
            items: VecDeque::new(),
        }
    }
}

impl<T> TagQueue<T> {
    /// Adds the item for the newest tag.
    pub fn push(&mut self, tag: u64, item: T) {
        debug_assert!(self.items.back().is_none_or(|(last, _)| *last < tag));
        self.items.push_back((tag, item));
    }

    /// Takes the oldest item if it carries `tag`; otherwise leaves everything in place.
    pub fn pop(&mut self, tag: u64) -> Result<T, OutOfStep> {
        match self.items.front() {
            Some((oldest, _)) if *oldest == tag => {
                // The front was just matched.
                Ok(self
                    .items
                    .pop_front()
                    .map(|(_, item)| item)
                    .expect("front exists"))
            }
            front => Err(OutOfStep {
                expected: front.map(|(oldest, _)| *oldest),
                got: tag,
            }),
        }
    }

    /// Takes every item, oldest first.
    pub fn drain(&mut self) -> impl DoubleEndedIterator<Item = T> + '_ {
        self.items.drain(..).map(|(_, item)| item)
    }

    /// How many items are outstanding.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when nothing is outstanding.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_must_come_oldest_first() {
        let mut queue = TagQueue::default();
        for tag in 1..=3 {
            queue.push(tag, tag * 10);
        }
        assert_eq!(queue.pop(1), Ok(10));
        assert_eq!(
            queue.pop(3),
            Err(OutOfStep {
                expected: Some(2),
                got: 3
            })
        );
        assert_eq!(
            queue.pop(2),
            Ok(20),
            "a refused answer leaves the queue as it was"
        );
        assert_eq!(queue.drain().collect::<Vec<_>>(), [30]);
        assert_eq!(
            queue.pop(4),
            Err(OutOfStep {
                expected: None,
                got: 4
            })
        );
    }
}
