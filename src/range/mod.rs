//! HTTP byte ranges (RFC 9110 §14): parsing the `Range` header, planning which chunks cover the
//! requested bytes, and laying out `multipart/byteranges` bodies. Pure logic, no I/O.

pub mod multipart;
pub mod parse;
pub mod plan;

pub use multipart::{new_boundary, MultipartLayout};
pub use parse::{
    if_range_holds, parse_range, resolve, ByteRange, RangeDecision, RangeRequest, RangeSpec,
};
pub use plan::{chunk_bounds, chunk_count, runs, spans, ChunkSpan};
