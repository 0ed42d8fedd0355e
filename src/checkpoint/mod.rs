//! Checkpoints: the on-disk format and chains (`format`, `chain`), taking a
//! checkpoint of a running VM (`create`, which runs the transfer engine with
//! the file sink beside it, `sink`), and restoring one (`restore`).

pub mod chain;
pub mod create;
pub mod format;
pub mod restore;
pub mod sink;
