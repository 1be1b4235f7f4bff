//! coexist — a mail-routing coexistence proxy for mailbox migrations.
//!
//! During a migration both mail systems (the *targets*, e.g. `old` and `new`) run side by
//! side and coexist sends each mailbox's traffic to whichever side owns it right now.
//!
//! The data flow:
//!
//! ```text
//! client ─► net::listener (caps, TLS) ─► smtp::session ─► route lookup ─► upstream target
//!                                         (https, next)      │              └► its server
//!           control (reload/cutover/rollback) ─► Router ─────┘ snapshot() per transaction
//!                                                   └─ watch: every installed table ─► traffic, drain
//! ```
//!
//! The layers, each importing only from those below it (no cycles):
//!
//! ```text
//! app, demo          wire everything, own shutdown            (main.rs: the CLI on top)
//! admin              admin API, /metrics, status page
//! control            reload / cutover / rollback: files, history, swaps
//! smtp, https        SMTP sessions, backend transactions and pool, spool │ HTTPS server,
//!                    identity of a request's mailbox, forwarding, hardening, affinity
//! traffic            lock-free per-target/site meters for the page and counters
//! net, upstream      listeners, TLS, shutdown, resolver, PROXY v2 │ targets, servers, health
//! config, route      coexist.toml → Config │ routes → RoutingTable → Router
//! diagnostics, date, metric_names   shared leaves
//! ```
//!
//! The routing table is the foundation: every protocol front end (SMTP, HTTPS) only asks
//! the router for a snapshot and calls `lookup*` on it; a protocol module never imports
//! another protocol's.

pub mod admin;
pub mod app;
pub mod config;
pub mod control;
pub mod date;
pub mod demo;
pub mod diagnostics;
pub mod https;
pub mod metric_names;
pub mod net;
pub mod route;
pub mod smtp;
pub mod traffic;
pub mod upstream;
