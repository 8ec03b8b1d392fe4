//! Talking to origins: circuit breakers, retry backoff and budget.

pub mod backoff;
pub mod breaker;
pub mod budget;
pub mod fetch;
pub mod pool;
