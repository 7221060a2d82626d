//! RocketMQ remoting codec. Pure: no I/O, no panics on any input; the relay forwards the
//! original bytes, so decoding only validates and extracts what logs and metrics need.

pub mod code;
pub mod error;
pub mod frame;
pub mod header;

pub use code::{request_code_name, response_code_name, LanguageCode};
pub use error::CodecError;
pub use frame::{
    decode_frame, encode_frame, FrameMeta, FrameScanner, Limits, ScanOutcome, PREFIX_LEN,
};
pub use header::{decode_header, encode_binary_header, encode_json_header, Header, SerializeType};
