//! The durable spool: the part of a split delivery that a target did not take yet.
//!
//! When a message goes to several targets and some accept it while others fail temporarily,
//! the client must get one answer. Answering 4xx would make the client send it again, and
//! the targets that accepted would get it twice; answering 250 is only honest if the rest
//! is safe on disk. So the session writes the message content to a spool file while it
//! streams it (only for messages with more than one target), and on such a partial
//! failure it commits an entry — envelope and content, fsync'd, renamed into `queue/`,
//! directory fsync'd — before it answers 250. A retry worker then delivers each spooled
//! recipient to its owner *at retry time* (the table may have changed), with backoff and
//! jitter, until it is accepted, refused for good, or expires.
//!
//! Layout: `tmp/` (content being written; anything left there after a crash was never
//! acknowledged and is removed on start), `queue/ID.eml` (dot-stuffed content, as DATA
//! sends it) and `queue/ID.json` (the entry). The JSON is written last: an `.eml` without its
//! `.json` is an interrupted commit and is removed on start.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use smtp_proto::{MailFrom, RcptTo};
use tokio::sync::watch;

use super::backend::{Backends, Target};
use super::command::{mail_line, rcpt_line};
use crate::config::SpoolSettings;
use crate::date::rfc5322_date;
use crate::net::Shutdown;
use crate::route::Router;

/// A spooled recipient, as its RCPT carried it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SpooledRcpt {
    pub address: String,
    #[serde(default)]
    pub notify: u64,
    #[serde(default)]
    pub orcpt: Option<String>,
}

/// One spooled message and the recipients still to deliver.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub id: String,
    pub from: String,
    pub mail_flags: u64,
    pub size: usize,
    #[serde(default)]
    pub env_id: Option<String>,
    pub rcpts: Vec<SpooledRcpt>,
    /// Unix seconds.
    pub created: u64,
    pub attempts: u32,
    pub next_attempt: u64,
    #[serde(default)]
    pub last_error: String,
}

impl Entry {
    pub fn mail_from(&self) -> MailFrom<String> {
        MailFrom {
            address: self.from.clone(),
            flags: self.mail_flags,
            size: self.size,
            env_id: self.env_id.clone(),
            ..MailFrom::default()
        }
    }
}

impl From<&RcptTo<String>> for SpooledRcpt {
    fn from(r: &RcptTo<String>) -> Self {
        Self {
            address: r.address.clone(),
            notify: r.flags,
            orcpt: r.orcpt.clone(),
        }
    }
}

impl SpooledRcpt {
    pub fn rcpt_to(&self) -> RcptTo<String> {
        RcptTo {
            address: self.address.clone(),
            flags: self.notify,
            orcpt: self.orcpt.clone(),
            ..RcptTo::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no spooled message {0}")]
    NotFound(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn fsync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Content being written while a message streams; removed on drop unless committed.
pub struct SpoolWriter {
    id: String,
    path: PathBuf,
    file: Option<std::fs::File>,
    failed: bool,
}

impl SpoolWriter {
    /// Appends content; an I/O error marks the writer failed (the message then falls back
    /// to the no-spool answer) instead of failing the delivery.
    pub fn write(&mut self, bytes: &[u8]) {
        if let Some(f) = self.file.as_mut()
            && f.write_all(bytes).is_err()
        {
            self.failed = true;
        }
    }
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

pub struct Spool {
    settings: SpoolSettings,
    counter: AtomicU64,
    /// Serialises every change to an entry file: the retry worker and the admin API (retry,
    /// delete) both rewrite entries, and a lost update could deliver a recipient twice.
    entries: std::sync::Mutex<()>,
    /// Messages in the queue, for the gauge (not re-counted from disk on every change).
    queued: AtomicU64,
    /// Wakes the retry worker early (a new entry, or `queue retry`).
    kick: watch::Sender<()>,
}

impl Spool {
    /// Opens (creating) the spool and cleans up what a crash left unacknowledged.
    pub fn open(settings: SpoolSettings) -> Result<Arc<Spool>, SpoolError> {
        for d in ["tmp", "queue"] {
            let p = settings.dir.join(d);
            std::fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        let tmp = settings.dir.join("tmp");
        for e in std::fs::read_dir(&tmp).map_err(io_err(&tmp))?.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        let queue = settings.dir.join("queue");
        for e in std::fs::read_dir(&queue).map_err(io_err(&queue))?.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "eml") && !p.with_extension("json").exists() {
                tracing::warn!(file = %p.display(), "removing content of an interrupted spool commit");
                let _ = std::fs::remove_file(&p);
            }
        }
        let (kick, _) = watch::channel(());
        let s = Arc::new(Spool {
            settings,
            counter: AtomicU64::new(0),
            entries: std::sync::Mutex::new(()),
            queued: AtomicU64::new(0),
            kick,
        });
        s.queued.store(s.list().len() as u64, Ordering::Relaxed);
        s.publish_gauge();
        Ok(s)
    }

    fn publish_gauge(&self) {
        metrics::gauge!(crate::metric_names::SPOOL_MESSAGES)
            .set(self.queued.load(Ordering::Relaxed) as f64);
    }

    fn lock_entries(&self) -> std::sync::MutexGuard<'_, ()> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn queue_dir(&self) -> PathBuf {
        self.settings.dir.join("queue")
    }

    fn new_id(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("{nanos:x}-{}-{n}", std::process::id())
    }

    /// Starts the content file of a message that may need spooling.
    pub fn writer(&self) -> Option<SpoolWriter> {
        let id = self.new_id();
        let path = self.settings.dir.join("tmp").join(format!("{id}.eml"));
        match std::fs::File::create(&path) {
            Ok(f) => Some(SpoolWriter {
                id,
                path,
                file: Some(f),
                failed: false,
            }),
            Err(e) => {
                tracing::error!(error = %e, "cannot create a spool file; split deliveries will be answered 451");
                None
            }
        }
    }

    /// Makes the message durable for `rcpts`. Only after this returns Ok may the client be
    /// told 250 for them.
    pub fn commit(
        &self,
        mut w: SpoolWriter,
        from: &MailFrom<String>,
        rcpts: Vec<SpooledRcpt>,
        error: &str,
    ) -> Result<String, SpoolError> {
        let Some(file) = w.file.take() else {
            return Err(SpoolError::NotFound(w.id.clone()));
        };
        if w.failed {
            let _ = std::fs::remove_file(&w.path);
            return Err(SpoolError::Io {
                path: w.path.clone(),
                source: std::io::Error::other("writing the content failed"),
            });
        }
        let done = (|| {
            file.sync_all().map_err(io_err(&w.path))?;
            drop(file);
            let eml = self.queue_dir().join(format!("{}.eml", w.id));
            std::fs::rename(&w.path, &eml).map_err(io_err(&eml))?;
            let entry = Entry {
                id: w.id.clone(),
                from: from.address.clone(),
                mail_flags: from.flags,
                size: from.size,
                env_id: from.env_id.clone(),
                rcpts,
                created: now(),
                attempts: 0,
                next_attempt: now() + self.settings.retry_initial.as_secs().min(60),
                last_error: error.to_string(),
            };
            self.write_entry(&entry)?;
            fsync_dir(&self.queue_dir());
            Ok(w.id.clone())
        })();
        if done.is_err() {
            let _ = std::fs::remove_file(&w.path);
        } else {
            self.queued.fetch_add(1, Ordering::Relaxed);
            self.publish_gauge();
        }
        let _ = self.kick.send(());
        done
    }

    /// A split delivery's failed rest: recipients refused temporarily are spooled, and
    /// those refused for good are reported to the sender with a DSN (itself spooled). Both
    /// are on disk when this returns Ok, so the client may be told 250. Returns the id of
    /// the spooled message, if any recipient was spooled.
    pub fn commit_split(
        &self,
        w: SpoolWriter,
        from: &MailFrom<String>,
        later: Vec<SpooledRcpt>,
        refused: &[(SpooledRcpt, String)],
        error: &str,
    ) -> Result<Option<String>, SpoolError> {
        // The content is needed for the DSN's header part; read it before the commit moves it.
        let content = if refused.is_empty() {
            Vec::new()
        } else {
            std::fs::read(&w.path).map_err(io_err(&w.path))?
        };
        let msg_id = w.id.clone();
        let id = if later.is_empty() {
            None
        } else {
            Some(self.commit(w, from, later, error)?)
        };
        if !refused.is_empty() {
            let entry = Entry {
                id: msg_id,
                from: from.address.clone(),
                mail_flags: from.flags,
                size: from.size,
                env_id: from.env_id.clone(),
                rcpts: Vec::new(),
                created: now(),
                attempts: 0,
                next_attempt: 0,
                last_error: String::new(),
            };
            if let Err(e) = self.bounce_now(&entry, refused, &content) {
                // Without anything spooled the client may still be told to retry; once part
                // of the message is spooled it must not be (that part would be duplicated),
                // so the lost DSN is only logged.
                tracing::error!(error = %e, "cannot queue the DSN of a split delivery");
                if id.is_none() {
                    return Err(e);
                }
            }
        }
        Ok(id)
    }

    fn write_entry(&self, e: &Entry) -> Result<(), SpoolError> {
        let path = self.queue_dir().join(format!("{}.json", e.id));
        let tmp = self.settings.dir.join("tmp").join(format!(
            "{}.json.{}",
            e.id,
            self.counter.fetch_add(1, Ordering::Relaxed)
        ));
        let json = serde_json::to_vec_pretty(e).map_err(|x| SpoolError::Io {
            path: path.clone(),
            source: std::io::Error::other(x),
        })?;
        let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&json).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        fsync_dir(&self.queue_dir());
        Ok(())
    }

    /// Every spooled message, oldest first.
    pub fn list(&self) -> Vec<Entry> {
        let Ok(dir) = std::fs::read_dir(self.queue_dir()) else {
            return Vec::new();
        };
        let mut v: Vec<Entry> = dir
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect();
        v.sort_by_key(|e| (e.created, e.id.clone()));
        v
    }

    pub fn get(&self, id: &str) -> Result<Entry, SpoolError> {
        self.list()
            .into_iter()
            .find(|e| e.id == id)
            .ok_or_else(|| SpoolError::NotFound(id.to_string()))
    }

    /// Removes a message from the spool (an operator's decision; it is not delivered).
    pub fn delete(&self, id: &str) -> Result<(), SpoolError> {
        let _g = self.lock_entries();
        self.delete_locked(id)
    }

    fn delete_locked(&self, id: &str) -> Result<(), SpoolError> {
        if !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(SpoolError::NotFound(id.to_string()));
        }
        let json = self.queue_dir().join(format!("{id}.json"));
        if !json.exists() {
            return Err(SpoolError::NotFound(id.to_string()));
        }
        std::fs::remove_file(&json).map_err(io_err(&json))?;
        let _ = std::fs::remove_file(self.queue_dir().join(format!("{id}.eml")));
        fsync_dir(&self.queue_dir());
        let _ = self
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        self.publish_gauge();
        Ok(())
    }

    /// Makes a message (or every one) due now.
    pub fn retry_now(&self, id: Option<&str>) -> Result<usize, SpoolError> {
        let _g = self.lock_entries();
        let mut n = 0;
        for mut e in self.list() {
            if id.is_none_or(|i| i == e.id) {
                e.next_attempt = 0;
                self.write_entry(&e)?;
                n += 1;
            }
        }
        if let Some(i) = id
            && n == 0
        {
            return Err(SpoolError::NotFound(i.to_string()));
        }
        let _ = self.kick.send(());
        Ok(n)
    }

    /// Delivers due messages until shutdown.
    pub async fn run(
        self: Arc<Self>,
        router: Arc<Router>,
        backends: Arc<Backends>,
        mut shutdown: Shutdown,
    ) {
        let mut kick = self.kick.subscribe();
        loop {
            // Listing reads and parses every entry: blocking file work, off the runtime.
            let spool = Arc::clone(&self);
            let due = tokio::task::spawn_blocking(move || {
                let t = now();
                spool
                    .list()
                    .into_iter()
                    .filter(|e| e.next_attempt <= t)
                    .collect::<Vec<_>>()
            })
            .await;
            let Some(due) = joined(due) else { return };
            for e in due {
                self.attempt(e, &router, &backends).await;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = kick.changed() => {}
                () = shutdown.signalled() => return,
            }
        }
    }

    /// One delivery attempt: each recipient to its owner in the table of now.
    async fn attempt(self: &Arc<Self>, mut e: Entry, router: &Router, backends: &Backends) {
        let eml = self.queue_dir().join(format!("{}.eml", e.id));
        let content = match tokio::fs::read(&eml).await {
            Ok(c) => c,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                tracing::error!(id = %e.id, "spooled content missing; dropping the entry");
                let spool = Arc::clone(self);
                let _ = joined(tokio::task::spawn_blocking(move || spool.delete(&e.id)).await);
                return;
            }
            Err(err) => {
                // Out of file descriptors, a permission slip: try again later, lose nothing.
                tracing::error!(id = %e.id, error = %err, "cannot read spooled content; will retry");
                return;
            }
        };
        let table = router.snapshot();
        let mut groups: BTreeMap<String, Vec<SpooledRcpt>> = BTreeMap::new();
        let mut unroutable = Vec::new();
        for r in &e.rcpts {
            match table.lookup(&r.address).target() {
                Some(t) => groups
                    .entry(table.target_name(t).to_string())
                    .or_default()
                    .push(r.clone()),
                // A DSN to a sender outside our domains leaves through the DSN target.
                None if e.from.is_empty() && self.settings.dsn_target.is_some() => groups
                    .entry(self.settings.dsn_target.clone().unwrap_or_default())
                    .or_default()
                    .push(r.clone()),
                None => unroutable.push(r.clone()),
            }
        }
        let mut remaining = Vec::new();
        let mut errors = Vec::new();
        let mut bounced: Vec<(SpooledRcpt, String)> = Vec::new();
        for r in unroutable {
            // The table no longer routes it: a permanent failure.
            tracing::error!(id = %e.id, rcpt = %r.address, "spooled recipient no longer routed");
            metrics::counter!(crate::metric_names::SPOOL_RECIPIENTS, "result" => "failed")
                .increment(1);
            bounced.push((
                r,
                "5.1.2 recipient is no longer routed by this proxy".into(),
            ));
        }
        for (target, rcpts) in groups {
            let outcome = match backends.target(&target) {
                Some(t) => deliver(backends, t, &e, &rcpts, &content).await,
                None => Err(format!("no backend for target {target}")),
            };
            match outcome {
                Ok(results) => {
                    for (r, reply) in rcpts.into_iter().zip(results) {
                        match reply {
                            Delivery::Done => {
                                tracing::info!(id = %e.id, rcpt = %r.address, %target, "spooled recipient delivered");
                                metrics::counter!(crate::metric_names::SPOOL_RECIPIENTS, "result" => "delivered").increment(1);
                            }
                            Delivery::Later(why) => {
                                errors.push(why);
                                remaining.push(r);
                            }
                            Delivery::Failed(why) => {
                                tracing::error!(id = %e.id, rcpt = %r.address, %target, reply = %why, "spooled recipient refused for good");
                                metrics::counter!(crate::metric_names::SPOOL_RECIPIENTS, "result" => "failed").increment(1);
                                bounced.push((r, why));
                            }
                        }
                    }
                }
                Err(why) => {
                    errors.push(why);
                    remaining.extend(rcpts);
                }
            }
        }
        e.attempts += 1;
        // Bookkeeping writes and fsyncs entries and DSNs: blocking work, off the runtime.
        let spool = Arc::clone(self);
        let _ = joined(
            tokio::task::spawn_blocking(move || {
                spool.settle(&e, remaining, bounced, &errors, &content);
            })
            .await,
        );
    }

    /// Records what an attempt left: expired recipients and refusals become a DSN, the
    /// rest stays with a new retry time; an entry with no recipient left is deleted.
    fn settle(
        &self,
        e: &Entry,
        mut remaining: Vec<SpooledRcpt>,
        mut bounced: Vec<(SpooledRcpt, String)>,
        errors: &[String],
        content: &[u8],
    ) {
        let expired = !remaining.is_empty()
            && now().saturating_sub(e.created) > self.settings.max_age.as_secs();
        if expired {
            tracing::error!(id = %e.id, rcpts = remaining.len(), "spooled message expired");
            metrics::counter!(crate::metric_names::SPOOL_RECIPIENTS, "result" => "expired")
                .increment(remaining.len() as u64);
            let why = format!(
                "4.4.7 delivery time expired; last error: {}",
                errors.join("; ")
            );
            bounced.extend(remaining.drain(..).map(|r| (r, why.clone())));
        }
        // A DSN that cannot be queued keeps its recipients in the entry: tried again later.
        let mut keep: Vec<SpooledRcpt> = Vec::new();
        if !bounced.is_empty()
            && let Err(err) = self.bounce_now(e, &bounced, content)
        {
            tracing::error!(id = %e.id, error = %err, "cannot queue a DSN; keeping the recipients");
            keep.extend(bounced.iter().map(|(r, _)| r.clone()));
        }
        keep.extend(remaining);
        // Merge with the entry as it is on disk now (the admin API may have changed it).
        let _g = self.lock_entries();
        let Ok(mut cur) = self.get(&e.id) else {
            return; // deleted by an operator meanwhile
        };
        cur.rcpts.retain(|r| keep.contains(r));
        if cur.rcpts.is_empty() {
            let _ = self.delete_locked(&e.id);
            return;
        }
        cur.attempts = e.attempts;
        cur.last_error = errors.join("; ");
        if cur.next_attempt != 0 {
            cur.next_attempt = now() + backoff(&self.settings, e.attempts, &e.id).as_secs();
        }
        if let Err(err) = self.write_entry(&cur) {
            tracing::error!(id = %e.id, error = %err, "cannot update spool entry");
        }
    }
}

impl Spool {
    /// Tells the sender which recipients failed for good (RFC 3464 DSN, multipart/report),
    /// spooled like any message so it is retried too. Never for a null sender: a DSN about
    /// a DSN would loop.
    fn bounce_now(
        &self,
        e: &Entry,
        failed: &[(SpooledRcpt, String)],
        content: &[u8],
    ) -> Result<(), SpoolError> {
        if e.from.is_empty() {
            tracing::warn!(id = %e.id, "a message with the null sender failed for good; no DSN (it would loop)");
            return Ok(());
        }
        let dsn = build_dsn(&self.settings.hostname, e, failed, content);
        let mut w = self.writer().ok_or_else(|| SpoolError::Io {
            path: self.settings.dir.join("tmp"),
            source: std::io::Error::other("cannot create a spool file"),
        })?;
        w.write(&dot_stuff(&dsn));
        let from = MailFrom {
            address: String::new(),
            ..MailFrom::default()
        };
        let to = vec![SpooledRcpt {
            address: e.from.clone(),
            notify: 0,
            orcpt: None,
        }];
        let id = self.commit(w, &from, to, "DSN")?;
        tracing::info!(id = %e.id, dsn = %id, sender = %e.from, "DSN queued for the sender");
        Ok(())
    }
}

/// The DSN (RFC 3464): a human part, the machine-readable delivery status, the original
/// headers. Composed with mail-builder; the original header section is found by mail-parser.
fn build_dsn(host: &str, e: &Entry, failed: &[(SpooledRcpt, String)], content: &[u8]) -> Vec<u8> {
    use std::fmt::Write as _;

    use mail_builder::MessageBuilder;
    use mail_builder::headers::content_type::ContentType;
    use mail_builder::headers::raw::Raw;
    use mail_builder::mime::MimePart;

    let mut text = format!(
        "The mail system at {host} could not deliver your message to the\r\nfollowing recipient(s):\r\n\r\n"
    );
    for (r, why) in failed {
        let _ = write!(text, "  <{}>: {}\r\n", r.address, one_line(why));
    }
    let arrival = rfc5322_date(UNIX_EPOCH + Duration::from_secs(e.created));
    let mut status = format!("Reporting-MTA: dns; {host}\r\nArrival-Date: {arrival}\r\n");
    if let Some(env) = &e.env_id {
        let _ = write!(status, "Original-Envelope-Id: {}\r\n", one_line(env));
    }
    for (r, why) in failed {
        let _ = write!(
            status,
            "\r\nFinal-Recipient: rfc822; {}\r\nAction: failed\r\nStatus: {}\r\nDiagnostic-Code: smtp; {}\r\n",
            r.address,
            status_code(why),
            one_line(why)
        );
        if let Some(o) = &r.orcpt {
            let _ = write!(status, "Original-Recipient: rfc822; {}\r\n", one_line(o));
        }
    }
    // The original header section, from the content as DATA carried it (un-stuffed).
    let original = dot_unstuff(content);
    let headers = mail_parser::MessageParser::default()
        .parse_headers(&original)
        .map(|m| {
            let end = (m.root_part().raw_body_offset() as usize).min(original.len());
            String::from_utf8_lossy(&original[..end])
                .trim_end()
                .to_string()
                + "\r\n"
        })
        .unwrap_or_default();
    let report = MimePart::new(
        ContentType::new("multipart/report").attribute("report-type", "delivery-status"),
        vec![
            MimePart::new(
                ContentType::new("text/plain").attribute("charset", "utf-8"),
                text,
            ),
            MimePart::new("message/delivery-status", status),
            MimePart::new("text/rfc822-headers", headers),
        ],
    );
    MessageBuilder::new()
        .from((
            "Mail Delivery System".to_string(),
            format!("MAILER-DAEMON@{host}"),
        ))
        .to(e.from.clone())
        .subject("Undelivered Mail Returned to Sender")
        .message_id(format!("dsn-{}@{host}", e.id))
        .header("Auto-Submitted", Raw::new("auto-replied"))
        .body(report)
        .write_to_vec()
        .unwrap_or_default()
}

/// The message from its DATA form: a leading `.` doubled by the sender is removed.
fn dot_unstuff(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len());
    let mut start = true;
    for (i, &b) in content.iter().enumerate() {
        if start && b == b'.' && content.get(i + 1) == Some(&b'.') {
            start = false;
            continue;
        }
        out.push(b);
        start = b == b'\n';
    }
    out
}

fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The enhanced status code in a reply text (`550 5.1.1 …` → `5.1.1`), else a generic one.
fn status_code(why: &str) -> String {
    why.split_whitespace()
        .find(|w| {
            let p: Vec<&str> = w.split('.').collect();
            p.len() == 3
                && (p[0] == "4" || p[0] == "5")
                && p.iter()
                    .all(|x| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit()))
        })
        .map_or_else(|| "5.0.0".to_string(), |c| format!("5{}", &c[1..]))
}

/// DATA form of a message: lines starting with `.` get another one.
fn dot_stuff(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + 16);
    let mut start = true;
    for &b in msg {
        if start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        start = b == b'\n';
    }
    out
}

/// Exponential backoff with ±20% jitter (from the id, so it is stable per message and
/// spreads messages apart).
/// The result of the worker's blocking step. A panic there is the worker's own, as when
/// the step ran on the worker's task: it ends the worker (nothing more is delivered until a
/// restart) rather than carrying on past an entry whose bookkeeping did not happen — which
/// would deliver its recipients again on every pass.
/// `None` when the step was cancelled, which happens only as the runtime shuts down.
fn joined<T>(r: Result<T, tokio::task::JoinError>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => match e.try_into_panic() {
            Ok(panic) => {
                tracing::error!("spool worker: a blocking step panicked; the worker stops");
                std::panic::resume_unwind(panic)
            }
            Err(_) => None,
        },
    }
}

fn backoff(s: &SpoolSettings, attempts: u32, id: &str) -> Duration {
    let base =
        s.retry_initial.as_secs_f64() * 2f64.powi(attempts.saturating_sub(1).min(20).cast_signed());
    let capped = base.min(s.retry_max.as_secs_f64());
    let h = xxhash_rust::xxh3::xxh3_64(format!("{id}/{attempts}").as_bytes());
    let jitter = 0.8 + 0.4 * (h % 1000) as f64 / 1000.0;
    Duration::from_secs_f64((capped * jitter).max(1.0))
}

enum Delivery {
    Done,
    Later(String),
    Failed(String),
}

/// One SMTP transaction to `target` for `rcpts`; per recipient what became of it.
async fn deliver(
    backends: &Backends,
    target: &Arc<Target>,
    e: &Entry,
    rcpts: &[SpooledRcpt],
    content: &[u8],
) -> Result<Vec<Delivery>, String> {
    let mut conn = backends
        .connect_new(target)
        .await
        .map_err(|x| x.to_string())?;
    let mail = mail_line(&e.mail_from(), &conn.caps).map_err(|r| r.to_string())?;
    let r = conn.command(&mail).await.map_err(|x| x.to_string())?;
    if !r.is_positive() {
        conn.quit().await;
        let outcome = |_: &SpooledRcpt| {
            if r.is_transient() {
                Delivery::Later(r.to_string())
            } else {
                Delivery::Failed(r.to_string())
            }
        };
        return Ok(rcpts.iter().map(outcome).collect());
    }
    let mut out: Vec<Option<Delivery>> = Vec::new();
    let mut any = false;
    for rc in rcpts {
        let line = rcpt_line(&rc.rcpt_to(), conn.caps.dsn);
        let r = conn.command(&line).await.map_err(|x| x.to_string())?;
        if r.is_positive() {
            any = true;
            out.push(None);
        } else if r.is_transient() {
            out.push(Some(Delivery::Later(r.to_string())));
        } else {
            out.push(Some(Delivery::Failed(r.to_string())));
        }
    }
    if !any {
        conn.quit().await;
        return Ok(out
            .into_iter()
            .map(|d| d.unwrap_or(Delivery::Later("no recipient accepted".into())))
            .collect());
    }
    let r = conn.command("DATA\r\n").await.map_err(|x| x.to_string())?;
    if r.code != 354 {
        conn.quit().await;
        return Err(format!("DATA refused: {r}"));
    }
    let timeout = backends.settings.data_timeout;
    conn.write_data(content, timeout)
        .await
        .map_err(|x| x.to_string())?;
    conn.write_data(b".\r\n", timeout)
        .await
        .map_err(|x| x.to_string())?;
    let r = conn
        .read_final(backends.settings.final_timeout)
        .await
        .map_err(|x| x.to_string())?;
    conn.quit().await;
    let accepted = |d: Option<Delivery>| match d {
        Some(d) => d,
        None if r.is_positive() => Delivery::Done,
        None if r.is_transient() => Delivery::Later(r.to_string()),
        None => Delivery::Failed(r.to_string()),
    };
    Ok(out.into_iter().map(accepted).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsn_codes_and_stuffing() {
        assert_eq!(status_code("550 5.1.1 no such user"), "5.1.1");
        assert_eq!(status_code("4.4.7 delivery time expired"), "5.4.7");
        assert_eq!(status_code("garbage"), "5.0.0");
        assert_eq!(dot_stuff(b".a\r\nb\r\n.\r\n"), b"..a\r\nb\r\n..\r\n");
        assert_eq!(dot_unstuff(b"..a\r\nb\r\n..\r\n"), b".a\r\nb\r\n.\r\n");
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let s = SpoolSettings {
            dir: PathBuf::new(),
            hostname: "mx.test".into(),
            dsn_target: None,
            max_age: Duration::from_secs(5 * 86_400),
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
        };
        let b1 = backoff(&s, 1, "a").as_secs_f64();
        let b3 = backoff(&s, 3, "a").as_secs_f64();
        let b20 = backoff(&s, 20, "a").as_secs_f64();
        assert!((48.0..=72.0).contains(&b1), "{b1}");
        assert!((192.0..=288.0).contains(&b3), "{b3}");
        assert!((2880.0..=4320.0).contains(&b20), "{b20}");
        assert_ne!(backoff(&s, 2, "a"), backoff(&s, 2, "b"));
    }
}
