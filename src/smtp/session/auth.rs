//! Submission AUTH: PLAIN, LOGIN and XOAUTH2 are decoded for the login (which routes the
//! session) and replayed to the login's own server over TLS.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN, AUTH_XOAUTH2};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{MAX_AUTH_LINE, Session, SessionError};
use crate::config::ListenerMode;
use crate::smtp::backend::{BackendConn, BackendError, Target};
use crate::smtp::io::Line;
use crate::smtp::reply::{Reply, codes};

/// The authenticated login of a submission session and its backend connection.
pub(super) struct Auth {
    pub(super) login: String,
    pub(super) target: Arc<Target>,
    pub(super) conn: Option<BackendConn>,
}

/// The client's credentials, as its mechanism carries them, to replay to its server.
enum AuthReplay {
    Plain(String),
    Login(String, String),
    XOauth2(String),
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// The client's response: the initial one if it gave it with AUTH, else what it answers
    /// to a `334 prompt`. `None` (already answered) when the client cancels with `*`.
    async fn auth_response(
        &mut self,
        initial: String,
        prompt: &str,
    ) -> Result<Option<String>, SessionError> {
        if !initial.is_empty() {
            return Ok(Some(initial));
        }
        self.reply(&Reply::new(334, prompt));
        let r = self.read_auth_line().await?;
        if r.is_none() {
            self.reply(&codes::auth_cancelled());
        }
        Ok(r)
    }

    async fn read_auth_line(&mut self) -> Result<Option<String>, SessionError> {
        self.flush().await?;
        match self
            .io
            .read_line(MAX_AUTH_LINE, self.ctx.limits.command_timeout)
            .await?
        {
            Line::Ok(l) => {
                let s = String::from_utf8_lossy(&l[..l.len() - 2])
                    .trim()
                    .to_string();
                Ok(if s == "*" { None } else { Some(s) })
            }
            _ => Ok(None),
        }
    }

    pub(super) async fn auth(
        &mut self,
        mechanism: u64,
        initial: String,
    ) -> Result<(), SessionError> {
        if self.ctx.mode == ListenerMode::Relay {
            self.reply(&codes::not_implemented());
            return Ok(());
        }
        if !self.tls() {
            self.reply(&codes::tls_required());
            return Ok(());
        }
        if self.auth.is_some() {
            self.reply(&codes::already_authenticated());
            return Ok(());
        }
        if self.txn.is_some() || self.helo.is_none() {
            self.reply(&codes::bad_sequence("AUTH goes after EHLO and before MAIL"));
            return Ok(());
        }
        // Collect the client's credentials as the mechanism defines, to replay them.
        let (login, replay): (String, AuthReplay) = match mechanism {
            AUTH_PLAIN => {
                let Some(resp) = self.auth_response(initial, "").await? else {
                    return Ok(());
                };
                let Some(user) = decode_plain(&resp) else {
                    self.reply(&Reply::new(501, "5.5.2 Cannot decode response"));
                    return Ok(());
                };
                (user, AuthReplay::Plain(resp))
            }
            AUTH_LOGIN => {
                // "Username:" and "Password:", base64 as RFC 4954 shows them.
                let Some(user_b64) = self.auth_response(initial, "VXNlcm5hbWU6").await? else {
                    return Ok(());
                };
                let Some(pass_b64) = self.auth_response(String::new(), "UGFzc3dvcmQ6").await?
                else {
                    return Ok(());
                };
                let Some(user) = B64
                    .decode(user_b64.as_bytes())
                    .ok()
                    .and_then(|u| String::from_utf8(u).ok())
                else {
                    self.reply(&Reply::new(501, "5.5.2 Cannot decode response"));
                    return Ok(());
                };
                (user, AuthReplay::Login(user_b64, pass_b64))
            }
            AUTH_XOAUTH2 => {
                let Some(user) = decode_xoauth2(&initial) else {
                    self.reply(&Reply::new(501, "5.5.2 Cannot decode response"));
                    return Ok(());
                };
                (user, AuthReplay::XOauth2(initial))
            }
            _ => {
                self.reply(&codes::auth_mechanism());
                return Ok(());
            }
        };
        let table = self.ctx.router.snapshot();
        let owner = table
            .lookup_login(&login)
            .map(|m| m.owner())
            .or_else(|| table.lookup(&login).target());
        let Some(target) = owner.and_then(|id| self.ctx.backends.target_of(&table, id).cloned())
        else {
            tracing::info!(peer = %self.peer, login = %login, "AUTH for a login no target owns");
            self.reply(&codes::auth_failed());
            return Ok(());
        };
        let client = Some((self.peer, self.local));
        let mut conn = match self.ctx.backends.connect_for(&target, client).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(target = %target.name, error = %e, "AUTH: target unreachable");
                self.reply(&codes::target_unavailable());
                return Ok(());
            }
        };
        if !conn.is_tls() {
            // Credentials never cross to a backend in plaintext.
            conn.quit().await;
            self.reply(&Reply::new(
                454,
                "4.7.0 TLS to the mailbox server not available",
            ));
            return Ok(());
        }
        let reply = match replay_auth(&mut conn, &replay).await {
            Ok(r) => r,
            Err(_) => codes::target_unavailable(),
        };
        tracing::info!(peer = %self.peer, login = %login, target = %target.name, reply = %reply, "AUTH");
        if reply.code == 235 {
            self.auth = Some(Auth {
                login,
                target,
                conn: Some(conn),
            });
        } else {
            conn.quit().await;
        }
        self.reply(&reply);
        Ok(())
    }

    /// The login of an authenticated submission session.
    pub fn login(&self) -> Option<&str> {
        self.auth.as_ref().map(|a| a.login.as_str())
    }
}

async fn replay_auth(conn: &mut BackendConn, how: &AuthReplay) -> Result<Reply, BackendError> {
    match how {
        AuthReplay::Plain(resp) => conn.command(&format!("AUTH PLAIN {resp}\r\n")).await,
        AuthReplay::Login(user, pass) => {
            let r = conn.command("AUTH LOGIN\r\n").await?;
            if r.code != 334 {
                return Ok(r);
            }
            let r = conn.command(&format!("{user}\r\n")).await?;
            if r.code != 334 {
                return Ok(r);
            }
            conn.command(&format!("{pass}\r\n")).await
        }
        AuthReplay::XOauth2(resp) => {
            let r = conn.command(&format!("AUTH XOAUTH2 {resp}\r\n")).await?;
            if r.code == 334 {
                // The server's error details; the client side of XOAUTH2 answers empty.
                return conn.command("\r\n").await;
            }
            Ok(r)
        }
    }
}

fn decode_plain(b64: &str) -> Option<String> {
    let raw = B64.decode(b64.trim().as_bytes()).ok()?;
    let mut parts = raw.split(|&b| b == 0);
    let _authzid = parts.next()?;
    let authcid = parts.next()?;
    parts.next()?;
    let user = String::from_utf8(authcid.to_vec()).ok()?;
    (!user.is_empty()).then_some(user)
}

fn decode_xoauth2(b64: &str) -> Option<String> {
    let raw = B64.decode(b64.trim().as_bytes()).ok()?;
    let text = String::from_utf8(raw).ok()?;
    text.split('\x01')
        .find_map(|kv| kv.strip_prefix("user="))
        .filter(|u| !u.is_empty())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_decoding() {
        assert_eq!(
            decode_plain(&B64.encode(b"\0alice\0secret")),
            Some("alice".into())
        );
        assert_eq!(decode_plain(&B64.encode(b"alice")), None);
        let x = B64.encode(b"user=bob@example.com\x01auth=Bearer tok\x01\x01");
        assert_eq!(decode_xoauth2(&x), Some("bob@example.com".into()));
    }
}
