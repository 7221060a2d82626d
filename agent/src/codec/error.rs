//! Codec errors. `Display` is for operators; `kind()` is a stable metrics label.

/// Why a frame or header was rejected.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CodecError {
    #[error(
        "frame length field {len} is below the minimum of 4 (it must cover the header-length word)"
    )]
    FrameTooShort { len: i64 },
    #[error("frame length {len} exceeds the limit of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    #[error("header length {header_len} does not fit in frame length {frame_len} (max header {max_header})")]
    HeaderLength {
        header_len: usize,
        frame_len: usize,
        max_header: usize,
    },
    #[error(
        "unknown serialize type {0} in the header-length word (expected 0 = JSON or 1 = ROCKETMQ)"
    )]
    SerializeType(u8),
    #[error("invalid JSON header: {0}")]
    JsonHeader(String),
    #[error("invalid ROCKETMQ binary header: {0}")]
    BinaryHeader(String),
    #[error("buffer holds {have} bytes but the frame needs {need}")]
    Incomplete { have: usize, need: usize },
    #[error("{extra} bytes follow the frame")]
    TrailingBytes { extra: usize },
}

impl CodecError {
    /// Stable snake_case label (metrics cardinality is bounded by this list).
    pub fn kind(&self) -> &'static str {
        match self {
            CodecError::FrameTooShort { .. } => "frame_too_short",
            CodecError::FrameTooLarge { .. } => "frame_too_large",
            CodecError::HeaderLength { .. } => "header_length",
            CodecError::SerializeType(_) => "serialize_type",
            CodecError::JsonHeader(_) => "json_header",
            CodecError::BinaryHeader(_) => "binary_header",
            CodecError::Incomplete { .. } => "incomplete",
            CodecError::TrailingBytes { .. } => "trailing_bytes",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_distinct_snake_case() {
        let all = [
            CodecError::FrameTooShort { len: 1 },
            CodecError::FrameTooLarge { len: 9, max: 8 },
            CodecError::HeaderLength {
                header_len: 9,
                frame_len: 8,
                max_header: 8,
            },
            CodecError::SerializeType(7),
            CodecError::JsonHeader("x".into()),
            CodecError::BinaryHeader("x".into()),
            CodecError::Incomplete { have: 1, need: 2 },
            CodecError::TrailingBytes { extra: 1 },
        ];
        let mut kinds: Vec<_> = all.iter().map(|e| e.kind()).collect();
        for k in &kinds {
            assert!(
                k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{k}"
            );
        }
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds.len(), all.len());
        assert!(all[1].to_string().contains("exceeds the limit"));
    }
}
