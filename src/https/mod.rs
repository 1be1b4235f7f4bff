//! The HTTPS proxy's parts that need no socket (SPEC §5.2): coexist's own signed routing
//! cookie ([`cookie`]), header hygiene when forwarding HTTP/1.1 ([`headers`]), the request
//! shapes refused before routing ([`harden`]), and the choice of a target's server by
//! mailbox ([`affinity`]). The HTTPS listener that will put them together is not built yet.
//! Like `smtp`, this module sits above `route`, `config`, `net`, `upstream` and `traffic`
//! and never imports another protocol.

pub mod affinity;
pub mod cookie;
pub mod harden;
pub mod headers;
