//! The HTTPS proxy: Outlook, phones and browsers reach the side that owns their mailbox.
//!
//! `server` serves client connections (hyper HTTP/1.1 over the net listener's TLS): each
//! request is checked ([`harden`]), routed, its headers made fit for the backend
//! ([`headers`]) and sent by [`forward`] to the server [`affinity`] picks for its mailbox,
//! bodies streaming both ways. [`cookie`] is coexist's signed routing cookie (SPEC §5.2).
//! Like `smtp`, this module sits above `route`, `config`, `net`, `upstream` and `traffic`
//! and never imports another protocol.

pub mod affinity;
pub mod cookie;
pub mod forward;
pub mod harden;
pub mod headers;
pub mod identity;
pub mod server;
