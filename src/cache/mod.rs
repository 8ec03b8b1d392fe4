//! The chunk cache: object metadata and freshness, the memory tier, the disk tier.

pub mod disk;
pub mod freshness;
