//! The SMTP proxy: listener → session (per client connection) → per-recipient route lookup
//! → backend transactions on the owner targets' servers.

pub mod backend;
pub mod command;
pub mod data;
pub mod io;
pub mod reply;
pub mod session;
pub mod spool;
