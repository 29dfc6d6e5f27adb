//! Where WebSocket frames begin and end in a relayed byte stream (RFC 6455 §5.2), so a
//! tunnel can put a Close frame between two frames without cutting one. Headers are
//! parsed; payloads are only counted, never unmasked or copied, and permessage-deflate
//! changes nothing here (it only sets RSV1).
//!
//! Lifecycle of a [`FrameTracker`] (one per direction of a tunnel, fed every chunk):
//! - *header*: collecting the 2 to 14 header bytes of the next frame; a chunk may end
//!   anywhere among them. With none collected yet the stream is at a *boundary*.
//! - *payload*: skipping the payload length the header announced, then back to *header*.
//! - *broken*: a header no WebSocket peer sends (a reserved opcode, a fragmented or long
//!   control frame, masking the wrong way, a continuation with no message to continue).
//!   The stream is not WebSocket framing, so boundaries are unknown for good.

use std::hash::{BuildHasher, RandomState};

/// The longest frame header: 2 bytes, a 64-bit extended length, a 4-byte mask key.
const MAX_HEADER: usize = 14;

/// Close frame opcode (RFC 6455 §5.5.1).
const OPCODE_CLOSE: u8 = 0x8;

/// Close status 1001: "going away", what a server shutting down sends (RFC 6455 §7.4.1).
const GOING_AWAY: u16 = 1001;

/// The Close frame's reason text (at most 123 bytes).
const GOING_AWAY_REASON: &[u8] = b"going away";

/// The stream is not WebSocket framing: what gave it away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not WebSocket framing: {0}")]
pub(crate) struct Unparseable(&'static str);

/// Follows the frame headers of one direction of a WebSocket connection.
#[derive(Debug, Clone)]
pub(crate) struct FrameTracker {
    state: State,
    /// Whether frames in this direction are masked: client to server, RFC 6455 §5.3.
    masked: bool,
    /// A data frame without FIN started a message: continuation frames follow.
    in_message: bool,
    /// Complete Close frames seen so far.
    closes: u32,
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// `have` header bytes of the next frame are in `bytes`.
    Header {
        bytes: [u8; MAX_HEADER],
        have: u8,
    },
    /// `remaining` payload bytes of the current frame are still to come.
    Payload {
        remaining: u64,
        close: bool,
    },
    Broken(Unparseable),
}

const AT_BOUNDARY: State = State::Header {
    bytes: [0; MAX_HEADER],
    have: 0,
};

impl FrameTracker {
    /// A tracker at the start of a stream whose frames are `masked` (client to server)
    /// or not (server to client).
    pub(crate) fn new(masked: bool) -> FrameTracker {
        FrameTracker {
            state: AT_BOUNDARY,
            masked,
            in_message: false,
            closes: 0,
        }
    }

    /// Whether everything fed so far ends exactly at the end of a frame.
    pub(crate) fn at_boundary(&self) -> bool {
        matches!(self.state, State::Header { have: 0, .. })
    }

    /// How many complete Close frames went by.
    pub(crate) fn closes(&self) -> u32 {
        self.closes
    }

    /// Follows all of `bytes`.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Result<(), Unparseable> {
        self.advance(bytes, false).map(|_| ())
    }

    /// Follows `bytes` up to the next boundary and returns how many it took: 0 when at a
    /// boundary already, all of them when no frame ends among them.
    pub(crate) fn feed_to_boundary(&mut self, bytes: &[u8]) -> Result<usize, Unparseable> {
        self.advance(bytes, true)
    }

    fn advance(&mut self, bytes: &[u8], stop_at_boundary: bool) -> Result<usize, Unparseable> {
        let mut taken = 0;
        loop {
            if stop_at_boundary && self.at_boundary() {
                return Ok(taken);
            }
            let Some(rest) = bytes.get(taken..).filter(|rest| !rest.is_empty()) else {
                return match self.state {
                    State::Broken(err) => Err(err),
                    _ => Ok(taken),
                };
            };
            match &mut self.state {
                State::Broken(err) => return Err(*err),
                State::Payload { remaining, close } => {
                    let skip =
                        usize::try_from(*remaining).map_or(rest.len(), |r| r.min(rest.len()));
                    taken += skip;
                    // `skip` fits in the u64 it was capped by.
                    *remaining -= skip as u64;
                    if *remaining == 0 {
                        let close = *close;
                        self.frame_done(close);
                    }
                }
                State::Header { bytes, have } => {
                    bytes[usize::from(*have)] = rest[0];
                    *have += 1;
                    taken += 1;
                    let header = *bytes;
                    let have = usize::from(*have);
                    if let Err(err) = self.header_byte(&header, have) {
                        self.state = State::Broken(err);
                        return Err(err);
                    }
                }
            }
        }
    }

    /// Checks the header so far (`have` bytes of `header`); once it is complete, moves to
    /// its payload.
    fn header_byte(&mut self, header: &[u8; MAX_HEADER], have: usize) -> Result<(), Unparseable> {
        let fin = header[0] & 0x80 != 0;
        let opcode = header[0] & 0x0F;
        let control = opcode & 0x8 != 0;
        if have == 1 {
            return match opcode {
                0x3..=0x7 | 0xB..=0xF => Err(Unparseable("reserved opcode")),
                _ if control && !fin => Err(Unparseable("fragmented control frame")),
                0x0 if !self.in_message => Err(Unparseable("continuation with no message")),
                0x1 | 0x2 if self.in_message => {
                    Err(Unparseable("new message inside a fragmented one"))
                }
                _ => Ok(()),
            };
        }
        let masked = header[1] & 0x80 != 0;
        let length7 = header[1] & 0x7F;
        if have == 2 {
            if masked != self.masked {
                return Err(Unparseable(if self.masked {
                    "unmasked frame from the client"
                } else {
                    "masked frame from the server"
                }));
            }
            if control && length7 > 125 {
                return Err(Unparseable("control frame longer than 125 bytes"));
            }
        }
        let extended = match length7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        if have < 2 + extended + if masked { 4 } else { 0 } {
            return Ok(());
        }
        let length = match extended {
            2 => u64::from(u16::from_be_bytes([header[2], header[3]])),
            8 => {
                let mut long = [0u8; 8];
                long.copy_from_slice(&header[2..10]);
                let long = u64::from_be_bytes(long);
                if long >> 63 != 0 {
                    return Err(Unparseable("64-bit length with the top bit set"));
                }
                long
            }
            _ => u64::from(length7),
        };
        match opcode {
            0x1 | 0x2 => self.in_message = !fin,
            0x0 if fin => self.in_message = false,
            _ => {}
        }
        let close = opcode == OPCODE_CLOSE;
        if length == 0 {
            self.frame_done(close);
        } else {
            self.state = State::Payload {
                remaining: length,
                close,
            };
        }
        Ok(())
    }

    fn frame_done(&mut self, close: bool) {
        if close {
            self.closes += 1;
        }
        self.state = AT_BOUNDARY;
    }
}

/// A Close frame with status 1001 "going away": masked with a fresh random key when it
/// goes to the app (a client's frames must be masked, RFC 6455 §5.3), unmasked when it
/// goes to the client.
pub(crate) fn going_away(masked: bool) -> Vec<u8> {
    let mut payload = Vec::with_capacity(2 + GOING_AWAY_REASON.len());
    payload.extend_from_slice(&GOING_AWAY.to_be_bytes());
    payload.extend_from_slice(GOING_AWAY_REASON);
    let length = u8::try_from(payload.len()).unwrap_or(125);
    let mut frame = Vec::with_capacity(6 + payload.len());
    frame.push(0x80 | OPCODE_CLOSE);
    if masked {
        let key = mask_key();
        frame.push(0x80 | length);
        frame.extend_from_slice(&key);
        frame.extend(payload.iter().zip(key.iter().cycle()).map(|(b, k)| b ^ k));
    } else {
        frame.push(length);
        frame.extend_from_slice(&payload);
    }
    frame
}

/// Four unpredictable bytes: `RandomState` is seeded per instance from the OS, which is
/// all a mask key needs (it stops cache poisoning by making the bytes on the wire
/// unpredictable to the page's script, RFC 6455 §10.3).
fn mask_key() -> [u8; 4] {
    let [a, b, c, d, ..] = RandomState::new().hash_one(0u8).to_le_bytes();
    [a, b, c, d]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as a peer sends it: `fin`, `opcode`, a payload of `length` bytes (all
    /// `0xAB`), masked with a fixed key when `masked`.
    fn frame(fin: bool, opcode: u8, length: usize, masked: bool) -> Vec<u8> {
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let mask_bit = if masked { 0x80 } else { 0 };
        if length < 126 {
            out.push(mask_bit | u8::try_from(length).unwrap());
        } else if let Ok(short) = u16::try_from(length) {
            out.push(mask_bit | 0x7E);
            out.extend_from_slice(&short.to_be_bytes());
        } else {
            out.push(mask_bit | 0x7F);
            out.extend_from_slice(&(length as u64).to_be_bytes());
        }
        if masked {
            out.extend_from_slice(&[1, 2, 3, 4]);
        }
        out.extend(std::iter::repeat_n(0xAB, length));
        out
    }

    /// Where the frames of `frames` end, as offsets into their concatenation.
    fn ends(frames: &[Vec<u8>]) -> Vec<usize> {
        frames
            .iter()
            .scan(0, |end, frame| {
                *end += frame.len();
                Some(*end)
            })
            .collect()
    }

    /// Feeds `chunks` the way a pump does (up to each boundary, then on) and returns the
    /// offsets of the boundaries found, and the tracker.
    fn walk<'a>(
        masked: bool,
        chunks: impl IntoIterator<Item = &'a [u8]>,
    ) -> (Vec<usize>, FrameTracker) {
        let mut tracker = FrameTracker::new(masked);
        let mut found = Vec::new();
        let mut offset = 0;
        for chunk in chunks {
            let mut rest = chunk;
            while !rest.is_empty() {
                // At a boundary it takes nothing: one byte starts the next frame.
                let taken = if tracker.at_boundary() {
                    tracker.feed(&rest[..1]).unwrap();
                    1
                } else {
                    tracker.feed_to_boundary(rest).unwrap()
                };
                offset += taken;
                rest = &rest[taken..];
                if tracker.at_boundary() {
                    found.push(offset);
                }
            }
        }
        (found, tracker)
    }

    /// Checks the boundaries found when `stream` is split in two at every offset.
    fn assert_every_split(stream: &[u8], masked: bool, expected: &[usize], closes: u32) {
        for split in 0..=stream.len() {
            let (found, tracker) = walk(masked, [&stream[..split], &stream[split..]]);
            assert_eq!(found, expected, "split at {split}");
            assert_eq!(tracker.closes(), closes);
        }
    }

    #[test]
    fn finds_boundaries_for_every_length_encoding_both_ways() {
        for masked in [false, true] {
            let frames = vec![
                frame(true, 0x1, 0, masked),
                frame(true, 0x1, 5, masked),
                frame(true, 0x2, 125, masked),
                frame(true, 0x2, 126, masked),
                frame(true, 0x2, 65_535, masked),
                frame(true, 0x2, 65_536, masked),
                frame(true, 0x9, 3, masked),
                frame(true, 0x8, 2, masked),
            ];
            let stream = frames.concat();
            let expected = ends(&frames);
            // Byte by byte, small chunks that cut every header somewhere, buffer sizes.
            for size in (1..=20).chain([125, 126, 127, 512, 16 * 1024, stream.len()]) {
                let (found, tracker) = walk(masked, stream.chunks(size));
                assert_eq!(found, expected, "chunks of {size}");
                assert_eq!(tracker.closes(), 1);
            }
        }
    }

    #[test]
    fn headers_split_across_chunks_at_every_byte() {
        for masked in [false, true] {
            // Short frames, so every split point of the whole stream is tried: 7-, 16- and
            // 64-bit lengths (a 64-bit length may encode a small payload), masked or not.
            let mut long_small = vec![0x82, if masked { 0xFF } else { 0x7F }];
            long_small.extend_from_slice(&3u64.to_be_bytes());
            if masked {
                long_small.extend_from_slice(&[9, 9, 9, 9]);
            }
            long_small.extend_from_slice(&[1, 2, 3]);
            let frames = vec![
                frame(true, 0x1, 3, masked),
                frame(true, 0x2, 200, masked),
                long_small,
                frame(true, 0xA, 0, masked),
                frame(true, 0x8, 12, masked),
            ];
            assert_every_split(&frames.concat(), masked, &ends(&frames), 1);
        }
    }

    #[test]
    fn feed_to_boundary_stops_where_the_frame_ends() {
        let stream = [frame(true, 0x1, 300, false), frame(true, 0x1, 1, false)].concat();
        let mut tracker = FrameTracker::new(false);
        // At a boundary (the start) it takes nothing.
        assert_eq!(tracker.feed_to_boundary(&stream).unwrap(), 0);
        tracker.feed(&stream[..1]).unwrap();
        assert_eq!(tracker.feed_to_boundary(&stream[1..100]).unwrap(), 99);
        assert!(!tracker.at_boundary());
        assert_eq!(tracker.feed_to_boundary(&stream[100..]).unwrap(), 304 - 100);
        assert!(tracker.at_boundary());
        assert_eq!(tracker.feed_to_boundary(&stream[304..]).unwrap(), 0);
    }

    #[test]
    fn control_frames_between_fragments() {
        let frames = vec![
            frame(false, 0x1, 4, true),
            frame(true, 0x9, 2, true),
            frame(false, 0x0, 4, true),
            frame(true, 0xA, 0, true),
            frame(true, 0x8, 2, true),
            frame(true, 0x0, 4, true),
            frame(true, 0x2, 1, true),
        ];
        assert_every_split(&frames.concat(), true, &ends(&frames), 1);
    }

    #[test]
    fn a_stream_that_is_not_websocket_framing_is_refused_for_good() {
        let cases: &[(&[u8], bool, &str)] = &[
            (b"GET / HTTP/1.1\r\n", true, "reserved opcode"),
            (&[0x83, 0x80], true, "reserved opcode"),
            (&[0x09, 0x80], true, "fragmented control frame"),
            (&[0x80, 0x80], true, "continuation with no message"),
            (&[0x81, 0x00], true, "unmasked frame from the client"),
            (&[0x81, 0x80], false, "masked frame from the server"),
            (&[0x89, 0x7E], false, "control frame longer than 125 bytes"),
            (
                &[0x82, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 0],
                false,
                "64-bit length with the top bit set",
            ),
            (
                &[0x01, 0x00, 0x81, 0x00],
                false,
                "new message inside a fragmented one",
            ),
        ];
        for (bytes, masked, reason) in cases {
            let mut tracker = FrameTracker::new(*masked);
            let err = tracker.feed(bytes).unwrap_err();
            assert_eq!(err, Unparseable(reason), "{bytes:?}");
            assert_eq!(tracker.feed(&[0x81, 0x00]), Err(err), "stays broken");
            assert!(!tracker.at_boundary());
        }
    }

    #[test]
    fn permessage_deflate_frames_are_ordinary_frames() {
        // RSV1 marks a compressed message's first frame; framing is unchanged.
        let mut compressed = frame(true, 0x1, 30, false);
        compressed[0] |= 0x40;
        let frames = vec![compressed, frame(true, 0x1, 2, false)];
        assert_every_split(&frames.concat(), false, &ends(&frames), 0);
    }

    #[test]
    fn going_away_frames_parse_back_with_code_1001() {
        for masked in [false, true] {
            let close = going_away(masked);
            let mut tracker = FrameTracker::new(masked);
            tracker.feed(&close).unwrap();
            assert!(tracker.at_boundary());
            assert_eq!(tracker.closes(), 1);
            assert_eq!(close[0], 0x88);
            assert_eq!(close[1] & 0x80 != 0, masked);
            let length = usize::from(close[1] & 0x7F);
            let payload: Vec<u8> = if masked {
                let key = &close[2..6];
                close[6..]
                    .iter()
                    .zip(key.iter().cycle())
                    .map(|(b, k)| b ^ k)
                    .collect()
            } else {
                close[2..].to_vec()
            };
            assert_eq!(payload.len(), length);
            assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1001);
            assert_eq!(&payload[2..], b"going away");
        }
        // Fresh keys: two masked frames differ (a repeat is a 1 in 2^32 chance).
        assert_ne!(going_away(true)[2..6], going_away(true)[2..6]);
    }
}
