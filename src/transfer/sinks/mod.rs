//! The engine's sinks: where pages go.
//!
//! - [`local`]: new memory bound to another host node (NUMA moves);
//! - [`file`]: a checkpoint file.

pub mod file;
pub mod local;
