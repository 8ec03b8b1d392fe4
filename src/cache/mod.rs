//! The chunk cache: object metadata and freshness, the memory tier, the disk tier.

pub mod bans;
pub mod disk;
pub mod fill;
pub mod flight;
pub mod freshness;
pub mod held;
pub mod key;
pub mod memory;
pub mod meta;
pub mod purge;
pub mod store;
pub mod tables;
pub mod vary;
