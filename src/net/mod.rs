//! What every protocol needs below it, and none owns: listeners with their connection
//! limits and implicit TLS, TLS configs, the shutdown signal, name resolution and the
//! PROXY v2 header towards backends. Imports nothing of coexist's above it.

pub mod listener;
pub mod proxy_protocol;
pub mod resolve;
pub mod shutdown;
pub mod tls;

pub use listener::{Accepted, ConnLimits, Handler, ListenOptions, Stream};
pub use shutdown::Shutdown;
