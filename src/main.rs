//! The `coexist` command line. The only place `anyhow` is used.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use coexist::config::{Config, DEFAULT_CONFIG};
use coexist::route::{Diagnostics, KnownTargets, LoadError, RoutingTable, TableDiff, load_routes};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "coexist",
    version,
    about = "SMTP + HTTPS mail-routing coexistence proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `-c/--config`, the same for every command that reads the config.
#[derive(Args)]
struct ConfigArg {
    /// The config file (coexist.toml); paths in it are relative to its directory, the
    /// default is relative to the current directory. The container image sets
    /// COEXIST_CONFIG=/etc/coexist/coexist.toml.
    #[arg(
        short,
        long,
        value_name = "FILE",
        default_value = DEFAULT_CONFIG,
        env = "COEXIST_CONFIG"
    )]
    config: PathBuf,
}

/// `--json`, the same for every command that has a machine-readable form.
#[derive(Args)]
struct JsonArg {
    /// Print JSON instead of text (for scripts).
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy until SIGTERM/SIGINT; SIGHUP reloads the routing table.
    Serve {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Run the proxy with built-in demo OLD and NEW mail servers and the sample tables.
    Demo {
        /// Use this config instead of the built-in samples (its targets' SMTP addresses
        /// become demo servers).
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Put the proxy's SMTP listener and admin API (status page) on this address
        /// instead of 127.0.0.1, e.g. 0.0.0.0 in a container; the demo mail servers stay
        /// on loopback. Off loopback, changes through the admin API need the token the demo
        /// writes beside its config.
        #[arg(long, value_name = "IP", conflicts_with = "config")]
        listen: Option<std::net::IpAddr>,
    },
    /// Validate the config and routing table; print a summary.
    Check {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Print mailbox, site, owner target and table version for each address, GUID or login.
    Lookup {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        json: JsonArg,
        /// Addresses, `<guid>@domain` or bare GUIDs, or logins (`DOMAIN\user`, UPN).
        #[arg(required = true, value_name = "ADDRESS")]
        addresses: Vec<String>,
    },
    /// Move a site (or one mailbox, with --mailbox) to a target on the running proxy.
    Cutover {
        /// The site to move.
        #[arg(required_unless_present = "mailbox", conflicts_with = "mailbox")]
        site: Option<String>,
        /// Move one mailbox (a pilot user) instead of a site.
        #[arg(long, value_name = "ADDRESS")]
        mailbox: Option<String>,
        /// The target that owns it from now on.
        #[arg(long, value_name = "TARGET")]
        to: String,
        /// Show what would move without changing anything.
        #[arg(long)]
        dry_run: bool,
        /// Proceed although the source files were edited by hand and not reloaded: the
        /// edited files are set aside in the state directory (their path is printed) and
        /// the change is made to the active version's files.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Return the running proxy and the table source to the previous (or named) version.
    Rollback {
        /// The version to return to (default: the one active before the current one).
        #[arg(long, value_name = "VERSION")]
        to: Option<String>,
        /// Proceed although the source files were edited by hand and not reloaded: the
        /// edited files are set aside in the state directory (their path is printed).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Re-read the routing table source on the running proxy.
    Reload {
        /// Validate and show what would change without applying it.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        json: JsonArg,
    },
    /// The running proxy: active version, sites and owners, backend health.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Exit 0 if the running proxy is ready (its admin API's /readyz, at the address the
    /// config names), 1 if not: for container health checks and scripts.
    Health {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// The spool: split deliveries that a target has not taken yet.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
        /// The config file (coexist.toml); paths in it are relative to its directory, the
        /// default is relative to the current directory.
        #[arg(
            short,
            long,
            value_name = "FILE",
            default_value = DEFAULT_CONFIG,
            env = "COEXIST_CONFIG",
            global = true
        )]
        config: PathBuf,
        /// Print JSON instead of text (for scripts).
        #[arg(long, global = true)]
        json: bool,
    },
    /// Routing table operations.
    Routes {
        #[command(subcommand)]
        command: RoutesCommand,
    },
    /// Print a shell completion script to stdout.
    #[command(after_help = "Install, e.g.:\n  \
        coexist completions bash > /etc/bash_completion.d/coexist\n  \
        coexist completions zsh > /usr/local/share/zsh/site-functions/_coexist\n  \
        coexist completions fish > ~/.config/fish/completions/coexist.fish")]
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) to stdout, or write one page per command with --out.
    #[command(after_help = "Read it with `coexist man | man -l -`.")]
    Man {
        /// Write coexist.1 and a coexist-COMMAND.1 page for every command into this
        /// directory instead.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Every spooled message: id, age, sender, recipients left, last error.
    List,
    /// One spooled message in full.
    Show {
        /// The message's id, as `queue list` shows it.
        id: String,
    },
    /// Make one message (or all) due now.
    Retry {
        /// The message's id (default: every spooled message).
        id: Option<String>,
    },
    /// Remove a message from the spool without delivering it.
    Delete {
        /// The message's id, as `queue list` shows it.
        id: String,
    },
}

#[derive(Subcommand)]
enum RoutesCommand {
    /// What moves between two routing tables (routes.toml files).
    Diff {
        /// Validate target names against this config (default: accept any target name).
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// List every moved mailbox, not only the first --limit.
        #[arg(long)]
        all: bool,
        /// How many moved mailboxes to list.
        #[arg(long, value_name = "N", default_value_t = 20)]
        limit: usize,
        #[command(flatten)]
        json: JsonArg,
        /// The routing table as it is (routes.toml).
        old: PathBuf,
        /// The routing table as it would be.
        new: PathBuf,
    },
}

/// A failure already reported in full (e.g. every validation error printed).
#[derive(Debug)]
struct Reported;

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("errors reported above")
    }
}

impl std::error::Error for Reported {}

/// Whoever reads our stdout has gone (`coexist status | head -1`): nothing more to say.
#[derive(Debug)]
struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// A failed write to stdout. Rust ignores SIGPIPE, so `println!` would panic on a closed
/// pipe; every line goes through [`outln!`] and a closed pipe ends the command quietly.
fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        StdoutClosed.into()
    } else {
        anyhow::Error::new(e).context("writing to stdout")
    }
}

/// `println!` that returns a closed pipe as an error instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout(), $($arg)*).map_err(stdout_error)?
    };
}

/// `print!` that returns a closed pipe as an error instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {
        write!(std::io::stdout(), $($arg)*).map_err(stdout_error)?
    };
}

/// The error and each cause not already part of its message. Library errors carry their
/// cause in their own text (so a log line is complete) and also as `source()`: printing
/// the whole chain would say "Address already in use" twice.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            let _ = write!(text, ": {c}");
        }
    }
    text
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A server logs what it does; a one-shot command only what went wrong.
    let default_level = if matches!(cli.command, Command::Serve { .. }) {
        "info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("COEXIST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    if std::env::var("COEXIST_LOG_FORMAT").is_ok_and(|f| f == "json") {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .init();
    }
    let result = run(cli.command).and_then(|()| std::io::stdout().flush().map_err(stdout_error));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Like `cat` or `grep` in a pipeline whose reader stopped early, but without the
        // SIGPIPE status: the output that was wanted has been read.
        Err(e) if e.is::<StdoutClosed>() => ExitCode::SUCCESS,
        Err(e) if e.is::<Reported>() => ExitCode::FAILURE,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "coexist: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Serve { config } => serve(&config.config),
        Command::Demo { config, listen } => runtime().and_then(|rt| {
            rt.block_on(coexist::demo::run(config.as_deref(), listen))
                .map_err(anyhow::Error::from)
        }),
        Command::Check { config, json } => check(&config.config, json.json),
        Command::Cutover {
            site,
            mailbox,
            to,
            dry_run,
            force,
            config,
            json,
        } => {
            let body = match (site, mailbox) {
                (_, Some(m)) => json!({"mailbox": m, "to": to}),
                (Some(s), None) => json!({"site": s, "to": to}),
                (None, None) => unreachable!("clap requires one"),
            };
            let q = query(&[("dry_run", dry_run), ("force", force)]);
            admin_change(
                &config.config,
                &format!("/routes/cutover{q}"),
                &body,
                json.json,
            )
        }
        Command::Rollback {
            to,
            force,
            config,
            json,
        } => {
            let body = to.map_or_else(|| json!({}), |v| json!({"version": v}));
            let q = query(&[("force", force)]);
            admin_change(
                &config.config,
                &format!("/routes/rollback{q}"),
                &body,
                json.json,
            )
        }
        Command::Reload {
            dry_run,
            config,
            json,
        } => {
            let q = if dry_run { "?dry_run=1" } else { "" };
            admin_change(
                &config.config,
                &format!("/routes/reload{q}"),
                &json!({}),
                json.json,
            )
        }
        Command::Status { config, json } => status(&config.config, json.json),
        Command::Health { config } => health(&config.config),
        Command::Queue {
            command,
            config,
            json,
        } => queue(&config, &command, json),
        Command::Lookup {
            config,
            json,
            addresses,
        } => lookup(&config.config, json.json, &addresses),
        Command::Routes {
            command:
                RoutesCommand::Diff {
                    config,
                    all,
                    limit,
                    json,
                    old,
                    new,
                },
        } => diff(
            config.as_deref(),
            &old,
            &new,
            (!all).then_some(limit),
            json.json,
        ),
        Command::Completions { shell } => {
            // Generated into memory first: clap_complete panics when its writer fails.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "coexist", &mut script);
            std::io::stdout().write_all(&script).map_err(stdout_error)
        }
        Command::Man { out } => man(out.as_deref()),
    }
}

/// The manual: `coexist.1` to stdout, or every page into `dir`.
fn man(dir: Option<&Path>) -> Result<()> {
    let cmd = Cli::command();
    match dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("writing man pages to {}", dir.display()))?;
            outln!("man pages written to {}", dir.display());
        }
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut page)?;
            std::io::stdout().write_all(&page).map_err(stdout_error)?;
        }
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    // Benchmarks compare equal worker counts with nginx/HAProxy.
    let workers = std::env::var("COEXIST_WORKER_THREADS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| *n > 0);
    let mut b = if workers == Some(1) {
        // One worker: the single-threaded scheduler does the same without cross-thread
        // synchronisation.
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = workers {
            b.worker_threads(n);
        }
        b
    };
    Ok(b.enable_all().build()?)
}

fn serve(config: &Path) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let cfg = Config::load(config).map_err(|d| report(&d, false))?;
    runtime()?.block_on(async move {
        let running = coexist::app::Running::start(cfg).await?;
        let table = running.router.snapshot();
        for (mode, addr) in &running.smtp_addrs {
            tracing::info!(%addr, ?mode, "SMTP listener ready");
        }
        tracing::info!(
            version = %table.version(),
            mailboxes = table.mailbox_count(),
            "serving"
        );
        drop(table);
        let mut hup = signal(SignalKind::hangup())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    // Compiling and fsyncing block: off the runtime's worker threads.
                    let control = std::sync::Arc::clone(&running.control);
                    match tokio::task::spawn_blocking(move || control.reload(false, "SIGHUP")).await {
                        Ok(Ok(r)) if !r.changed => tracing::info!("SIGHUP: nothing to change"),
                        // Applied ones are logged by the swap, rejected ones with every error.
                        Ok(Ok(_) | Err(coexist::control::ControlError::Rejected(_))) => {}
                        Ok(Err(e)) => tracing::error!("SIGHUP reload failed, the active table keeps serving: {e}"),
                        Err(e) => tracing::error!("SIGHUP reload did not finish: {e}"),
                    }
                }
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        tracing::info!("shutting down: no new connections, draining open sessions");
        let left = running.shutdown(coexist::app::DRAIN_DEADLINE).await;
        if left > 0 {
            tracing::warn!(
                open = left,
                "drain deadline passed; closing remaining sessions"
            );
        }
        Ok(())
    })
}

/// Who runs this command, for the history's "by": `$USER`, else `$LOGNAME`, else the
/// name of our uid. Cron jobs, `env -i`, `su` without `-` and many service managers leave
/// `$USER` unset or stale, and "unknown" in the history of a cutover helps nobody.
fn operator() -> String {
    for var in ["USER", "LOGNAME"] {
        if let Ok(v) = std::env::var(var)
            && !v.is_empty()
        {
            return v;
        }
    }
    // The real uid (the first of four on the line): `sudo` sets it to root's too.
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().next())
                .map(str::to_string)
        });
    let Some(uid) = uid else {
        return "unknown".into();
    };
    // Users only in LDAP/NSS are not in /etc/passwd: their uid still names them.
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|p| user_name(&p, &uid))
        .unwrap_or_else(|| format!("uid {uid}"))
}

/// The name of `uid` in a passwd(5) file.
fn user_name(passwd: &str, uid: &str) -> Option<String> {
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        (f.nth(1)? == uid && !name.is_empty()).then(|| name.to_string())
    })
}

/// This host's name: `$HOSTNAME` is a shell variable that is rarely exported.
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "localhost".into())
}

/// The running proxy's admin API, as its config names it.
struct AdminClient {
    base: String,
    token: Option<String>,
}

impl AdminClient {
    fn from_config(config: &Path) -> Result<Self> {
        let cfg = Config::load(config).map_err(|d| report(&d, false))?;
        let token = match &cfg.admin.token_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("reading admin token {}", p.display()))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        Ok(Self {
            base: format!("http://{}", coexist::config::connectable(cfg.admin.listen)),
            token,
        })
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let actor = format!("{}@{} (cli)", operator(), hostname());
        let mut r = ureq::request(method, &format!("{}{path}", self.base))
            .timeout(std::time::Duration::from_secs(120))
            .set("X-Coexist-Actor", &actor);
        if let Some(t) = &self.token {
            r = r.set("Authorization", &format!("Bearer {t}"));
        }
        r
    }

    /// The JSON answer, or the API's error (its `errors` listed one per line).
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let req = self.request(method, path);
        let resp = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match resp {
            Ok(r) => Ok(r.into_json()?),
            Err(ureq::Error::Status(code, r)) => {
                let v: serde_json::Value = r.into_json().unwrap_or_default();
                // The status belongs to the headline: glued to the last line it would read
                // as part of that `file:line: message`.
                let error = v["error"].as_str().unwrap_or("error");
                let (head, rest) = error.split_once('\n').unwrap_or((error, ""));
                let mut msg = format!("{head} (HTTP {code})");
                if !rest.is_empty() {
                    msg.push('\n');
                    msg.push_str(rest);
                }
                for e in v["errors"].as_array().into_iter().flatten() {
                    let _ = write!(
                        msg,
                        "\n{}:{}: {}",
                        e["file"].as_str().unwrap_or("?"),
                        e["line"],
                        e["message"].as_str().unwrap_or("")
                    );
                }
                Err(anyhow::anyhow!(msg))
            }
            Err(e) => Err(self.unreachable(&e)),
        }
    }

    fn unreachable(&self, e: &ureq::Error) -> anyhow::Error {
        anyhow::anyhow!(
            "cannot reach the running proxy's admin API at {}: {e}",
            self.base
        )
    }
}

/// `?a=1&b=1` for the flags that are set.
fn query(flags: &[(&str, bool)]) -> String {
    let set: Vec<String> = flags
        .iter()
        .filter(|(_, on)| *on)
        .map(|(name, _)| format!("{name}=1"))
        .collect();
    if set.is_empty() {
        String::new()
    } else {
        format!("?{}", set.join("&"))
    }
}

fn admin_change(config: &Path, path: &str, body: &serde_json::Value, json: bool) -> Result<()> {
    let client = AdminClient::from_config(config)?;
    let v = client.call("POST", path, Some(body))?;
    if json {
        outln!("{v:#}");
        return Ok(());
    }
    for k in v["kept"].as_array().into_iter().flatten() {
        outln!(
            "{} was edited by hand and not reloaded: kept as {}",
            k["file"].as_str().unwrap_or("?"),
            k["kept_at"].as_str().unwrap_or("?")
        );
    }
    if v["changed"] == false {
        outln!(
            "{}: nothing to change, version {} stays active",
            v["what"].as_str().unwrap_or("change"),
            v["from"].as_str().unwrap_or("?"),
        );
        return Ok(());
    }
    let applied = v["applied"].as_bool().unwrap_or(false);
    outln!(
        "{}: {} {} -> {}",
        v["what"].as_str().unwrap_or("change"),
        if applied {
            "applied, version"
        } else {
            "dry run, nothing changed; version would go"
        },
        v["from"].as_str().unwrap_or("?"),
        v["to"].as_str().unwrap_or("?"),
    );
    let diff: TableDiff =
        serde_json::from_value(v["diff"].clone()).context("reading the diff from the admin API")?;
    out!("{diff}");
    Ok(())
}

fn queue(config: &Path, command: &QueueCommand, json: bool) -> Result<()> {
    let client = AdminClient::from_config(config)?;
    let v = match command {
        QueueCommand::List => client.call("GET", "/queue", None)?,
        QueueCommand::Show { id } => client.call("GET", &format!("/queue/{id}"), None)?,
        QueueCommand::Retry { id } => client.call(
            "POST",
            "/queue/retry",
            Some(&id.as_ref().map_or_else(|| json!({}), |i| json!({"id": i}))),
        )?,
        QueueCommand::Delete { id } => {
            client.call("POST", "/queue/delete", Some(&json!({"id": id})))?
        }
    };
    if json || !matches!(command, QueueCommand::List) {
        outln!("{v:#}");
        return Ok(());
    }
    let msgs = v["messages"].as_array().cloned().unwrap_or_default();
    if msgs.is_empty() {
        outln!("the spool is empty");
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for m in msgs {
        let rcpts: Vec<&str> = m["rcpts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["address"].as_str())
            .collect();
        outln!(
            "{}  age {}s  attempts {}  from <{}>  to {}  last error: {}",
            m["id"].as_str().unwrap_or("?"),
            now.saturating_sub(m["created"].as_u64().unwrap_or(now)),
            m["attempts"],
            m["from"].as_str().unwrap_or(""),
            rcpts.join(", "),
            m["last_error"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

fn health(config: &Path) -> Result<()> {
    let client = AdminClient::from_config(config)?;
    match client
        .request("GET", "/readyz")
        .timeout(std::time::Duration::from_secs(5))
        .call()
    {
        Ok(_) => {
            outln!("ready ({})", client.base);
            Ok(())
        }
        Err(ureq::Error::Status(code, _)) => Err(anyhow::anyhow!(
            "not ready: {}/readyz answered HTTP {code}",
            client.base
        )),
        Err(e) => Err(client.unreachable(&e)),
    }
}

fn status(config: &Path, json: bool) -> Result<()> {
    let client = AdminClient::from_config(config)?;
    let v = client.call("GET", "/status", None)?;
    if json {
        outln!("{v:#}");
        return Ok(());
    }
    outln!(
        "active version {} ({} mailboxes, from {})",
        v["version"].as_str().unwrap_or("?"),
        v["mailboxes"],
        v["source"].as_str().unwrap_or("?")
    );
    // "old 3 (75%), new 1 (25%)": one site's split between the targets.
    let split = |m: &serde_json::Value| {
        let Some(m) = m.as_object() else {
            return String::from("-");
        };
        let total: u64 = m.values().filter_map(serde_json::Value::as_u64).sum();
        m.iter()
            .map(|(t, n)| {
                let n = n.as_u64().unwrap_or(0);
                let pct = (n * 100).checked_div(total).unwrap_or(0);
                format!("{t} {n} ({pct}%)")
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    outln!("sites (mailboxes per target; recipients per target, last 30 min):");
    for s in v["sites"].as_array().into_iter().flatten() {
        outln!(
            "  {:<24} owner {:<10} {} mailboxes",
            s["name"].as_str().unwrap_or("?"),
            s["owner"].as_str().unwrap_or("?"),
            s["mailboxes"]
        );
        outln!("    mailboxes   {}", split(&s["mailboxes_by_target"]));
        outln!("    recipients  {}", split(&s["recipients_30m"]));
    }
    let pinned = v["pinned"].as_array().map_or(&[][..], Vec::as_slice);
    outln!(
        "pinned away from their site's owner: {}",
        v["pinned_total"].as_u64().unwrap_or(0)
    );
    for m in pinned {
        outln!(
            "  {:<40} site {:<16} owner {}",
            m["address"].as_str().unwrap_or("?"),
            m["site"].as_str().unwrap_or("?"),
            m["owner"].as_str().unwrap_or("?")
        );
    }
    if let Some(more) = v["pinned_total"]
        .as_u64()
        .and_then(|n| n.checked_sub(pinned.len() as u64))
        .filter(|&n| n > 0)
    {
        outln!("  … and {more} more");
    }
    outln!(
        "traffic (accepted recipients per target, last {} min):",
        v["traffic"]["window_minutes"].as_u64().unwrap_or(30)
    );
    let traffic = v["traffic"]["targets"].as_object();
    if traffic.is_none_or(serde_json::Map::is_empty) {
        outln!("  none");
    }
    for (t, x) in traffic.into_iter().flatten() {
        let last = x["per_minute"]
            .as_array()
            .and_then(|m| m.last())
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        outln!(
            "  {t:<10} {:>8} recipients, {last} in the current minute",
            x["recipients"].as_u64().unwrap_or(0)
        );
    }
    outln!("targets:");
    for t in v["targets"].as_array().into_iter().flatten() {
        for s in t["smtp"].as_array().into_iter().flatten() {
            outln!(
                "  {:<10} smtp {:<28} {}",
                t["name"].as_str().unwrap_or("?"),
                s["server"].as_str().unwrap_or("?"),
                if s["up"].as_bool() == Some(true) {
                    "up"
                } else {
                    "DOWN"
                }
            );
        }
    }
    Ok(())
}

fn report(d: &Diagnostics, json: bool) -> anyhow::Error {
    // The command fails either way; a closed stdout or stderr only loses the details.
    if json {
        let _ = writeln!(
            std::io::stdout(),
            "{}",
            json!({ "ok": false, "errors": d.errors, "more_errors": d.more })
        );
    } else {
        let _ = writeln!(
            std::io::stderr(),
            "{d}\n{} error{}",
            d.len(),
            if d.len() == 1 { "" } else { "s" }
        );
    }
    Reported.into()
}

fn load(config: &Path, json: bool) -> Result<(Config, RoutingTable)> {
    let cfg = Config::load(config).map_err(|d| report(&d, json))?;
    let table = load_routes(cfg.routes.source_path(), &cfg.known_targets())
        .map_err(|LoadError::Invalid(d)| report(&d, json))?;
    Ok((cfg, table))
}

fn check(config: &Path, json: bool) -> Result<()> {
    let (cfg, table) = load(config, json)?;
    let mut aliases = 0;
    let mut logins = 0;
    let mut guids = 0;
    let mut overridden = 0;
    for m in table.mailboxes() {
        aliases += m.aliases().count();
        logins += m.logins().count();
        guids += usize::from(m.guid().is_some());
        overridden += usize::from(m.owner_overridden());
    }
    if json {
        let out = json!({
            "ok": true,
            "config": cfg.path.display().to_string(),
            "routes": cfg.routes.source_path().display().to_string(),
            "version": table.version(),
            "targets": table.target_names().collect::<Vec<_>>(),
            "domains": table.domains().collect::<Vec<_>>(),
            "sites": table.sites().collect::<Vec<_>>(),
            "mailboxes": table.mailbox_count(),
            "aliases": aliases,
            "logins": logins,
            "guids": guids,
            "owner_overrides": overridden,
        });
        outln!("{out:#}");
        return Ok(());
    }
    outln!("config {}: ok", cfg.path.display());
    outln!(
        "routes {}: ok, version {}",
        cfg.routes.source_path().display(),
        table.version()
    );
    if cfg.routes.source_path() != cfg.routes.path {
        outln!(
            "  (the seed: `serve` copies it to {} on its first start)",
            cfg.routes.path.display()
        );
    }
    outln!(
        "targets: {}",
        table.target_names().collect::<Vec<_>>().join(", ")
    );
    outln!("domains:");
    for d in table.domains() {
        outln!(
            "  {:<24} unknown -> {}{}{}",
            d.name,
            d.unknown,
            if d.case_sensitive {
                ", case-sensitive local parts"
            } else {
                ""
            },
            if d.subaddress_separators.is_empty() {
                String::new()
            } else {
                format!(", subaddress {:?}", d.subaddress_separators)
            }
        );
    }
    outln!("sites:");
    for s in table.sites() {
        outln!(
            "  {:<24} owner {:<10} {} mailboxes",
            s.name,
            s.owner,
            s.mailboxes
        );
    }
    outln!(
        "mailboxes: {} ({aliases} aliases, {logins} logins, {guids} GUIDs, {overridden} with their own owner)",
        table.mailbox_count()
    );
    Ok(())
}

fn lookup(config: &Path, json: bool, addresses: &[String]) -> Result<()> {
    let (_, table) = load(config, json)?;
    let results: Vec<_> = addresses
        .iter()
        .map(|a| coexist::route::explain(&table, a))
        .collect();
    // A typo must not read as "not ours": the answer is printed, and the exit status says
    // that some query was no address at all.
    let invalid = results.iter().any(|r| r["result"] == "invalid");
    let done = || {
        if invalid {
            Err(Reported.into())
        } else {
            Ok(())
        }
    };
    if json {
        outln!("{:#}", serde_json::Value::Array(results));
        return done();
    }
    for r in &results {
        let s = |k: &str| r[k].as_str().unwrap_or("-").to_string();
        let line = match s("result").as_str() {
            "mailbox" => format!(
                "{}: mailbox {} (via {}), site {}, owner {} ({} owner), version {}",
                s("query"),
                s("mailbox"),
                s("via"),
                s("site"),
                s("owner"),
                s("owner_source"),
                s("version")
            ),
            "domain_default" => format!(
                "{}: no such mailbox in {}, domain default -> {}, version {}",
                s("query"),
                s("domain"),
                s("owner"),
                s("version")
            ),
            "reject" => format!(
                "{}: no such mailbox in {}, rejected (550 5.1.1), version {}",
                s("query"),
                s("domain"),
                s("version")
            ),
            "not_found" => format!(
                "{}: no mailbox has this {}, version {}",
                s("query"),
                if s("via") == "guid" { "GUID" } else { "login" },
                s("version")
            ),
            "invalid" => format!("{}: invalid address: {}", s("query"), s("reason")),
            _ => format!(
                "{}: not ours (no routed domain; relay denied), version {}",
                s("query"),
                s("version")
            ),
        };
        outln!("{line}");
    }
    done()
}

fn diff(
    config: Option<&Path>,
    old: &Path,
    new: &Path,
    limit: Option<usize>,
    json: bool,
) -> Result<()> {
    let targets = match config {
        Some(c) => Config::load(c)
            .map_err(|d| report(&d, json))?
            .known_targets(),
        None => KnownTargets::Any,
    };
    let load = |p: &Path| {
        load_routes(p, &targets)
            .map_err(|LoadError::Invalid(d)| report(&d, json))
            .with_context(|| format!("loading {}", p.display()))
    };
    let a = load(old)?;
    let b = load(new)?;
    let d = TableDiff::between(&a, &b, limit);
    if json {
        outln!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        out!("{d}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every argument of every command, with the command's name, depth first.
    fn all_args(cmd: &clap::Command, path: &str, out: &mut Vec<(String, clap::Arg)>) {
        for a in cmd.get_arguments() {
            out.push((path.to_string(), a.clone()));
        }
        for sub in cmd.get_subcommands() {
            all_args(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    /// Commands without an `about`, depth first.
    fn commands(cmd: &clap::Command, out: &mut Vec<String>) {
        for sub in cmd.get_subcommands() {
            if sub.get_about().is_none() {
                out.push(sub.get_name().to_string());
            }
            commands(sub, out);
        }
    }

    #[test]
    fn every_argument_and_command_has_help() {
        let mut cmd = Cli::command();
        cmd.build();
        let mut args = Vec::new();
        all_args(&cmd, "coexist", &mut args);
        let missing: Vec<String> = args
            .iter()
            .filter(|(_, a)| a.get_help().is_none_or(|h| h.to_string().trim().is_empty()))
            .map(|(path, a)| format!("{path} {}", a.get_id()))
            .collect();
        assert!(
            missing.is_empty(),
            "arguments without help text: {missing:?}"
        );
        assert!(args.len() > 30, "walked only {} arguments", args.len());
        let mut no_about = Vec::new();
        commands(&cmd, &mut no_about);
        assert!(no_about.is_empty(), "commands without help: {no_about:?}");
    }

    #[test]
    fn the_operator_is_named_by_passwd_when_the_environment_does_not() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      broken\n\
                      ops:x:1000:1000:Ops,,,:/home/ops:/bin/bash\n";
        assert_eq!(user_name(passwd, "1000").as_deref(), Some("ops"));
        assert_eq!(user_name(passwd, "0").as_deref(), Some("root"));
        assert_eq!(user_name(passwd, "4242"), None);
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let e = anyhow::Error::new(coexist::app::AppError::Bind {
            addr: "127.0.0.1:25".parse().unwrap(),
            source: io,
        });
        let text = error_text(&e);
        assert_eq!(text.matches("address in use").count(), 1, "{text}");
        let e = anyhow::anyhow!("inner cause").context("outer step");
        assert_eq!(error_text(&e), "outer step: inner cause");
    }
}
