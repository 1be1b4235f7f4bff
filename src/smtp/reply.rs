//! SMTP replies: the ones coexist makes itself, in one place, and the ones it relays from
//! a backend.

use std::fmt;

/// One SMTP reply, possibly multi-line. `text` lines carry no code and no CRLF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn new(code: u16, text: impl Into<String>) -> Self {
        Self {
            code,
            lines: vec![text.into()],
        }
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// Appends the wire form to `out`. Control characters in relayed text are replaced so
    /// a backend cannot inject reply lines towards the client.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let n = self.lines.len().max(1);
        for i in 0..n {
            let text = self.lines.get(i).map_or("", String::as_str);
            let sep = if i + 1 == n { ' ' } else { '-' };
            // Codes are 200..=599 (checked where replies are parsed or made): three digits.
            let c = self.code.min(999);
            out.extend_from_slice(&[
                b'0' + (c / 100) as u8,
                b'0' + (c / 10 % 10) as u8,
                b'0' + (c % 10) as u8,
                sep as u8,
            ]);
            let start = out.len();
            out.extend_from_slice(text.as_bytes());
            for b in &mut out[start..] {
                if b.is_ascii_control() {
                    *b = b' ';
                }
            }
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The first line's enhanced status code (`x.y.z`), if it has one.
    pub fn enhanced(&self) -> Option<&str> {
        let first = self.lines.first()?;
        let esc = first.split(' ').next()?;
        // Counted, not collected: this runs for every recipient's log line.
        let mut n = 0;
        let ok = esc.split('.').all(|p| {
            n += 1;
            !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())
        });
        (ok && n == 3).then_some(esc)
    }

    /// The code and enhanced code (`550 5.7.1`) for log lines, formatted only when the
    /// line is written.
    pub fn short(&self) -> ReplyCode<'_> {
        ReplyCode(self)
    }
}

/// See [`Reply::short`].
pub struct ReplyCode<'a>(&'a Reply);

impl fmt::Display for ReplyCode<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.enhanced() {
            Some(e) => write!(f, "{} {e}", self.0.code),
            None => write!(f, "{}", self.0.code),
        }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.lines.join(" / "))
    }
}

/// What a client over the connection caps reads before the listener closes its connection
/// (written by the protocol-neutral listener, so kept as bytes).
pub const TOO_MANY_CONNECTIONS: &[u8] = b"421 4.7.0 Too many connections, try again later\r\n";

/// Replies coexist gives itself. Codes per RFC 5321 §4.2, enhanced codes per RFC 3463.
pub mod codes {
    /// A recipient given twice in one transaction, answered without a second offer.
    pub fn duplicate_recipient() -> Reply {
        Reply::new(
            250,
            "2.1.5 Recipient ok (already a recipient of this message)",
        )
    }

    use super::Reply;

    pub fn ok(text: &str) -> Reply {
        Reply::new(250, format!("2.0.0 {text}"))
    }
    pub fn sender_ok() -> Reply {
        Reply::new(250, "2.1.0 Sender OK")
    }
    pub fn reset() -> Reply {
        Reply::new(250, "2.0.0 Reset")
    }
    pub fn noop() -> Reply {
        Reply::new(250, "2.0.0 OK")
    }
    pub fn bye(host: &str) -> Reply {
        Reply::new(221, format!("2.0.0 {host} closing connection"))
    }
    pub fn start_data() -> Reply {
        Reply::new(354, "Start mail input; end with <CRLF>.<CRLF>")
    }
    pub fn ready_tls() -> Reply {
        Reply::new(220, "2.0.0 Ready to start TLS")
    }
    pub fn vrfy() -> Reply {
        Reply::new(
            252,
            "2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
        )
    }
    pub fn relay_denied() -> Reply {
        Reply::new(550, "5.7.1 Relaying denied")
    }
    pub fn no_such_user() -> Reply {
        Reply::new(550, "5.1.1 No such user here")
    }
    pub fn target_unavailable() -> Reply {
        Reply::new(
            451,
            "4.4.1 Destination temporarily unavailable, try again later",
        )
    }
    pub fn deferred_other_target() -> Reply {
        Reply::new(
            452,
            "4.5.3 Recipient on another system, send it in a new transaction",
        )
    }
    pub fn too_many_recipients() -> Reply {
        Reply::new(452, "4.5.3 Too many recipients")
    }
    pub fn no_valid_recipients() -> Reply {
        Reply::new(554, "5.5.1 No valid recipients")
    }
    pub fn bad_sequence(what: &str) -> Reply {
        Reply::new(503, format!("5.5.1 Bad sequence of commands: {what}"))
    }
    pub fn syntax(what: &str) -> Reply {
        Reply::new(501, format!("5.5.4 Syntax error: {what}"))
    }
    pub fn unknown_command() -> Reply {
        Reply::new(500, "5.5.1 Command unrecognized")
    }
    pub fn not_implemented() -> Reply {
        Reply::new(502, "5.5.1 Command not implemented")
    }
    pub fn line_too_long() -> Reply {
        Reply::new(500, "5.5.2 Line too long")
    }
    pub fn bare_newline_command() -> Reply {
        Reply::new(500, "5.5.2 Command line must end with <CRLF>")
    }
    pub fn bare_newline_data() -> Reply {
        Reply::new(
            554,
            "5.6.0 Message contains a bare <CR> or <LF>; rejected to prevent SMTP smuggling",
        )
    }
    pub fn message_too_big() -> Reply {
        Reply::new(552, "5.3.4 Message size exceeds fixed maximum message size")
    }
    pub fn text_line_too_long() -> Reply {
        Reply::new(554, "5.6.0 Message contains a line longer than allowed")
    }
    pub fn loop_detected() -> Reply {
        Reply::new(
            554,
            "5.4.6 Routing loop detected: too many Received headers",
        )
    }
    pub fn tls_required() -> Reply {
        Reply::new(530, "5.7.0 Must issue a STARTTLS command first")
    }
    pub fn auth_required() -> Reply {
        Reply::new(530, "5.7.0 Authentication required")
    }
    pub fn already_authenticated() -> Reply {
        Reply::new(503, "5.5.1 Already authenticated")
    }
    pub fn auth_mechanism() -> Reply {
        Reply::new(504, "5.5.4 Unrecognized authentication type")
    }
    pub fn auth_failed() -> Reply {
        Reply::new(535, "5.7.8 Authentication credentials invalid")
    }
    pub fn auth_cancelled() -> Reply {
        Reply::new(501, "5.0.0 Authentication cancelled")
    }
    pub fn timeout() -> Reply {
        Reply::new(421, "4.4.2 Timeout, closing connection")
    }
    pub fn shutting_down(host: &str) -> Reply {
        Reply::new(421, format!("4.3.2 {host} shutting down, try again later"))
    }
    /// The same words as [`TOO_MANY_CONNECTIONS`], for tests.
    pub fn too_many_connections() -> Reply {
        Reply::new(421, "4.7.0 Too many connections, try again later")
    }
    pub fn talk_before_greeting() -> Reply {
        Reply::new(554, "5.5.0 Talking before the greeting is not allowed")
    }
    pub fn partial_duplicate_risk() -> Reply {
        Reply::new(
            451,
            "4.4.0 Message was not accepted by every destination, try again later",
        )
    }
    pub fn local_error() -> Reply {
        Reply::new(451, "4.3.0 Local error in processing")
    }
    pub fn tls_unavailable() -> Reply {
        Reply::new(454, "4.7.0 TLS not available")
    }
    pub fn bdat_no_data() -> Reply {
        Reply::new(503, "5.5.1 Use BDAT or DATA, not both, in one transaction")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_bytes_are_the_421() {
        let mut out = Vec::new();
        codes::too_many_connections().write_to(&mut out);
        assert_eq!(out, TOO_MANY_CONNECTIONS);
    }

    #[test]
    fn multiline_and_sanitised() {
        let r = Reply {
            code: 250,
            lines: vec!["a".into(), "b\r\n250 injected".into()],
        };
        let mut out = Vec::new();
        r.write_to(&mut out);
        assert_eq!(out, b"250-a\r\n250 b  250 injected\r\n");
        assert_eq!(codes::relay_denied().enhanced(), Some("5.7.1"));
        assert_eq!(Reply::new(250, "OK").enhanced(), None);
    }
}
