//! Routing: who owns each mailbox right now.
//!
//! `source` reads `routes.toml` and its CSV imports → `table::TableBuilder` normalises
//! (`normalize`) and validates every entry, reporting `file:line: message`
//! (`diagnostics`) → an immutable [`RoutingTable`] → the [`Router`] swaps it in atomically
//! and keeps a bounded history for rollback; `diff` says who moves between two tables.

pub mod diff;
pub mod explain;
pub mod normalize;
pub mod router;
pub mod source;
pub mod table;

pub use crate::diagnostics::{Diagnostic, Diagnostics};
pub use diff::TableDiff;
pub use explain::explain;
pub use normalize::LocalPolicy;
pub use router::{DEFAULT_HISTORY, RollbackError, Router, Swapped};
pub use source::{
    LoadError, ReadSource, SourceFile, compile_routes, load_routes, load_routes_text,
};
pub use table::{
    Field, KnownTargets, MailboxRef, MailboxSpec, Route, RoutingTable, TableBuilder, TargetId,
    Version,
};
