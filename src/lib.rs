//! coexist — a mail-routing coexistence proxy for mailbox migrations.
//!
//! During a migration both mail systems (the *targets*, e.g. `old` and `new`) run side by
//! side and coexist sends each mailbox's traffic to whichever side owns it right now.
//!
//! The data flow, and where each part lives:
//!
//! ```text
//! config/  coexist.toml ─► Config (validated, file:line errors)
//! route/   routes.toml + CSV ─► TableBuilder ─► RoutingTable (immutable, versioned)
//!                                                  │
//!          Router (one ArcSwap + history) ◄────────┘  swap / rollback, diff
//!                 │ snapshot() per transaction
//!          client ─► listener ─► session ─► lookup(recipient) ─► owner target's server
//! ```
//!
//! The routing table is the foundation: every protocol front end (SMTP, HTTPS) only asks
//! the router for a snapshot and calls `lookup*` on it.

pub mod admin;
pub mod app;
pub mod config;
pub mod control;
pub mod date;
pub mod demo;
pub mod diagnostics;
pub mod metric_names;
pub mod net;
pub mod route;
pub mod smtp;
pub mod traffic;
pub mod upstream;
