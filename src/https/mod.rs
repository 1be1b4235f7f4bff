//! The HTTPS proxy for Exchange clients (SPEC §5). So far: `identity`, which finds the
//! mailbox a request belongs to (hints, login, resolution against the routing table),
//! pure and tested without sockets; the listener and forwarding come next.

pub mod identity;
