//! Frames: `i32 len | i32 (serType << 24 | headerLen) | header | body`, `len` excluding itself.

use std::ops::Range;

use super::error::CodecError;
use super::header::{
    decode_header, encode_binary_header, encode_json_header, Header, SerializeType,
};

/// Length-field and header-length word.
pub const PREFIX_LEN: usize = 8;

/// Upper bounds checked before any header byte is parsed or buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Max value of the length field (Java `frameMaxLength`).
    pub max_frame: usize,
    /// Max header length; also caps how much a relay must buffer per frame.
    pub max_header: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: rmq_common::DEFAULT_MAX_FRAME,
            max_header: 1024 * 1024,
        }
    }
}

/// A frame whose prefix and header were validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameMeta {
    pub header: Header,
    /// Start of the frame in the slice passed to `scan`.
    pub offset: usize,
    /// 4 + the length field.
    pub frame_len: usize,
    pub body_len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanOutcome {
    /// Leading bytes of `data` that may be forwarded now.
    pub consumed: usize,
    /// Length `data[consumed..]` must reach before the next scan can progress; 0 if all was consumed.
    pub need: usize,
    /// Set on a malformed frame; the scanner stays failed afterwards.
    pub error: Option<CodecError>,
}

/// What the bytes at the start of a slice say about the next frame.
enum Prefix {
    /// Not enough bytes to decide; `frame_len` is known once the length field is (else 0).
    Short { need: usize, frame_len: usize },
    Frame {
        header: Header,
        frame_len: usize,
        header_end: usize,
    },
}

/// Validates whatever part of the prefix is present, then the header once it is complete.
/// Checks run in a fixed order, so a bad frame yields the same error however it is chunked.
fn parse_prefix(data: &[u8], limits: &Limits) -> Result<Prefix, CodecError> {
    let Some(len_bytes) = data.first_chunk::<4>() else {
        return Ok(Prefix::Short {
            need: PREFIX_LEN,
            frame_len: 0,
        });
    };
    let len = i32::from_be_bytes(*len_bytes);
    if len < 4 {
        return Err(CodecError::FrameTooShort { len: len.into() });
    }
    let len = len as usize; // non-negative i32
    if len > limits.max_frame {
        return Err(CodecError::FrameTooLarge {
            len,
            max: limits.max_frame,
        });
    }
    let frame_len = 4 + len;
    let Some(mark) = data.get(4..PREFIX_LEN) else {
        return Ok(Prefix::Short {
            need: PREFIX_LEN,
            frame_len,
        });
    };
    let ser = SerializeType::from_byte(mark[0]).ok_or(CodecError::SerializeType(mark[0]))?;
    let header_len = usize::from(mark[1]) << 16 | usize::from(mark[2]) << 8 | usize::from(mark[3]);
    if header_len > len - 4 || header_len > limits.max_header {
        return Err(CodecError::HeaderLength {
            header_len,
            frame_len: len,
            max_header: limits.max_header,
        });
    }
    let header_end = PREFIX_LEN + header_len;
    let Some(hbytes) = data.get(PREFIX_LEN..header_end) else {
        return Ok(Prefix::Short {
            need: header_end,
            frame_len,
        });
    };
    let header = decode_header(ser, hbytes)?;
    Ok(Prefix::Frame {
        header,
        frame_len,
        header_end,
    })
}

/// Streaming validator for a relay: header bytes are held back until the header
/// parses; body bytes are released as they arrive.
#[derive(Debug, Clone)]
pub struct FrameScanner {
    limits: Limits,
    /// Body bytes of the current frame still to come.
    body_left: usize,
    /// Length of the frame whose body is streaming.
    body_frame_len: usize,
    /// Unconsumed bytes of an incomplete prefix/header at the end of the last scan, and its frame
    /// length if known (0 if not).
    pending: (usize, usize),
    failed: Option<CodecError>,
}

impl FrameScanner {
    pub fn new(limits: Limits) -> Self {
        FrameScanner {
            limits,
            body_left: 0,
            body_frame_len: 0,
            pending: (0, 0),
            failed: None,
        }
    }

    /// Scans the relay's not-yet-forwarded bytes (`data` must start where the previous scan's
    /// `consumed` ended), pushing one `FrameMeta` per newly validated frame.
    pub fn scan(&mut self, data: &[u8], frames: &mut Vec<FrameMeta>) -> ScanOutcome {
        if let Some(e) = &self.failed {
            return ScanOutcome {
                consumed: 0,
                need: 0,
                error: Some(e.clone()),
            };
        }
        self.pending = (0, 0);
        let mut pos = self.body_left.min(data.len());
        self.body_left -= pos;
        while self.body_left == 0 && pos < data.len() {
            let rest = &data[pos..];
            match parse_prefix(rest, &self.limits) {
                Ok(Prefix::Short { need, frame_len }) => {
                    self.pending = (rest.len(), frame_len);
                    return ScanOutcome {
                        consumed: pos,
                        need,
                        error: None,
                    };
                }
                Err(e) => {
                    self.pending = (rest.len(), 0);
                    self.failed = Some(e.clone());
                    return ScanOutcome {
                        consumed: pos,
                        need: 0,
                        error: Some(e),
                    };
                }
                Ok(Prefix::Frame {
                    header,
                    frame_len,
                    header_end,
                }) => {
                    let body_len = frame_len - header_end;
                    frames.push(FrameMeta {
                        header,
                        offset: pos,
                        frame_len,
                        body_len,
                    });
                    let take = body_len.min(rest.len() - header_end);
                    pos += header_end + take;
                    self.body_left = body_len - take;
                    self.body_frame_len = frame_len;
                }
            }
        }
        ScanOutcome {
            consumed: pos,
            need: 0,
            error: None,
        }
    }

    /// Where a streaming body stands, so a successor process can resume this
    /// stream with [`FrameScanner::resume`]: (body bytes still to come, frame length).
    pub fn body_state(&self) -> (usize, usize) {
        (self.body_left, self.body_frame_len)
    }

    /// A scanner that continues a stream another scanner paused at a read boundary.
    pub fn resume(limits: Limits, (body_left, body_frame_len): (usize, usize)) -> Self {
        FrameScanner { body_left, body_frame_len, ..FrameScanner::new(limits) }
    }

    /// `Some((bytes_seen, frame_len))` if the last scan stopped inside a frame; `frame_len` is 0
    /// when not even the length field had arrived.
    pub fn mid_frame(&self) -> Option<(usize, usize)> {
        if self.body_left > 0 {
            Some((self.body_frame_len - self.body_left, self.body_frame_len))
        } else if self.pending.0 > 0 {
            Some(self.pending)
        } else {
            None
        }
    }
}

/// Decodes exactly one whole frame; returns its header and the body's range in `buf`.
pub fn decode_frame(buf: &[u8], limits: &Limits) -> Result<(Header, Range<usize>), CodecError> {
    match parse_prefix(buf, limits)? {
        Prefix::Short { need, frame_len } => Err(CodecError::Incomplete {
            have: buf.len(),
            need: need.max(frame_len),
        }),
        Prefix::Frame {
            header,
            frame_len,
            header_end,
        } => {
            if buf.len() < frame_len {
                Err(CodecError::Incomplete {
                    have: buf.len(),
                    need: frame_len,
                })
            } else if buf.len() > frame_len {
                Err(CodecError::TrailingBytes {
                    extra: buf.len() - frame_len,
                })
            } else {
                Ok((header, header_end..frame_len))
            }
        }
    }
}

/// Encodes a frame with the header's own serialize type. Callers keep headers under
/// 16 MiB (the 24-bit header-length field); larger ones would produce a frame peers reject.
pub fn encode_frame(header: &Header, body: &[u8]) -> Vec<u8> {
    let h = match header.serialize_type {
        SerializeType::Json => encode_json_header(header),
        SerializeType::RocketMq => encode_binary_header(header),
    };
    let len = 4 + h.len() + body.len();
    let mark = u32::from(header.serialize_type.byte()) << 24 | (h.len() as u32 & 0x00ff_ffff);
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.extend_from_slice(&mark.to_be_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(code: i32, opaque: i32, ser: SerializeType) -> Header {
        Header {
            code,
            language: "RUST".into(),
            version: 474,
            opaque,
            flag: 0,
            remark: None,
            ext_fields: vec![("topic".into(), "T".into())],
            serialize_type: ser,
        }
    }

    fn small() -> Limits {
        Limits {
            max_frame: 1000,
            max_header: 200,
        }
    }

    #[test]
    fn decode_round_trip() {
        for ser in [SerializeType::Json, SerializeType::RocketMq] {
            let h = req(105, 7, ser);
            let f = encode_frame(&h, b"body");
            let (d, body) = decode_frame(&f, &Limits::default()).unwrap();
            assert_eq!(d, h);
            assert_eq!(&f[body], b"body");
            assert_eq!(
                decode_frame(&f[..f.len() - 1], &Limits::default())
                    .unwrap_err()
                    .kind(),
                "incomplete"
            );
            let mut long = f.clone();
            long.push(0);
            assert_eq!(
                decode_frame(&long, &Limits::default()).unwrap_err().kind(),
                "trailing_bytes"
            );
        }
    }

    #[test]
    fn prefix_errors() {
        let l = small();
        let mk = |len: i32, mark: u32| [len.to_be_bytes(), mark.to_be_bytes()].concat();
        let cases: [(Vec<u8>, &str); 7] = [
            (mk(3, 0), "frame_too_short"),
            (mk(-1, 0), "frame_too_short"),
            (mk(1001, 0), "frame_too_large"),
            (mk(100, 2 << 24), "serialize_type"),
            (mk(100, 97), "header_length"),
            (mk(1000, 201), "header_length"),
            (mk(20, 16), "json_header"),
        ];
        for (bytes, kind) in cases {
            let mut buf = bytes.clone();
            buf.resize(24, b' ');
            assert_eq!(decode_frame(&buf, &l).unwrap_err().kind(), kind);
            let mut s = FrameScanner::new(l);
            let mut frames = Vec::new();
            let out = s.scan(&buf, &mut frames);
            assert_eq!((out.consumed, out.error.map(|e| e.kind())), (0, Some(kind)));
            assert!(frames.is_empty());
            // Sticky: a failed scanner never forwards again.
            assert_eq!(
                s.scan(
                    &encode_frame(&req(1, 1, SerializeType::Json), b""),
                    &mut frames
                )
                .consumed,
                0
            );
        }
        // Length errors are caught from the first 4 bytes, without waiting for more.
        let mut s = FrameScanner::new(l);
        assert_eq!(
            s.scan(&mk(5000, 0)[..4], &mut Vec::new())
                .error
                .unwrap()
                .kind(),
            "frame_too_large"
        );
    }

    #[test]
    fn streaming_body_and_need() {
        let a = encode_frame(&req(11, 1, SerializeType::Json), &[7u8; 50]);
        let b = encode_frame(&req(34, 2, SerializeType::RocketMq), b"");
        let hdr_end =
            PREFIX_LEN + (u32::from_be_bytes(a[4..8].try_into().unwrap()) & 0xffffff) as usize;
        let mut s = FrameScanner::new(Limits::default());
        let mut frames = Vec::new();

        let out = s.scan(&a[..3], &mut frames);
        assert_eq!((out.consumed, out.need), (0, 8));
        assert_eq!(s.mid_frame(), Some((3, 0)));
        let out = s.scan(&a[..10], &mut frames);
        assert_eq!((out.consumed, out.need), (0, hdr_end));
        assert_eq!(s.mid_frame(), Some((10, a.len())));
        // Header complete: header and available body bytes are released.
        let out = s.scan(&a[..hdr_end + 5], &mut frames);
        assert_eq!((out.consumed, out.need, frames.len()), (hdr_end + 5, 0, 1));
        assert_eq!(s.mid_frame(), Some((hdr_end + 5, a.len())));
        // Rest of the body plus the next frame whole.
        let rest = [&a[hdr_end + 5..], &b[..]].concat();
        let out = s.scan(&rest, &mut frames);
        assert_eq!((out.consumed, out.need, out.error), (rest.len(), 0, None));
        assert_eq!(s.mid_frame(), None);
        assert_eq!(frames.len(), 2);
        assert_eq!(
            (frames[0].offset, frames[0].frame_len, frames[0].body_len),
            (0, a.len(), 50)
        );
        assert_eq!(
            (frames[1].offset, frames[1].header.code),
            (a.len() - hdr_end - 5, 34)
        );
        assert_eq!(frames[1].header.serialize_type, SerializeType::RocketMq);
        assert_eq!(
            s.scan(&[], &mut frames),
            ScanOutcome {
                consumed: 0,
                need: 0,
                error: None
            }
        );
    }

    #[test]
    fn error_after_good_frames_counts_only_them() {
        let a = encode_frame(&req(11, 1, SerializeType::Json), b"xy");
        let mut buf = [&a[..], &a[..]].concat();
        buf.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
        let mut frames = Vec::new();
        let mut s = FrameScanner::new(Limits::default());
        let out = s.scan(&buf, &mut frames);
        assert_eq!((out.consumed, frames.len()), (2 * a.len(), 2));
        assert_eq!(out.error.unwrap().kind(), "frame_too_short");
        assert_eq!(s.mid_frame(), Some((8, 0)));
    }

    #[test]
    fn header_limit_caps_need() {
        let l = Limits {
            max_frame: 1 << 20,
            max_header: 64,
        };
        let mut big = req(10, 1, SerializeType::Json);
        big.remark = Some("x".repeat(100));
        let f = encode_frame(&big, b"");
        let out = FrameScanner::new(l).scan(&f[..8], &mut Vec::new());
        assert_eq!(out.error.unwrap().kind(), "header_length");
        let out = FrameScanner::new(Limits::default()).scan(&f[..8], &mut Vec::new());
        assert_eq!(out.need, f.len());
    }
}
