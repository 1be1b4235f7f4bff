//! The HTTPS proxy: Outlook, phones and browsers reach the side that owns their mailbox.
//! `server` serves client connections (hyper HTTP/1.1 over the net listener's TLS) and routes
//! each request; `forward` keeps the backend connections and streams bodies both ways.

pub mod forward;
pub mod server;
