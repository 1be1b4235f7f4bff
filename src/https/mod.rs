//! The HTTPS proxy's parts that need no socket (SPEC §5.2): coexist's own signed routing
//! cookie ([`cookie`]), header hygiene when forwarding HTTP/1.1 ([`headers`]) and the
//! request shapes refused before routing ([`harden`]). The HTTPS listener that will put them
//! together is not built yet. Like `smtp`, this module sits above `route`, `config`, `net`,
//! `upstream` and `traffic` and never imports another protocol.

pub mod cookie;
pub mod harden;
pub mod headers;
