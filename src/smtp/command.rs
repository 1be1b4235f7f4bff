//! SMTP command lines coexist writes to backends: MAIL FROM and RCPT TO rebuilt with the
//! parameters each server supports, and xtext for every value that goes into a command.
//! Shared by the session (live transactions) and the spool (retries), so both speak the
//! same dialect.

use std::fmt::Write as _;

use smtp_proto::{
    MAIL_BODY_8BITMIME, MAIL_RET_FULL, MAIL_RET_HDRS, MAIL_SMTPUTF8, MailFrom, RCPT_NOTIFY_DELAY,
    RCPT_NOTIFY_FAILURE, RCPT_NOTIFY_NEVER, RCPT_NOTIFY_SUCCESS, RcptTo,
};

use super::reply::Reply;

/// What a backend server said it supports in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caps {
    pub size: Option<u64>,
    pub pipelining: bool,
    pub eightbitmime: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub chunking: bool,
    pub starttls: bool,
    pub enhanced: bool,
    pub auth: Vec<String>,
    /// The XCLIENT attributes the server accepts (upper case), empty without XCLIENT.
    pub xclient: Vec<String>,
}

impl Caps {
    pub fn parse(reply: &Reply) -> Self {
        let mut c = Caps::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(kw) = words.next() else { continue };
            match kw.to_ascii_uppercase().as_str() {
                "SIZE" => c.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "PIPELINING" => c.pipelining = true,
                "8BITMIME" => c.eightbitmime = true,
                "SMTPUTF8" => c.smtputf8 = true,
                "DSN" => c.dsn = true,
                "CHUNKING" => c.chunking = true,
                "STARTTLS" => c.starttls = true,
                "ENHANCEDSTATUSCODES" => c.enhanced = true,
                "AUTH" => c.auth = words.map(str::to_ascii_uppercase).collect(),
                "XCLIENT" => c.xclient = words.map(str::to_ascii_uppercase).collect(),
                _ => {}
            }
        }
        c
    }
}

/// xtext (RFC 3461 §4): so that no value can inject CR/LF or spaces into a command.
pub fn xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (33..=126).contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "+{b:02X}");
        }
    }
    out
}

/// Rebuilds MAIL FROM for a backend with the parameters it supports.
pub fn mail_line(from: &MailFrom<String>, caps: &Caps) -> Result<String, Reply> {
    let mut line = format!("MAIL FROM:<{}>", from.address);
    if from.flags & MAIL_SMTPUTF8 != 0 {
        if !caps.smtputf8 {
            return Err(Reply::new(
                555,
                "5.6.7 SMTPUTF8 is not supported by the destination",
            ));
        }
        line.push_str(" SMTPUTF8");
    }
    if from.flags & MAIL_BODY_8BITMIME != 0 && caps.eightbitmime {
        line.push_str(" BODY=8BITMIME");
    }
    if from.size > 0 && caps.size.is_some() {
        let _ = write!(line, " SIZE={}", from.size);
    }
    if caps.dsn {
        if from.flags & MAIL_RET_FULL != 0 {
            line.push_str(" RET=FULL");
        } else if from.flags & MAIL_RET_HDRS != 0 {
            line.push_str(" RET=HDRS");
        }
        if let Some(id) = &from.env_id {
            let _ = write!(line, " ENVID={}", xtext(id));
        }
    }
    line.push_str("\r\n");
    Ok(line)
}

/// Rebuilds RCPT TO for a backend, with the DSN parameters when it supports DSN.
pub fn rcpt_line(to: &RcptTo<String>, dsn: bool) -> String {
    let mut line = format!("RCPT TO:<{}>", to.address);
    if dsn {
        let mut notify = Vec::new();
        if to.flags & RCPT_NOTIFY_NEVER != 0 {
            notify.push("NEVER");
        }
        if to.flags & RCPT_NOTIFY_SUCCESS != 0 {
            notify.push("SUCCESS");
        }
        if to.flags & RCPT_NOTIFY_FAILURE != 0 {
            notify.push("FAILURE");
        }
        if to.flags & RCPT_NOTIFY_DELAY != 0 {
            notify.push("DELAY");
        }
        if !notify.is_empty() {
            let _ = write!(line, " NOTIFY={}", notify.join(","));
        }
        if let Some(o) = &to.orcpt {
            let _ = write!(line, " ORCPT=rfc822;{}", xtext(o));
        }
    }
    line.push_str("\r\n");
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xtext_escapes_everything_risky() {
        assert_eq!(xtext("a b+c=\r\n"), "a+20b+2Bc+3D+0D+0A");
        assert_eq!(xtext("QQ314159"), "QQ314159");
    }

    #[test]
    fn ehlo_keywords() {
        let r = Reply {
            code: 250,
            lines: vec![
                "mx.example Hello".into(),
                "SIZE 10240000".into(),
                "PIPELINING".into(),
                "8BITMIME".into(),
                "auth PLAIN login".into(),
                "STARTTLS".into(),
            ],
        };
        let c = Caps::parse(&r);
        assert_eq!(c.size, Some(10_240_000));
        assert!(c.pipelining && c.eightbitmime && c.starttls);
        assert!(!c.smtputf8 && !c.chunking);
        assert_eq!(c.auth, ["PLAIN", "LOGIN"]);
    }
}
