//! The control plane: reload, cutover and rollback of the routing table while traffic flows.
//!
//! Every change is validated completely before anything is written or swapped: a change
//! builds the new table from the edited source text in memory, and only a table that
//! compiles is written (atomically: temp file, fsync, rename, fsync of the directory) and
//! swapped in. A rejected change leaves the source file and the active table untouched.
//!
//! Every applied version's source files are kept in a state directory (content-addressed
//! blobs plus one JSON line per version), so the history and rollback survive a restart and
//! a rollback restores the files as well as the table.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::route::{
    Diagnostics, KnownTargets, LoadError, RollbackError, Route, Router, RoutingTable, TableDiff,
    Version, load_routes, load_routes_text,
};

/// Moved mailboxes listed in a change report (the counts are always complete).
const REPORT_LIMIT: usize = 50;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("routing table rejected, the active version keeps serving:\n{0}")]
    Rejected(Diagnostics),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Rollback(#[from] RollbackError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Source { path: PathBuf, what: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ControlError + '_ {
    move |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a change is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Change {
    Site { site: String, to: String },
    Mailbox { mailbox: String, to: String },
}

/// The outcome of a reload, cutover or rollback (applied, or only computed with dry run).
#[derive(Debug, Clone, Serialize)]
pub struct ChangeReport {
    pub applied: bool,
    pub what: String,
    pub from: Version,
    pub to: Version,
    pub diff: TableDiff,
}

/// One applied version, as the state directory keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub version: String,
    pub seq: u64,
    /// Unix seconds.
    pub at: u64,
    pub by: String,
    pub what: String,
    /// Source file (as configured) → blob id.
    pub files: BTreeMap<String, String>,
    /// Mailboxes that changed owner against the version before.
    #[serde(default)]
    pub moved: u64,
}

/// Where applied versions are kept.
struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    fn history_path(&self) -> PathBuf {
        self.dir.join("history.jsonl")
    }

    fn blob_path(&self, id: &str) -> PathBuf {
        self.dir.join("blobs").join(id)
    }

    fn read_history(&self) -> Vec<HistoryEntry> {
        let Ok(text) = std::fs::read_to_string(self.history_path()) else {
            return Vec::new();
        };
        // A torn last line (crash mid-write) is skipped, not fatal.
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Stores the table's source files as blobs and appends the version to the history.
    fn record(
        &self,
        table: &RoutingTable,
        by: &str,
        what: &str,
        moved: u64,
    ) -> Result<HistoryEntry, ControlError> {
        std::fs::create_dir_all(self.dir.join("blobs")).map_err(io_err(&self.dir))?;
        let mut files = BTreeMap::new();
        for f in table.files() {
            let bytes = std::fs::read(f).map_err(io_err(f))?;
            let id = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&bytes));
            let blob = self.blob_path(&id);
            if !blob.exists() {
                write_atomic(&blob, &bytes)?;
            }
            files.insert(f.display().to_string(), id);
        }
        let entry = HistoryEntry {
            version: table.version().to_string(),
            seq: table.version().seq,
            at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            by: by.to_string(),
            what: what.to_string(),
            files,
            moved,
        };
        let line = serde_json::to_string(&entry).map_err(|e| ControlError::Source {
            path: self.history_path(),
            what: e.to_string(),
        })?;
        let path = self.history_path();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        writeln!(f, "{line}").map_err(io_err(&path))?;
        f.sync_all().map_err(io_err(&path))?;
        Ok(entry)
    }

    /// Writes a kept version's source files back in place.
    fn restore(&self, entry: &HistoryEntry) -> Result<(), ControlError> {
        for (file, id) in &entry.files {
            let blob = self.blob_path(id);
            let bytes = std::fs::read(&blob).map_err(io_err(&blob))?;
            write_atomic(Path::new(file), &bytes)?;
        }
        Ok(())
    }
}

/// Replaces `path` with `bytes` so that a reader sees the old or the new file, never a mix,
/// and the new one survives a crash once this returns.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ControlError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    // The rename itself must reach the disk too.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The control plane of one running proxy.
pub struct Control {
    routes_path: PathBuf,
    targets: KnownTargets,
    router: Arc<Router>,
    state: StateDir,
    /// One change at a time; the data plane never takes it.
    changing: Mutex<()>,
}

impl Control {
    /// Loads the table for a start: the version number continues the kept history, and a
    /// table whose content differs from the last kept version is recorded as a new one.
    pub fn start(
        routes_path: &Path,
        targets: KnownTargets,
        history: usize,
        state_dir: &Path,
    ) -> Result<Control, ControlError> {
        let table = load_routes(routes_path, &targets)
            .map_err(|LoadError::Invalid(d)| ControlError::Rejected(d))?;
        let state = StateDir {
            dir: state_dir.to_path_buf(),
        };
        let kept = state.read_history();
        let last = kept.last();
        let same = last.is_some_and(|e| {
            e.version.split_once('-').is_some_and(|(_, h)| {
                u32::from_str_radix(h, 16) == Ok(table.version().short_hash())
            })
        });
        let seq = match last {
            Some(e) if same => e.seq,
            Some(e) => e.seq + 1,
            None => 1,
        };
        let router = Arc::new(Router::with_seq(table, history, seq));
        let c = Control {
            routes_path: routes_path.to_path_buf(),
            targets,
            router,
            state,
            changing: Mutex::new(()),
        };
        if !same {
            let active = c.router.snapshot();
            c.state.record(&active, "coexist", "start", 0)?;
        }
        Ok(c)
    }

    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.changing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn compile(&self, text: &str) -> Result<RoutingTable, ControlError> {
        load_routes_text(&self.routes_path, text, &self.targets)
            .map_err(|LoadError::Invalid(d)| ControlError::Rejected(d))
    }

    /// Installs `table`, records it, and reports. The swap comes first: the diff over a
    /// million mailboxes takes a while, and traffic should not wait for a report.
    fn apply(
        &self,
        table: RoutingTable,
        what: String,
        by: &str,
        dry_run: bool,
    ) -> Result<ChangeReport, ControlError> {
        if dry_run {
            let active = self.router.snapshot();
            return Ok(ChangeReport {
                applied: false,
                what,
                from: active.version(),
                to: table.version(),
                diff: TableDiff::between(&active, &table, Some(REPORT_LIMIT)),
            });
        }
        let swapped = self.router.swap(table);
        let diff = TableDiff::between(&swapped.previous, &swapped.active, Some(REPORT_LIMIT));
        metrics::counter!(crate::metric_names::ROUTE_SWAPS, "result" => "ok").increment(1);
        tracing::info!(old = %swapped.previous.version(), new = %swapped.active.version(), %what, %by, moved = diff.moved_total, "routing table swapped");
        self.state
            .record(&swapped.active, by, &what, diff.moved_total)?;
        Ok(ChangeReport {
            applied: true,
            what,
            from: swapped.previous.version(),
            to: swapped.active.version(),
            diff,
        })
    }

    fn rejected(&self, e: ControlError) -> ControlError {
        if let ControlError::Rejected(d) = &e {
            metrics::counter!(crate::metric_names::ROUTE_SWAPS, "result" => "rejected")
                .increment(1);
            tracing::error!(active = %self.router.snapshot().version(), errors = d.len(), "routing table rejected, active version keeps serving:\n{d}");
        }
        e
    }

    /// Re-reads the source files.
    pub fn reload(&self, dry_run: bool, by: &str) -> Result<ChangeReport, ControlError> {
        let _g = self.lock();
        let text = std::fs::read_to_string(&self.routes_path).map_err(io_err(&self.routes_path))?;
        let table = self.compile(&text).map_err(|e| self.rejected(e))?;
        self.apply(table, "reload".into(), by, dry_run)
    }

    /// Changes a site's or a mailbox's owner in the routes file and applies it.
    pub fn cutover(
        &self,
        change: &Change,
        dry_run: bool,
        by: &str,
    ) -> Result<ChangeReport, ControlError> {
        let _g = self.lock();
        let path = &self.routes_path;
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let mut doc: toml_edit::DocumentMut =
            text.parse()
                .map_err(|e: toml_edit::TomlError| ControlError::Source {
                    path: path.clone(),
                    what: e.to_string(),
                })?;
        let active = self.router.snapshot();
        let to = match change {
            Change::Site { to, .. } | Change::Mailbox { to, .. } => to,
        };
        if active.target_id(to).is_none() {
            let known: Vec<&str> = active.target_names().collect();
            return Err(ControlError::NotFound(format!(
                "unknown target {to:?} (targets: {})",
                known.join(", ")
            )));
        }
        let what = match change {
            Change::Site { site, to } => {
                let Some(entry) = doc
                    .get_mut("sites")
                    .and_then(|s| s.get_mut(site))
                    .and_then(|s| s.as_table_like_mut())
                else {
                    return Err(ControlError::NotFound(format!(
                        "no site {site:?} in {}",
                        path.display()
                    )));
                };
                // Only the value changes: comments and order stay as the operator wrote them.
                match entry.get_mut("owner").and_then(|o| o.as_value_mut()) {
                    Some(v) => {
                        let decor = v.decor().clone();
                        *v = toml_edit::Value::from(to.as_str());
                        *v.decor_mut() = decor;
                    }
                    None => {
                        entry.insert("owner", toml_edit::value(to.as_str()));
                    }
                }
                format!("cutover site {site} -> {to}")
            }
            Change::Mailbox { mailbox, to } => {
                let Route::Mailbox(m) = active.lookup(mailbox) else {
                    return Err(ControlError::NotFound(format!(
                        "no mailbox {mailbox:?} in the active table"
                    )));
                };
                let address = m.address().to_string();
                if doc.get("owners").is_none() {
                    let mut t = toml_edit::Table::new();
                    t.decor_mut().set_prefix(
                        "\n# Per-mailbox owners (pilot users), written by `coexist cutover --mailbox`.\n# A mailbox listed here stays with its owner when its site moves.\n",
                    );
                    doc.insert("owners", toml_edit::Item::Table(t));
                }
                let owners = doc
                    .get_mut("owners")
                    .and_then(|o| o.as_table_like_mut())
                    .ok_or_else(|| ControlError::Source {
                        path: path.clone(),
                        what: "`owners` is not a table".into(),
                    })?;
                owners.insert(&address, toml_edit::value(to.as_str()));
                format!("cutover mailbox {address} -> {to}")
            }
        };
        let new_text = doc.to_string();
        let table = self.compile(&new_text).map_err(|e| self.rejected(e))?;
        if !dry_run {
            write_atomic(path, new_text.as_bytes())?;
        }
        self.apply(table, what, by, dry_run)
    }

    /// Goes back to the previous version (or `to`): the table and its source files.
    pub fn rollback(&self, to: Option<&str>, by: &str) -> Result<ChangeReport, ControlError> {
        let _g = self.lock();
        let active = self.router.snapshot();
        let kept = self.state.read_history();
        let swapped = match self.router.rollback(to) {
            Ok(s) => s,
            Err(RollbackError::NoEarlier) if to.is_none() && self.router.history().len() == 1 => {
                // Nothing changed since this process started (a restart): the version that
                // was active before, from the kept history.
                let active_v = active.version().to_string();
                let Some(entry) = kept.iter().rev().find(|e| e.version != active_v) else {
                    return Err(RollbackError::NoEarlier.into());
                };
                let table = self.restore_and_load(&kept, entry, &active)?;
                return self.apply(table, format!("rollback to {}", entry.version), by, false);
            }
            Err(RollbackError::UnknownVersion(v)) => {
                // Not in memory (older, or from before a restart): rebuild it from its files.
                let Some(entry) = kept.iter().rev().find(|e| version_matches(e, &v)) else {
                    return Err(RollbackError::UnknownVersion(v).into());
                };
                let table = self.restore_and_load(&kept, entry, &active)?;
                return self.apply(table, format!("rollback to {}", entry.version), by, false);
            }
            Err(e) => return Err(e.into()),
        };
        let target = swapped.active.version();
        if let Some(entry) = kept.iter().rev().find(|e| e.version == target.to_string()) {
            self.state.restore(entry)?;
        } else {
            tracing::warn!(version = %target, "no kept source files for this version; only the table was rolled back");
        }
        let diff = TableDiff::between(&active, &swapped.active, Some(REPORT_LIMIT));
        let what = format!("rollback to {target}");
        metrics::counter!(crate::metric_names::ROUTE_SWAPS, "result" => "ok").increment(1);
        tracing::info!(old = %active.version(), new = %target, %by, moved = diff.moved_total, "routing table rolled back");
        self.state
            .record(&swapped.active, by, &what, diff.moved_total)?;
        Ok(ChangeReport {
            applied: true,
            what,
            from: active.version(),
            to: target,
            diff,
        })
    }

    /// Puts a kept version's files back and compiles them; if they no longer compile (the
    /// targets changed since), the active version's files are put back, so the files on disk
    /// never disagree with the table that serves.
    fn restore_and_load(
        &self,
        kept: &[HistoryEntry],
        entry: &HistoryEntry,
        active: &RoutingTable,
    ) -> Result<RoutingTable, ControlError> {
        let active_v = active.version().to_string();
        let current = kept.iter().rev().find(|e| e.version == active_v);
        self.state.restore(entry)?;
        match load_routes(&self.routes_path, &self.targets) {
            Ok(t) => Ok(t),
            Err(LoadError::Invalid(d)) => {
                if let Some(c) = current {
                    self.state.restore(c)?;
                }
                Err(self.rejected(ControlError::Rejected(d)))
            }
        }
    }

    /// Applied versions, newest first.
    pub fn history(&self, limit: usize) -> Vec<HistoryEntry> {
        let mut h = self.state.read_history();
        h.reverse();
        h.truncate(limit);
        h
    }
}

fn version_matches(e: &HistoryEntry, spec: &str) -> bool {
    let Some((seq, hash)) = e.version.split_once('-') else {
        return false;
    };
    let spec = spec.trim().trim_start_matches('v');
    spec == e.version || spec == seq || spec.eq_ignore_ascii_case(hash)
}
