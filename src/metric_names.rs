//! Every metric coexist exports, by name, with its help text: one place, so that `/metrics`
//! has `# HELP` for each family and a new metric cannot be added without one (the call
//! sites use these constants, and `describe` covers all of them).
//!
//! Label values are small closed sets (target and site names from the config and the
//! table, result words below), never text from a client.

use metrics::Unit;

pub const SMTP_SESSIONS: &str = "coexist_smtp_sessions_total";
pub const SMTP_RECIPIENTS: &str = "coexist_smtp_recipients_total";
pub const SMTP_MESSAGES: &str = "coexist_smtp_messages_total";
pub const SMTP_FINAL_REPLY_SECONDS: &str = "coexist_smtp_final_reply_seconds";
pub const SMTP_PARTIAL_DUPLICATE_RISK: &str = "coexist_smtp_partial_duplicate_risk_total";
pub const SMTP_SPOOLED: &str = "coexist_smtp_spooled_total";
pub const SMTP_EARLY_DATA: &str = "coexist_smtp_early_data_total";
pub const SPOOL_MESSAGES: &str = "coexist_spool_messages";
pub const SPOOL_RECIPIENTS: &str = "coexist_spool_recipients_total";
pub const ROUTE_SWAPS: &str = "coexist_route_swaps_total";
pub const ROUTE_TABLE_MAILBOXES: &str = "coexist_route_table_mailboxes";
pub const BACKEND_UP: &str = "coexist_backend_up";
pub const HTTP_REQUESTS: &str = "coexist_http_requests_total";
pub const HTTP_REQUEST_SECONDS: &str = "coexist_http_request_seconds";
/// Not kept in the recorder: rendered by `/metrics` from the active table, because the
/// recorder keeps every label set it ever saw and this one must show one version only.
pub const ROUTE_TABLE_VERSION_INFO: &str = "coexist_route_table_version_info";
pub const ROUTE_TABLE_VERSION_INFO_HELP: &str =
    "The active routing table version (label version); always 1, one series.";

/// Histogram buckets for latencies, in seconds: a backend's final reply to a message takes
/// milliseconds on a LAN and up to RFC 5321's 10 minutes for a slow content filter.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Registers the help text (and unit) of every metric with the installed recorder.
pub fn describe() {
    metrics::describe_counter!(SMTP_SESSIONS, "SMTP client sessions accepted.");
    metrics::describe_counter!(
        SMTP_RECIPIENTS,
        "Recipients (RCPT) by target, site and result: accepted, tempfail, rejected, \
         deferred, unknown, relay_denied."
    );
    metrics::describe_counter!(
        SMTP_MESSAGES,
        "Messages by target and result: accepted, tempfail, rejected, refused (content \
         refused by coexist)."
    );
    metrics::describe_histogram!(
        SMTP_FINAL_REPLY_SECONDS,
        Unit::Seconds,
        "Time from the end of a message's data to the target's final reply, by target."
    );
    metrics::describe_counter!(
        SMTP_PARTIAL_DUPLICATE_RISK,
        "Messages answered 451 after some targets accepted them because the spool could \
         not write (the client's retry duplicates them there)."
    );
    metrics::describe_counter!(
        SMTP_SPOOLED,
        "Messages whose recipients on some target were spooled for a later retry."
    );
    metrics::describe_counter!(
        SMTP_EARLY_DATA,
        "Early DATA (DATA pipelined behind MAIL and RCPT) by outcome: used, split, dropped."
    );
    metrics::describe_gauge!(SPOOL_MESSAGES, "Messages waiting in the spool.");
    metrics::describe_counter!(
        SPOOL_RECIPIENTS,
        "Spooled recipients by outcome: delivered, failed, expired."
    );
    metrics::describe_counter!(
        ROUTE_SWAPS,
        "Routing table changes by result: ok (swapped in), rejected (the active one kept)."
    );
    metrics::describe_gauge!(
        ROUTE_TABLE_MAILBOXES,
        "Mailboxes in the active routing table."
    );
    metrics::describe_gauge!(
        BACKEND_UP,
        "Backend server health (SMTP and HTTPS) by target and server: 1 up, 0 down."
    );
    metrics::describe_counter!(
        HTTP_REQUESTS,
        "HTTPS requests by target, Exchange protocol (owa, ews, activesync, mapi, rpc, \
         autodiscover, autodiscover_v2, oab, ecp, powershell, other), identity source (hint, cookie, login, \
         learned, default, refused) and status code."
    );
    metrics::describe_histogram!(
        HTTP_REQUEST_SECONDS,
        Unit::Seconds,
        "Time from a request's head to the backend's response head, by target and protocol."
    );
}
