//! The control plane: reload, cutover and rollback of the routing table while traffic flows.
//!
//! Every change is one ordered step. The new table is compiled from bytes read once (the
//! edited routes text, kept versions, the files on disk); only a table that compiles goes
//! further. Then, in this order: the compiled bytes are kept as blobs in the state
//! directory, the source files are written (atomically: temp file, fsync, rename, fsync of
//! the directory), the version is appended to the history and fsynced, and only then is the
//! table swapped in. A step that fails undoes the steps before it, so a change is either
//! live and recorded with its files, or not live at all; a rejected change leaves the
//! source files and the active table untouched.
//!
//! Every applied version's source files are kept (content-addressed blobs plus one JSON
//! line per version), so the history and rollback survive a restart and a rollback
//! restores the files as well as the table. An operator's hand edit that was not reloaded
//! is never overwritten without being kept, and never applied under another change's name:
//! cutover and rollback refuse while the files on disk differ from the active version's,
//! unless forced, and a forced change first sets the edited files aside in the state
//! directory.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::route::{
    Diagnostic, Diagnostics, KnownTargets, LoadError, RollbackError, Route, Router, RoutingTable,
    SourceFile, TableDiff, Version, compile_routes,
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
    #[error("{0}")]
    Pending(Box<PendingEdits>),
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
    /// False when the change would change nothing ("nothing to change"): no version is
    /// created and no file is written.
    pub changed: bool,
    pub what: String,
    pub from: Version,
    pub to: Version,
    pub diff: TableDiff,
    /// Hand-edited files that a forced change set aside before overwriting them: where
    /// each one is kept now.
    pub kept: Vec<KeptFile>,
}

/// A hand-edited source file set aside by a forced change.
#[derive(Debug, Clone, Serialize)]
pub struct KeptFile {
    pub file: String,
    pub kept_at: String,
}

/// Source files that differ on disk from the active version's (edited by hand and not
/// reloaded), and what applying them would do.
#[derive(Debug, Clone, Serialize)]
pub struct PendingEdits {
    /// The change that was refused.
    pub refused: String,
    pub active: Version,
    pub files: Vec<String>,
    /// What a reload of the files on disk would move; `None` when they do not compile.
    pub diff: Option<TableDiff>,
    /// Why the files on disk do not compile, when they do not.
    pub errors: Vec<Diagnostic>,
}

impl fmt::Display for PendingEdits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} refused: the source files differ from the active version {} (edited and not reloaded):",
            self.refused, self.active
        )?;
        for file in &self.files {
            writeln!(f, "  {file}")?;
        }
        match &self.diff {
            Some(d) if d.is_empty() => {
                writeln!(f, "the pending edit moves no mailbox")?;
            }
            Some(d) => {
                writeln!(
                    f,
                    "the pending edit would move {} mailbox{}:",
                    d.moved_total,
                    if d.moved_total == 1 { "" } else { "es" }
                )?;
                write!(f, "{d}")?;
            }
            None => {
                writeln!(
                    f,
                    "the pending edit does not compile ({} errors):",
                    self.errors.len()
                )?;
                for e in &self.errors {
                    writeln!(f, "  {e}")?;
                }
            }
        }
        write!(
            f,
            "`coexist reload` applies the edit first; `--force` sets it aside in the state directory and proceeds from the active version"
        )
    }
}

/// One applied version, as the state directory keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub version: String,
    pub seq: u64,
    /// The full content hash (16 hex digits); absent in entries written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
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

/// Source file → blob id: the identity of a version's files.
type FileIds = BTreeMap<String, String>;

fn blob_id(bytes: &[u8]) -> String {
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(bytes))
}

fn full_hash(v: Version) -> String {
    format!("{:016x}", v.hash)
}

/// How a source file is named in the history: its absolute path, so that one file has one
/// name however the config was given (`-c coexist.toml` or `-c /etc/coexist/coexist.toml`).
fn key(p: &Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

fn file_ids(sources: &[SourceFile]) -> FileIds {
    sources
        .iter()
        .map(|f| (key(&f.path), blob_id(&f.bytes)))
        .collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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

    /// Keeps the bytes a version was compiled from, as blobs named by their content.
    fn keep_blobs(&self, sources: &[SourceFile]) -> Result<(), ControlError> {
        let blobs = self.dir.join("blobs");
        std::fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        for f in sources {
            let blob = self.blob_path(&blob_id(&f.bytes));
            if !blob.exists() {
                write_atomic(&blob, &f.bytes)?;
            }
        }
        Ok(())
    }

    fn read_blob(&self, id: &str) -> Result<Vec<u8>, ControlError> {
        let blob = self.blob_path(id);
        std::fs::read(&blob).map_err(io_err(&blob))
    }

    /// A kept version's files, read back from their blobs.
    fn sources(&self, files: &FileIds) -> Result<Vec<SourceFile>, ControlError> {
        files
            .iter()
            .map(|(path, id)| {
                Ok(SourceFile {
                    path: PathBuf::from(path),
                    bytes: self.read_blob(id)?,
                })
            })
            .collect()
    }

    /// Appends one version to the history, durably.
    fn append(&self, entry: &HistoryEntry) -> Result<(), ControlError> {
        std::fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let line = serde_json::to_string(entry).map_err(|e| ControlError::Source {
            path: self.history_path(),
            what: e.to_string(),
        })?;
        let path = self.history_path();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let len = f.metadata().map_err(io_err(&path))?.len();
        // A line torn by an earlier crash must not swallow this one.
        let mut torn = false;
        if len > 0 {
            use std::io::{Read as _, Seek as _};
            let mut last = [0u8; 1];
            f.seek(std::io::SeekFrom::End(-1))
                .and_then(|_| f.read_exact(&mut last))
                .map_err(io_err(&path))?;
            torn = last[0] != b'\n';
        }
        let text = format!("{}{line}\n", if torn { "\n" } else { "" });
        let written = f.write_all(text.as_bytes()).and_then(|()| f.sync_all());
        if let Err(e) = written {
            // A partial line would merge with the next entry: cut it off again.
            let _ = f.set_len(len).and_then(|()| f.sync_all());
            return Err(io_err(&path)(e));
        }
        Ok(())
    }

    /// Keeps a hand-edited file that a forced change is about to overwrite.
    fn set_aside(&self, file: &Path, bytes: &[u8]) -> Result<PathBuf, ControlError> {
        let dir = self.dir.join("set-aside");
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let name = file
            .file_name()
            .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
        let stamp = unix_now();
        let mut n = 0u32;
        loop {
            let kept = dir.join(if n == 0 {
                format!("{stamp}-{name}")
            } else {
                format!("{stamp}-{n}-{name}")
            });
            if !kept.exists() {
                write_atomic(&kept, bytes)?;
                return Ok(kept);
            }
            n += 1;
        }
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
    /// One change at a time (the data plane never takes it). It guards the active
    /// version's files: what the files on disk are compared with before a change.
    changing: Mutex<FileIds>,
}

/// How a prepared change installs its table.
enum Install {
    /// A newly compiled table, installed as the next version.
    New(Box<RoutingTable>),
    /// A version the router still holds, made active again by `Router::rollback(to)`.
    Rollback {
        to: Option<String>,
        table: Arc<RoutingTable>,
    },
}

impl Install {
    fn version(&self) -> Version {
        match self {
            Install::New(t) => t.version(),
            Install::Rollback { table, .. } => table.version(),
        }
    }
}

/// A change that compiled and is ready to be made durable and installed.
struct Prepared {
    install: Install,
    /// Exactly the bytes the table was compiled from: what is kept and written.
    sources: Vec<SourceFile>,
    what: String,
    diff: TableDiff,
    /// Whether the source files on disk are replaced (cutover, rollback) or already are
    /// the sources (reload).
    write_files: bool,
}

/// A source file whose bytes on disk are not what the active version kept (`None`:
/// missing): a hand edit that was not reloaded.
type PendingFile = (String, Option<Vec<u8>>);

/// What a change found on disk before it writes anything.
struct DiskCheck {
    /// Hand edits (set aside first by a forced change).
    pending: Vec<PendingFile>,
    /// Every file the change may touch → the blob id of its bytes as checked (`None`:
    /// missing). A file that differs from this when it is written was saved meanwhile: the
    /// change stops rather than overwrite an edit nobody kept.
    seen: BTreeMap<String, Option<String>>,
}

impl HistoryEntry {
    fn new(version: Version, by: &str, what: &str, files: FileIds, moved: u64) -> Self {
        HistoryEntry {
            version: version.to_string(),
            seq: version.seq,
            hash: Some(full_hash(version)),
            at: unix_now(),
            by: by.to_string(),
            what: what.to_string(),
            files,
            moved,
        }
    }

    /// Whether this entry is the version `table` with exactly these files.
    fn is(&self, table: &RoutingTable, files: &FileIds) -> bool {
        let v = table.version();
        let same_content = match &self.hash {
            Some(h) => *h == full_hash(v),
            // Entries from before the full hash was kept: the short one is all there is.
            None => self
                .version
                .split_once('-')
                .is_some_and(|(_, h)| u32::from_str_radix(h, 16) == Ok(v.short_hash())),
        };
        same_content && self.files == *files
    }
}

fn read_disk(p: &Path) -> std::io::Result<Vec<u8>> {
    std::fs::read(p)
}

impl Control {
    /// Loads the table for a start: the version number continues the kept history, and a
    /// table whose content or files differ from the last kept version is recorded as a
    /// new one.
    pub fn start(
        routes_path: &Path,
        targets: KnownTargets,
        history: usize,
        state_dir: &Path,
    ) -> Result<Control, ControlError> {
        let (table, sources) = compile_routes(routes_path, &targets, &mut read_disk)
            .map_err(|LoadError::Invalid(d)| ControlError::Rejected(d))?;
        let state = StateDir {
            dir: state_dir.to_path_buf(),
        };
        let kept = state.read_history();
        let ids = file_ids(&sources);
        // Rollbacks record older sequence numbers again: the next new one is above all.
        let max_seq = kept.iter().map(|e| e.seq).max().unwrap_or(0);
        // Always: a lost blob would make every later change fail to read the active files.
        state.keep_blobs(&sources)?;
        let seq = match kept.last() {
            Some(e) if e.is(&table, &ids) => e.seq,
            _ => {
                let mut v = table.version();
                v.seq = max_seq + 1;
                state.append(&HistoryEntry::new(v, "coexist", "start", ids.clone(), 0))?;
                v.seq
            }
        };
        let router = Arc::new(Router::resume(table, history, seq, seq.max(max_seq) + 1));
        Ok(Control {
            routes_path: routes_path.to_path_buf(),
            targets,
            router,
            state,
            changing: Mutex::new(ids),
        })
    }

    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    fn lock(&self) -> MutexGuard<'_, FileIds> {
        self.changing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn rejected(&self, LoadError::Invalid(d): LoadError) -> ControlError {
        metrics::counter!(crate::metric_names::ROUTE_SWAPS, "result" => "rejected").increment(1);
        tracing::error!(active = %self.router.snapshot().version(), errors = d.len(), "routing table rejected, active version keeps serving:\n{d}");
        ControlError::Rejected(d)
    }

    /// The answer to a change that would change nothing: no version, no file written.
    fn unchanged(what: String, active: &RoutingTable) -> ChangeReport {
        ChangeReport {
            applied: false,
            changed: false,
            what,
            from: active.version(),
            to: active.version(),
            diff: TableDiff::none(active.version()),
            kept: Vec::new(),
        }
    }

    /// Compares the files on disk with the active version's, and with what the change
    /// would write. A file that differs from the active version's, or that the change
    /// would overwrite although the active version never had it, is a pending hand edit:
    /// without `force` that refuses the change (`refused` names it), saying what the
    /// pending edit would move.
    fn check_disk(
        &self,
        active_files: &FileIds,
        writes: &[SourceFile],
        active: &RoutingTable,
        refused: &str,
        force: bool,
    ) -> Result<DiskCheck, ControlError> {
        let mut seen = BTreeMap::new();
        let mut pending: Vec<PendingFile> = Vec::new();
        for (k, id) in active_files {
            let disk = std::fs::read(k).ok();
            let disk_id = disk.as_deref().map(blob_id);
            if disk_id.as_ref() != Some(id) {
                pending.push((k.clone(), disk));
            }
            seen.insert(k.clone(), disk_id);
        }
        for f in writes {
            let k = key(&f.path);
            if seen.contains_key(&k) {
                continue;
            }
            let disk = std::fs::read(&f.path).ok();
            let disk_id = disk.as_deref().map(blob_id);
            if disk.as_ref().is_some_and(|d| *d != f.bytes) {
                pending.push((k.clone(), disk));
            }
            seen.insert(k, disk_id);
        }
        if pending.is_empty() || force {
            return Ok(DiskCheck { pending, seen });
        }
        let (diff, errors) = match compile_routes(&self.routes_path, &self.targets, &mut read_disk)
        {
            Ok((t, _)) => (
                Some(TableDiff::between(active, &t, Some(REPORT_LIMIT))),
                vec![],
            ),
            Err(LoadError::Invalid(d)) => (None, d.errors),
        };
        Err(ControlError::Pending(Box::new(PendingEdits {
            refused: refused.to_string(),
            active: active.version(),
            files: pending.into_iter().map(|(p, _)| p).collect(),
            diff,
            errors,
        })))
    }

    /// Reads `path` as the active version has it (its kept blob), or from disk when the
    /// active version does not have that file.
    fn read_active(&self, active_files: &FileIds, path: &Path) -> std::io::Result<Vec<u8>> {
        match active_files.get(&key(path)) {
            Some(id) => std::fs::read(self.state.blob_path(id)),
            None => std::fs::read(path),
        }
    }

    /// Makes a prepared change durable, then installs it: hand edits set aside, blobs
    /// kept, files written, history appended, and only then the swap. A failing step
    /// puts back the files it had written; the active table never changed.
    fn commit(
        &self,
        active_files: &mut FileIds,
        p: Prepared,
        by: &str,
        disk: &DiskCheck,
    ) -> Result<ChangeReport, ControlError> {
        let mut kept = Vec::new();
        for (file, bytes) in &disk.pending {
            if let Some(bytes) = bytes {
                let at = self.state.set_aside(Path::new(file), bytes)?;
                tracing::warn!(%file, kept = %at.display(), "hand edit set aside by a forced change");
                kept.push(KeptFile {
                    file: file.clone(),
                    kept_at: at.display().to_string(),
                });
            }
        }
        self.state.keep_blobs(&p.sources)?;
        let mut written: Vec<(PathBuf, Option<Vec<u8>>)> = Vec::new();
        if p.write_files {
            for f in &p.sources {
                let k = key(&f.path);
                // Already these bytes when checked: nothing to write, and nothing of an
                // edit made since could be overwritten (a large CSV is not read again).
                if disk.seen.get(&k).cloned().flatten() == Some(blob_id(&f.bytes)) {
                    continue;
                }
                let before = std::fs::read(&f.path).ok();
                if before.as_deref() == Some(f.bytes.as_slice()) {
                    continue;
                }
                if disk.seen.get(&k).cloned().flatten() != before.as_deref().map(blob_id) {
                    undo(&written);
                    return Err(ControlError::Source {
                        path: f.path.clone(),
                        what: "changed on disk while the change was being made; nothing changed (reload, or try again)".into(),
                    });
                }
                if let Err(e) = write_atomic(&f.path, &f.bytes) {
                    undo(&written);
                    return Err(e);
                }
                written.push((f.path.clone(), before));
            }
        }
        let version = p.install.version();
        let ids = file_ids(&p.sources);
        let entry = HistoryEntry::new(version, by, &p.what, ids.clone(), p.diff.moved_total);
        if let Err(e) = self.state.append(&entry) {
            undo(&written);
            return Err(e);
        }
        let swapped = match p.install {
            Install::New(t) => self.router.swap(*t),
            // Cannot fail: the target was found under the same lock.
            Install::Rollback { to, .. } => self.router.rollback(to.as_deref())?,
        };
        debug_assert_eq!(swapped.active.version(), version);
        *active_files = ids;
        metrics::counter!(crate::metric_names::ROUTE_SWAPS, "result" => "ok").increment(1);
        tracing::info!(old = %swapped.previous.version(), new = %swapped.active.version(), what = %p.what, %by, moved = p.diff.moved_total, "routing table swapped");
        Ok(ChangeReport {
            applied: true,
            changed: true,
            what: p.what,
            from: swapped.previous.version(),
            to: swapped.active.version(),
            diff: p.diff,
            kept,
        })
    }

    /// A newly compiled table as the next version, compared with the active one.
    fn prepare_new(
        &self,
        mut table: RoutingTable,
        sources: Vec<SourceFile>,
        what: String,
        active: &RoutingTable,
        write_files: bool,
    ) -> Prepared {
        table.set_seq(self.router.next_seq());
        let diff = TableDiff::between(active, &table, Some(REPORT_LIMIT));
        Prepared {
            install: Install::New(Box::new(table)),
            sources,
            what,
            diff,
            write_files,
        }
    }

    fn dry_run(p: Prepared, active: &RoutingTable) -> ChangeReport {
        let to = p.install.version();
        ChangeReport {
            applied: false,
            changed: true,
            what: p.what,
            from: active.version(),
            to,
            diff: p.diff,
            kept: Vec::new(),
        }
    }

    /// Re-reads the source files.
    pub fn reload(&self, dry_run: bool, by: &str) -> Result<ChangeReport, ControlError> {
        self.reload_with(dry_run, by, &mut read_disk)
    }

    fn reload_with(
        &self,
        dry_run: bool,
        by: &str,
        read: &mut crate::route::ReadSource<'_>,
    ) -> Result<ChangeReport, ControlError> {
        let mut g = self.lock();
        let (table, sources) =
            compile_routes(&self.routes_path, &self.targets, read).map_err(|e| self.rejected(e))?;
        let active = self.router.snapshot();
        if file_ids(&sources) == *g {
            return Ok(Self::unchanged("reload".into(), &active));
        }
        let p = self.prepare_new(table, sources, "reload".into(), &active, false);
        if dry_run {
            return Ok(Self::dry_run(p, &active));
        }
        let none = DiskCheck {
            pending: Vec::new(),
            seen: BTreeMap::new(),
        };
        self.commit(&mut g, p, by, &none)
    }

    /// Changes a site's or a mailbox's owner in the routes file and applies it. The edit is
    /// made to the active version's routes file; with pending hand edits on disk it is
    /// refused unless `force`, which sets the edited files aside first.
    pub fn cutover(
        &self,
        change: &Change,
        dry_run: bool,
        force: bool,
        by: &str,
    ) -> Result<ChangeReport, ControlError> {
        let mut g = self.lock();
        let path = &self.routes_path;
        let active = self.router.snapshot();
        let (to, asked) = match change {
            Change::Site { site, to } => (to, format!("cutover site {site} -> {to}")),
            Change::Mailbox { mailbox, to } => (to, format!("cutover mailbox {mailbox} -> {to}")),
        };
        if active.target_id(to).is_none() {
            let known: Vec<&str> = active.target_names().collect();
            return Err(ControlError::NotFound(format!(
                "unknown target {to:?} (targets: {})",
                known.join(", ")
            )));
        }
        let text = self
            .read_active(&g, path)
            .map_err(io_err(path))
            .and_then(|b| {
                String::from_utf8(b).map_err(|e| ControlError::Source {
                    path: path.clone(),
                    what: e.to_string(),
                })
            })?;
        let (new_text, what) = edit_routes(path, &text, change, &active)?;
        let mut read = |p: &Path| {
            if p == path.as_path() {
                Ok(new_text.as_bytes().to_vec())
            } else {
                self.read_active(&g, p)
            }
        };
        let (table, sources) =
            compile_routes(path, &self.targets, &mut read).map_err(|e| self.rejected(e))?;
        if table.version().hash == active.version().hash {
            return Ok(Self::unchanged(what, &active));
        }
        let p = self.prepare_new(table, sources, what, &active, true);
        let disk = self.check_disk(&g, &p.sources, &active, &asked, force)?;
        if dry_run {
            return Ok(Self::dry_run(p, &active));
        }
        self.commit(&mut g, p, by, &disk)
    }

    /// Goes back to the previous version (or `to`): the table and its source files. With
    /// pending hand edits on disk it is refused unless `force`, which sets them aside.
    pub fn rollback(
        &self,
        to: Option<&str>,
        force: bool,
        by: &str,
    ) -> Result<ChangeReport, ControlError> {
        let mut g = self.lock();
        let active = self.router.snapshot();
        let asked = to.map_or_else(|| "rollback".to_string(), |v| format!("rollback to {v}"));
        let kept = self.state.read_history();
        let p = match self.router.rollback_target(to) {
            Ok(target) => {
                let v = target.version().to_string();
                let Some(entry) = kept.iter().rev().find(|e| e.version == v) else {
                    return Err(ControlError::NotFound(format!(
                        "version {v} has no kept source files in {}; nothing changed",
                        self.state.dir.display()
                    )));
                };
                let sources = self.state.sources(&entry.files)?;
                let diff = TableDiff::between(&active, &target, Some(REPORT_LIMIT));
                Prepared {
                    install: Install::Rollback {
                        to: to.map(str::to_string),
                        table: target,
                    },
                    sources,
                    what: format!("rollback to {v}"),
                    diff,
                    write_files: true,
                }
            }
            Err(RollbackError::NoEarlier) if to.is_none() && self.router.history().len() == 1 => {
                // Nothing changed since this process started (a restart): the version that
                // was active before, from the kept history.
                let active_v = active.version().to_string();
                let Some(entry) = kept.iter().rev().find(|e| e.version != active_v) else {
                    return Err(RollbackError::NoEarlier.into());
                };
                self.prepare_kept(entry, &active)?
            }
            Err(RollbackError::UnknownVersion(v)) => {
                // Not in memory (older, or from before a restart): rebuild it from its files.
                let Some(entry) = kept.iter().rev().find(|e| version_matches(e, &v)) else {
                    return Err(RollbackError::UnknownVersion(v).into());
                };
                self.prepare_kept(entry, &active)?
            }
            Err(e) => return Err(e.into()),
        };
        // Back to a version with exactly the active files changes nothing. (Without a
        // version, rollback walks back through what was active, so it is never stuck.)
        if to.is_some() && file_ids(&p.sources) == *g {
            return Ok(Self::unchanged(p.what, &active));
        }
        let disk = self.check_disk(&g, &p.sources, &active, &asked, force)?;
        self.commit(&mut g, p, by, &disk)
    }

    /// A kept version compiled again from its blobs. If they no longer compile (the
    /// targets changed since), nothing is written and the active version keeps serving.
    fn prepare_kept(
        &self,
        entry: &HistoryEntry,
        active: &RoutingTable,
    ) -> Result<Prepared, ControlError> {
        let kept: BTreeMap<String, Vec<u8>> = self
            .state
            .sources(&entry.files)?
            .into_iter()
            .map(|f| (key(&f.path), f.bytes))
            .collect();
        let mut read = |p: &Path| {
            kept.get(&key(p)).cloned().ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("not among the kept files of version {}", entry.version),
                )
            })
        };
        let (table, sources) = compile_routes(&self.routes_path, &self.targets, &mut read)
            .map_err(|e| self.rejected(e))?;
        Ok(self.prepare_new(
            table,
            sources,
            format!("rollback to {}", entry.version),
            active,
            true,
        ))
    }

    /// Applied versions, newest first.
    pub fn history(&self, limit: usize) -> Vec<HistoryEntry> {
        let mut h = self.state.read_history();
        h.reverse();
        h.truncate(limit);
        h
    }
}

/// Creates the routes file at `path` from `seed` (and the CSV files the seed imports,
/// copied beside it under the same relative names) when `path` does not exist yet. The seed
/// must compile: a broken one is rejected before anything is written. Returns the files
/// written (none when `path` already exists).
pub fn seed_routes(
    path: &Path,
    seed: &Path,
    targets: &KnownTargets,
) -> Result<Vec<PathBuf>, ControlError> {
    if path.try_exists().map_err(io_err(path))? {
        return Ok(Vec::new());
    }
    let (_, sources) = compile_routes(seed, targets, &mut read_disk)
        .map_err(|LoadError::Invalid(d)| ControlError::Rejected(d))?;
    let seed_dir = seed.parent().unwrap_or(Path::new("."));
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    // Every destination is checked before anything is written.
    let mut copies = Vec::with_capacity(sources.len());
    // The routes file last: a crash half-way leaves no routes file, so the next start
    // seeds again instead of serving a table whose imports are missing.
    for f in sources.iter().skip(1).chain(sources.first()) {
        let to = if f.path == seed {
            path.to_path_buf()
        } else {
            match f.path.strip_prefix(seed_dir) {
                // `..` would copy out of the routes directory (next to the state, say).
                Ok(rel) if rel.components().all(|c| matches!(c, Component::Normal(_))) => {
                    dir.join(rel)
                }
                _ => {
                    return Err(ControlError::Source {
                        path: f.path.clone(),
                        what: format!(
                            "a seed's CSV imports must lie in or below {}, to be copied beside {}",
                            seed_dir.display(),
                            path.display()
                        ),
                    });
                }
            }
        };
        // A live CSV left behind (the routes file was deleted to seed again) may hold edits.
        if f.path != seed
            && let Ok(existing) = std::fs::read(&to)
            && existing != f.bytes
        {
            return Err(ControlError::Source {
                path: to,
                what: "exists and differs from the seed's copy; move it away to seed again".into(),
            });
        }
        copies.push((to, &f.bytes));
    }
    let mut written = Vec::new();
    for (to, bytes) in copies {
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        write_atomic(&to, bytes)?;
        written.push(to);
    }
    Ok(written)
}

/// Puts back files a failed change had written (`None`: the file did not exist).
fn undo(written: &[(PathBuf, Option<Vec<u8>>)]) {
    for (path, before) in written.iter().rev() {
        let r = match before {
            Some(b) => write_atomic(path, b),
            None => std::fs::remove_file(path).map_err(io_err(path)),
        };
        if let Err(e) = r {
            tracing::error!(file = %path.display(), "cannot put back a file after a failed change: {e}");
        }
    }
}

/// The routes file's text with `change` made: only the value changes, so comments and
/// order stay as the operator wrote them. Returns the new text and what the change is.
fn edit_routes(
    path: &Path,
    text: &str,
    change: &Change,
    active: &RoutingTable,
) -> Result<(String, String), ControlError> {
    let mut doc: toml_edit::DocumentMut =
        text.parse()
            .map_err(|e: toml_edit::TomlError| ControlError::Source {
                path: path.to_path_buf(),
                what: e.to_string(),
            })?;
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
                    path: path.to_path_buf(),
                    what: "`owners` is not a table".into(),
                })?;
            owners.insert(&address, toml_edit::value(to.as_str()));
            format!("cutover mailbox {address} -> {to}")
        }
    };
    Ok((doc.to_string(), what))
}

fn version_matches(e: &HistoryEntry, spec: &str) -> bool {
    let Some((seq, hash)) = e.version.split_once('-') else {
        return false;
    };
    let spec = spec.trim().trim_start_matches('v');
    spec == e.version || spec == seq || spec.eq_ignore_ascii_case(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = "[domains.\"example.com\"]\nunknown = \"old\"\n\n\
        [sites.paris]\nowner = \"new\"\n[sites.berlin]\nowner = \"old\"\n\n\
        [[mailbox]]\naddress = \"alice@example.com\"\nsite = \"paris\"\n\n\
        [[mailbox]]\naddress = \"bob@example.com\"\nsite = \"berlin\"\n";

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("routes.toml"), ROUTES).unwrap();
            Fixture { dir }
        }

        /// The routes file importing `more.csv` (carol, site berlin), and that CSV.
        fn with_csv() -> (Self, PathBuf) {
            let f = Self::new();
            let csv = f.dir.path().join("more.csv");
            std::fs::write(&csv, "address,site\ncarol@example.com,berlin\n").unwrap();
            std::fs::write(
                f.routes(),
                format!("{ROUTES}\n[import]\ncsv = [\"more.csv\"]\n"),
            )
            .unwrap();
            (f, csv)
        }

        fn routes(&self) -> PathBuf {
            self.dir.path().join("routes.toml")
        }

        fn state(&self) -> PathBuf {
            self.dir.path().join("state")
        }

        fn start(&self) -> Control {
            Control::start(
                &self.routes(),
                KnownTargets::Exactly(vec!["old".into(), "new".into()]),
                10,
                &self.state(),
            )
            .unwrap()
        }

        fn text(&self) -> String {
            std::fs::read_to_string(self.routes()).unwrap()
        }

        /// Makes the history file impossible to append to (root ignores permissions).
        fn break_history(&self) {
            let h = self.state().join("history.jsonl");
            std::fs::remove_file(&h).unwrap();
            std::fs::create_dir(&h).unwrap();
        }
    }

    fn owner(c: &Control, address: &str) -> String {
        match c.router().snapshot().lookup(address) {
            Route::Mailbox(m) => m.owner_name().to_string(),
            other => panic!("{other:?}"),
        }
    }

    fn berlin(to: &str) -> Change {
        Change::Site {
            site: "berlin".into(),
            to: to.into(),
        }
    }

    #[test]
    fn a_failing_history_write_leaves_files_and_table_as_they_were() {
        let f = Fixture::new();
        let c = f.start();
        f.break_history();
        let e = c.cutover(&berlin("new"), false, false, "test").unwrap_err();
        assert!(matches!(e, ControlError::Io { .. }), "{e}");
        assert_eq!(c.router().snapshot().version().seq, 1, "nothing swapped");
        assert_eq!(owner(&c, "bob@example.com"), "old");
        assert_eq!(f.text(), ROUTES, "the written routes file was put back");
    }

    #[test]
    fn a_rollback_whose_restore_fails_leaves_files_and_table_as_they_were() {
        let (f, csv) = Fixture::with_csv();
        let c = f.start();
        // Version 2 changes both files.
        let v2_routes = f.text().replace(
            "[sites.berlin]\nowner = \"old\"",
            "[sites.berlin]\nowner = \"new\"",
        );
        let v2_csv = "address,site\ncarol@example.com,berlin\ndave@example.com,berlin\n";
        std::fs::write(f.routes(), &v2_routes).unwrap();
        std::fs::write(&csv, v2_csv).unwrap();
        c.reload(false, "test").unwrap();
        // The CSV cannot be replaced: its temporary file's name is taken by a directory.
        let blocker = f
            .dir
            .path()
            .join(format!(".more.csv.tmp.{}", std::process::id()));
        std::fs::create_dir(&blocker).unwrap();
        let e = c.rollback(None, false, "test").unwrap_err();
        assert!(matches!(e, ControlError::Io { .. }), "{e}");
        assert_eq!(c.router().snapshot().version().seq, 2, "still version 2");
        assert_eq!(owner(&c, "dave@example.com"), "new");
        assert_eq!(f.text(), v2_routes, "the restored routes file was put back");
        assert_eq!(std::fs::read_to_string(&csv).unwrap(), v2_csv);
        assert_eq!(c.history(10).len(), 2, "no version recorded");
        std::fs::remove_dir(&blocker).unwrap();
        c.rollback(None, false, "test").unwrap();
        assert_eq!(owner(&c, "bob@example.com"), "old");
    }

    #[test]
    fn a_state_dir_that_cannot_keep_blobs_changes_nothing() {
        let f = Fixture::new();
        let c = f.start();
        let blobs = f.state().join("blobs");
        std::fs::remove_dir_all(&blobs).unwrap();
        std::fs::write(&blobs, "not a directory").unwrap();
        assert!(c.cutover(&berlin("new"), false, false, "test").is_err());
        assert_eq!(c.router().snapshot().version().seq, 1);
        assert_eq!(f.text(), ROUTES);
        assert_eq!(c.history(10).len(), 1, "no version recorded");
    }

    #[test]
    fn the_bytes_compiled_are_the_bytes_kept_when_a_file_is_replaced_mid_change() {
        let f = Fixture::new();
        let c = f.start();
        let moved = ROUTES.replace(
            "[sites.berlin]\nowner = \"old\"",
            "[sites.berlin]\nowner = \"new\"",
        );
        std::fs::write(f.routes(), &moved).unwrap();
        // The file is replaced right after the reload read it (an editor saving again).
        let later = format!("# saved again\n{moved}");
        let routes = f.routes();
        let mut read = |p: &Path| {
            let bytes = std::fs::read(p)?;
            if p == routes.as_path() {
                std::fs::write(p, &later)?;
            }
            Ok(bytes)
        };
        let r = c.reload_with(false, "test", &mut read).unwrap();
        assert!(r.applied && r.changed);
        let entry = &c.history(1)[0];
        let id = &entry.files[&f.routes().display().to_string()];
        assert_eq!(
            id,
            &blob_id(moved.as_bytes()),
            "the compiled bytes are kept"
        );
        assert_eq!(
            std::fs::read(f.state().join("blobs").join(id)).unwrap(),
            moved.as_bytes()
        );
        // The later save is a pending edit, not part of the version.
        let e = c.cutover(&berlin("old"), false, false, "test").unwrap_err();
        assert!(matches!(e, ControlError::Pending(_)), "{e}");
    }

    #[test]
    fn restart_identity_compares_the_full_hash_and_the_files() {
        let f = Fixture::new();
        drop(f.start());
        assert_eq!(f.start().router().snapshot().version().seq, 1, "same files");
        // An entry whose short hash matches but whose full hash does not is another table.
        let h = f.state().join("history.jsonl");
        let mut e: HistoryEntry =
            serde_json::from_str(std::fs::read_to_string(&h).unwrap().trim()).unwrap();
        let full = u64::from_str_radix(e.hash.as_deref().unwrap(), 16).unwrap();
        e.hash = Some(format!("{:016x}", full ^ 1));
        std::fs::write(&h, format!("{}\n", serde_json::to_string(&e).unwrap())).unwrap();
        let c = f.start();
        assert_eq!(c.router().snapshot().version().seq, 2);
        drop(c);
        // A comment changes no route but changes the files: kept as a version of its own,
        // so the active version's files are what is on disk.
        std::fs::write(f.routes(), format!("# reviewed\n{ROUTES}")).unwrap();
        let c = f.start();
        assert_eq!(c.router().snapshot().version().seq, 3);
        assert_eq!(c.history(1)[0].what, "start");
        c.cutover(&berlin("new"), false, false, "test").unwrap();
    }

    #[test]
    fn a_seed_is_copied_with_its_imports_once_and_only_when_it_compiles() {
        let f = Fixture::new();
        let etc = f.dir.path().join("etc");
        std::fs::create_dir_all(etc.join("lists")).unwrap();
        std::fs::write(
            etc.join("routes.toml"),
            format!("{ROUTES}\n[import]\ncsv = [\"lists/more.csv\"]\n"),
        )
        .unwrap();
        std::fs::write(
            etc.join("lists/more.csv"),
            "address,site\ncarol@example.com,berlin\n",
        )
        .unwrap();
        let targets = KnownTargets::Exactly(vec!["old".into(), "new".into()]);
        let var = f.dir.path().join("var/lib/coexist/routes.toml");
        let written = seed_routes(&var, &etc.join("routes.toml"), &targets).unwrap();
        assert_eq!(written.len(), 2, "{written:?}");
        let var_dir = var.parent().unwrap();
        assert_eq!(
            std::fs::read_to_string(var_dir.join("lists/more.csv")).unwrap(),
            "address,site\ncarol@example.com,berlin\n"
        );
        let c = Control::start(&var, targets.clone(), 10, &var_dir.join("state")).unwrap();
        assert_eq!(owner(&c, "carol@example.com"), "old");
        c.cutover(&berlin("new"), false, false, "test").unwrap();
        // The copy is the operator's now: a second start does not seed over it.
        assert!(
            seed_routes(&var, &etc.join("routes.toml"), &targets)
                .unwrap()
                .is_empty()
        );
        assert!(
            std::fs::read_to_string(&var)
                .unwrap()
                .contains("owner = \"new\"")
        );
        // A live CSV left behind with edits is not overwritten by seeding again.
        std::fs::remove_file(&var).unwrap();
        std::fs::write(
            var_dir.join("lists/more.csv"),
            "address,site\nedited@example.com,berlin\n",
        )
        .unwrap();
        let e = seed_routes(&var, &etc.join("routes.toml"), &targets).unwrap_err();
        assert!(e.to_string().contains("differs from the seed"), "{e}");
        assert!(!var.exists());
        // An import outside the seed's directory is not copied anywhere.
        std::fs::write(
            etc.join("../escape.csv"),
            "address,site\ncarol@example.com,berlin\n",
        )
        .unwrap();
        std::fs::write(
            etc.join("routes.toml"),
            format!("{ROUTES}\n[import]\ncsv = [\"../escape.csv\"]\n"),
        )
        .unwrap();
        let e = seed_routes(
            &f.dir.path().join("x/routes.toml"),
            &etc.join("routes.toml"),
            &targets,
        )
        .unwrap_err();
        assert!(e.to_string().contains("must lie in or below"), "{e}");
        // A seed that does not compile writes nothing.
        std::fs::write(etc.join("routes.toml"), "[sites.x]\nowner = \"moon\"\n").unwrap();
        let other = f.dir.path().join("other/routes.toml");
        let e = seed_routes(&other, &etc.join("routes.toml"), &targets).unwrap_err();
        assert!(matches!(e, ControlError::Rejected(_)), "{e}");
        assert!(!other.exists());
    }

    #[test]
    fn a_rollback_never_overwrites_an_edited_file_the_active_version_does_not_have() {
        let (f, csv) = Fixture::with_csv();
        let c = f.start();
        // Version 2 drops the import; then the operator edits the CSV it no longer reads.
        std::fs::write(f.routes(), ROUTES).unwrap();
        c.reload(false, "test").unwrap();
        let edited = "address,site\ncarol@example.com,berlin\nzoe@example.com,berlin\n";
        std::fs::write(&csv, edited).unwrap();
        let e = c.rollback(Some("1"), false, "test").unwrap_err();
        let ControlError::Pending(p) = &e else {
            panic!("{e}")
        };
        assert!(p.files.iter().any(|f| f.ends_with("more.csv")), "{e}");
        assert_eq!(std::fs::read_to_string(&csv).unwrap(), edited);
        let r = c.rollback(Some("1"), true, "test").unwrap();
        assert_eq!(r.kept.len(), 1, "{r:?}");
        assert_eq!(std::fs::read_to_string(&r.kept[0].kept_at).unwrap(), edited);
    }

    #[test]
    fn a_torn_history_line_does_not_swallow_the_next_entry() {
        let f = Fixture::new();
        let c = f.start();
        let h = f.state().join("history.jsonl");
        // A crash in the middle of an append left half a line.
        let mut text = std::fs::read_to_string(&h).unwrap();
        text.push_str("{\"version\":\"9-dead");
        std::fs::write(&h, text).unwrap();
        c.cutover(&berlin("new"), false, false, "test").unwrap();
        let whats: Vec<String> = c.history(10).into_iter().map(|e| e.what).collect();
        assert_eq!(whats, ["cutover site berlin -> new", "start"]);
    }

    #[test]
    fn a_rollback_to_a_version_with_the_active_files_changes_nothing() {
        let f = Fixture::new();
        let c = f.start();
        c.cutover(&berlin("new"), false, false, "test").unwrap();
        c.cutover(&berlin("old"), false, false, "test").unwrap();
        assert_eq!(f.text(), ROUTES);
        let r = c.rollback(Some("1"), false, "test").unwrap();
        assert!(!r.changed && !r.applied, "{r:?}");
        assert_eq!(c.history(10).len(), 3);
    }

    #[test]
    fn one_file_has_one_name_however_the_path_is_spelt() {
        let f = Fixture::new();
        drop(f.start());
        // The same routes file through a different spelling of its path.
        let other = f.dir.path().join(".").join("routes.toml");
        let c = Control::start(
            &other,
            KnownTargets::Exactly(vec!["old".into(), "new".into()]),
            10,
            &f.state(),
        )
        .unwrap();
        assert_eq!(c.history(10).len(), 1, "no spurious start version");
        c.cutover(&berlin("new"), false, false, "test").unwrap();
    }

    #[test]
    fn numbers_continue_above_every_kept_version_after_a_rollback_and_restart() {
        let f = Fixture::new();
        let c = f.start();
        c.cutover(&berlin("new"), false, false, "test").unwrap();
        c.rollback(None, false, "test").unwrap();
        assert_eq!(c.router().snapshot().version().seq, 1);
        drop(c);
        let c = f.start();
        assert_eq!(c.router().snapshot().version().seq, 1);
        let r = c.cutover(&berlin("new"), false, false, "test").unwrap();
        assert_eq!(r.to.seq, 3, "2 is taken by the first cutover");
    }
}
