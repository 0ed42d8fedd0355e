//! Checkpoints: the on-disk format, its page index and chains (`format`,
//! `index`, `chain`), taking a checkpoint of a running VM (`create`, which
//! runs the transfer engine with the file sink beside it, `sink`), and
//! restoring one (`restore`).

pub mod chain;
pub mod create;
pub mod format;
pub mod index;
pub mod restore;
pub mod sink;
