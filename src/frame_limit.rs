//! `ws.max_frame_bytes`, enforced on a frame's header rather than on its payload.
//!
//! actix-http's decoder compares a frame's length with its limit only once the whole payload
//! has arrived, so a header declaring 100 MiB (or 1 TiB) would have the connection buffer all
//! of it first. [`FrameLimit::check`] reads the length from the header as soon as the header is
//! there, and also refuses a continuation that would push a fragmented message over the
//! limit. With it, what a connection holds unparsed is at most one frame under the limit, its
//! header and one read: before sign-in and after.

use actix_http::ws::{Frame, Item, ProtocolError};

/// Longest control frame payload (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: u64 = 125;

/// Checks each frame header against the limit, keeping the size of the message being
/// reassembled from fragments.
#[derive(Debug)]
pub struct FrameLimit {
    max: u64,
    /// Payload bytes of the fragmented message so far; 0 between messages.
    message: u64,
}

impl FrameLimit {
    /// A limit of `max` payload bytes per frame and per reassembled message.
    pub fn new(max: usize) -> Self {
        FrameLimit {
            max: max as u64,
            message: 0,
        }
    }

    /// Refuses the frame that starts `pending` once its header is there: `Overflow` when its
    /// payload (or the message it continues) would exceed the limit, `InvalidLength` for a
    /// control frame over 125 bytes. `Ok` when within the limits or the header is not whole.
    pub fn check(&self, pending: &[u8]) -> Result<(), ProtocolError> {
        let Some((opcode, len)) = declared(pending) else {
            return Ok(());
        };
        match opcode {
            // Continuation: counts with the fragments before it.
            0x0 if self.message.saturating_add(len) > self.max => Err(ProtocolError::Overflow),
            0x8..=0xF if len > MAX_CONTROL_PAYLOAD => Err(ProtocolError::InvalidLength(len as usize)),
            _ if len > self.max => Err(ProtocolError::Overflow),
            _ => Ok(()),
        }
    }

    /// Follows the fragmented message through the frames the decoder produced.
    pub fn passed(&mut self, frame: &Frame) {
        if let Frame::Continuation(item) = frame {
            self.message = match item {
                Item::FirstText(bytes) | Item::FirstBinary(bytes) => bytes.len() as u64,
                Item::Continue(bytes) => self.message + bytes.len() as u64,
                Item::Last(_) => 0,
            };
        }
    }
}

/// The opcode and payload length a frame header declares, once the header is whole enough to
/// say (RFC 6455 §5.2: 2 bytes, then a 16- or 64-bit extended length).
fn declared(header: &[u8]) -> Option<(u8, u64)> {
    let opcode = header.first()? & 0x0F;
    let len = match header.get(1)? & 0x7F {
        126 => u64::from(u16::from_be_bytes(header.get(2..4)?.try_into().ok()?)),
        127 => u64::from_be_bytes(header.get(2..10)?.try_into().ok()?),
        len => u64::from(len),
    };
    Some((opcode, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::web::Bytes;

    /// A masked client frame header: FIN and `opcode`, then `len` in its shortest form.
    fn header(opcode: u8, len: u64) -> Vec<u8> {
        let mut header = vec![0x80 | opcode];
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
        header
    }

    fn is_overflow(result: Result<(), ProtocolError>) -> bool {
        matches!(result, Err(ProtocolError::Overflow))
    }

    #[test]
    fn a_header_over_the_limit_is_refused_before_any_payload() {
        let limit = FrameLimit::new(1000);
        assert!(limit.check(&header(0x1, 1000)).is_ok());
        assert!(is_overflow(limit.check(&header(0x1, 1001))));
        assert!(is_overflow(limit.check(&header(0x2, 100 << 20))));
        assert!(is_overflow(limit.check(&header(0x1, 1 << 40))));
        assert!(is_overflow(limit.check(&header(0x1, u64::MAX))));
        assert!(matches!(
            limit.check(&header(0x9, 126)),
            Err(ProtocolError::InvalidLength(126))
        ));
        assert!(limit.check(&header(0x9, 125)).is_ok());
    }

    #[test]
    fn a_header_not_yet_whole_waits() {
        let limit = FrameLimit::new(10);
        let long = header(0x1, 1 << 40);
        for cut in 0..10 {
            assert!(limit.check(&long[..cut]).is_ok(), "{cut} bytes");
        }
        assert!(is_overflow(limit.check(&long)));
    }

    #[test]
    fn continuations_count_with_the_fragments_before_them() {
        let mut limit = FrameLimit::new(1000);
        limit.passed(&Frame::Continuation(Item::FirstText(Bytes::from(vec![0; 600]))));
        assert!(limit.check(&header(0x0, 400)).is_ok());
        assert!(is_overflow(limit.check(&header(0x0, 401))));
        limit.passed(&Frame::Continuation(Item::Continue(Bytes::from(vec![0; 300]))));
        assert!(is_overflow(limit.check(&header(0x0, 101))));
        // A ping between fragments is checked alone.
        assert!(limit.check(&header(0x9, 10)).is_ok());
        limit.passed(&Frame::Continuation(Item::Last(Bytes::from(vec![0; 100]))));
        assert!(
            limit.check(&header(0x1, 1000)).is_ok(),
            "a new message starts at 0"
        );
    }
}
