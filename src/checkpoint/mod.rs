//! Checkpoints: the on-disk format and chains (`format`, `chain`), taking a
//! checkpoint of a running VM through the transfer engine with the file sink
//! (`sink`) beside it
//! (`create`), and restoring one (`restore`).

pub mod chain;
pub mod create;
pub mod format;
pub mod restore;
pub mod sink;
