//! The `coexist` command line. The only place `anyhow` is used.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
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

#[derive(Subcommand)]
enum Command {
    /// Run the proxy until SIGTERM/SIGINT; SIGHUP reloads the routing table.
    Serve {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Run the proxy with built-in demo OLD and NEW mail servers and the sample tables.
    Demo {
        /// Use this config instead of the built-in samples (its targets' SMTP addresses
        /// become demo servers).
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Validate the config and routing table; print a summary.
    Check {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Print mailbox, site, owner target and table version for each address, GUID or login.
    Lookup {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
        #[arg(required = true)]
        addresses: Vec<String>,
    },
    /// Move a site (or one mailbox, with --mailbox) to a target on the running proxy.
    Cutover {
        /// The site to move.
        #[arg(required_unless_present = "mailbox", conflicts_with = "mailbox")]
        site: Option<String>,
        /// Move one mailbox (a pilot user) instead of a site.
        #[arg(long)]
        mailbox: Option<String>,
        /// The target that owns it from now on.
        #[arg(long)]
        to: String,
        /// Show what would move without changing anything.
        #[arg(long)]
        dry_run: bool,
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Return the running proxy and the table source to the previous (or named) version.
    Rollback {
        #[arg(long)]
        to: Option<String>,
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Re-read the routing table source on the running proxy.
    Reload {
        #[arg(long)]
        dry_run: bool,
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The running proxy: active version, sites and owners, backend health.
    Status {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The spool: split deliveries that a target has not taken yet.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
        #[arg(short, long, default_value = DEFAULT_CONFIG, global = true)]
        config: PathBuf,
        #[arg(long, global = true)]
        json: bool,
    },
    /// Routing table operations.
    Routes {
        #[command(subcommand)]
        command: RoutesCommand,
    },
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Every spooled message: id, age, sender, recipients left, last error.
    List,
    /// One spooled message in full.
    Show { id: String },
    /// Make one message (or all) due now.
    Retry { id: Option<String> },
    /// Remove a message from the spool without delivering it.
    Delete { id: String },
}

#[derive(Subcommand)]
enum RoutesCommand {
    /// What moves between two routing tables (routes.toml files).
    Diff {
        /// Validate target names against this config (default: accept any target name).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// List every moved mailbox, not only the first --limit.
        #[arg(long)]
        all: bool,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long)]
        json: bool,
        old: PathBuf,
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
    let result = match cli.command {
        Command::Serve { config } => serve(&config),
        Command::Demo { config } => runtime().and_then(|rt| {
            rt.block_on(coexist::demo::run(config.as_deref()))
                .map_err(anyhow::Error::from)
        }),
        Command::Check { config, json } => check(&config, json),
        Command::Cutover {
            site,
            mailbox,
            to,
            dry_run,
            config,
            json,
        } => {
            let body = match (site, mailbox) {
                (_, Some(m)) => json!({"mailbox": m, "to": to}),
                (Some(s), None) => json!({"site": s, "to": to}),
                (None, None) => unreachable!("clap requires one"),
            };
            let q = if dry_run { "?dry_run=1" } else { "" };
            admin_change(&config, &format!("/routes/cutover{q}"), &body, json)
        }
        Command::Rollback { to, config, json } => {
            let body = to.map_or_else(|| json!({}), |v| json!({"version": v}));
            admin_change(&config, "/routes/rollback", &body, json)
        }
        Command::Reload {
            dry_run,
            config,
            json,
        } => {
            let q = if dry_run { "?dry_run=1" } else { "" };
            admin_change(&config, &format!("/routes/reload{q}"), &json!({}), json)
        }
        Command::Status { config, json } => status(&config, json),
        Command::Queue {
            command,
            config,
            json,
        } => queue(&config, &command, json),
        Command::Lookup {
            config,
            json,
            addresses,
        } => lookup(&config, json, &addresses),
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
        } => diff(config.as_deref(), &old, &new, (!all).then_some(limit), json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Reported>() => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("coexist: {e:#}");
            ExitCode::FAILURE
        }
    }
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
                    // Errors are logged by reload; the active table keeps serving.
                    let _ = running.reload();
                }
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        tracing::info!("shutting down: no new connections, draining open sessions");
        let left = running.shutdown(std::time::Duration::from_secs(30)).await;
        if left > 0 {
            tracing::warn!(
                open = left,
                "drain deadline passed; closing remaining sessions"
            );
        }
        Ok(())
    })
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
            base: format!("http://{}", cfg.admin.listen),
            token,
        })
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let actor = format!(
            "{}@{} (cli)",
            std::env::var("USER").unwrap_or_else(|_| "unknown".into()),
            std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into())
        );
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
                let mut msg = v["error"].as_str().unwrap_or("error").to_string();
                for e in v["errors"].as_array().into_iter().flatten() {
                    let _ = write!(
                        msg,
                        "\n{}:{}: {}",
                        e["file"].as_str().unwrap_or("?"),
                        e["line"],
                        e["message"].as_str().unwrap_or("")
                    );
                }
                Err(anyhow::anyhow!("{msg} (HTTP {code})"))
            }
            Err(e) => Err(anyhow::anyhow!(
                "cannot reach the running proxy's admin API at {}: {e}",
                self.base
            )),
        }
    }
}

fn admin_change(config: &Path, path: &str, body: &serde_json::Value, json: bool) -> Result<()> {
    let client = AdminClient::from_config(config)?;
    let v = client.call("POST", path, Some(body))?;
    if json {
        println!("{v:#}");
        return Ok(());
    }
    let applied = v["applied"].as_bool().unwrap_or(false);
    println!(
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
    print!("{diff}");
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
        println!("{v:#}");
        return Ok(());
    }
    let msgs = v["messages"].as_array().cloned().unwrap_or_default();
    if msgs.is_empty() {
        println!("the spool is empty");
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
        println!(
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

fn status(config: &Path, json: bool) -> Result<()> {
    let client = AdminClient::from_config(config)?;
    let v = client.call("GET", "/status", None)?;
    if json {
        println!("{v:#}");
        return Ok(());
    }
    println!(
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
    println!("sites (mailboxes per target; recipients per target, last 30 min):");
    for s in v["sites"].as_array().into_iter().flatten() {
        println!(
            "  {:<24} owner {:<10} {} mailboxes",
            s["name"].as_str().unwrap_or("?"),
            s["owner"].as_str().unwrap_or("?"),
            s["mailboxes"]
        );
        println!("    mailboxes   {}", split(&s["mailboxes_by_target"]));
        println!("    recipients  {}", split(&s["recipients_30m"]));
    }
    let pinned = v["pinned"].as_array().map_or(&[][..], Vec::as_slice);
    println!(
        "pinned away from their site's owner: {}",
        v["pinned_total"].as_u64().unwrap_or(0)
    );
    for m in pinned {
        println!(
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
        println!("  … and {more} more");
    }
    println!(
        "traffic (accepted recipients per target, last {} min):",
        v["traffic"]["window_minutes"].as_u64().unwrap_or(30)
    );
    let traffic = v["traffic"]["targets"].as_object();
    if traffic.is_none_or(serde_json::Map::is_empty) {
        println!("  none");
    }
    for (t, x) in traffic.into_iter().flatten() {
        let last = x["per_minute"]
            .as_array()
            .and_then(|m| m.last())
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        println!(
            "  {t:<10} {:>8} recipients, {last} in the current minute",
            x["recipients"].as_u64().unwrap_or(0)
        );
    }
    println!("targets:");
    for t in v["targets"].as_array().into_iter().flatten() {
        for s in t["smtp"].as_array().into_iter().flatten() {
            println!(
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
    if json {
        println!(
            "{}",
            json!({ "ok": false, "errors": d.errors, "more_errors": d.more })
        );
    } else {
        eprintln!("{d}");
        eprintln!("{} error{}", d.len(), if d.len() == 1 { "" } else { "s" });
    }
    Reported.into()
}

fn load(config: &Path, json: bool) -> Result<(Config, RoutingTable)> {
    let cfg = Config::load(config).map_err(|d| report(&d, json))?;
    let table = load_routes(&cfg.routes.path, &cfg.known_targets())
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
            "routes": cfg.routes.path.display().to_string(),
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
        println!("{out:#}");
        return Ok(());
    }
    println!("config {}: ok", cfg.path.display());
    println!(
        "routes {}: ok, version {}",
        cfg.routes.path.display(),
        table.version()
    );
    println!(
        "targets: {}",
        table.target_names().collect::<Vec<_>>().join(", ")
    );
    println!("domains:");
    for d in table.domains() {
        println!(
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
    println!("sites:");
    for s in table.sites() {
        println!(
            "  {:<24} owner {:<10} {} mailboxes",
            s.name, s.owner, s.mailboxes
        );
    }
    println!(
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
    if json {
        println!("{:#}", serde_json::Value::Array(results));
        return Ok(());
    }
    for r in results {
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
                "{}: no mailbox has this login, version {}",
                s("query"),
                s("version")
            ),
            _ => format!(
                "{}: not ours (no routed domain; relay denied), version {}",
                s("query"),
                s("version")
            ),
        };
        println!("{line}");
    }
    Ok(())
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
        println!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        print!("{d}");
    }
    Ok(())
}
