//! Reading a routing table source: `routes.toml` plus the CSV files it imports.
//!
//! Both formats feed the same [`TableBuilder`], which owns every validation rule; this
//! module only turns text into fields with line numbers.

use indexmap::IndexMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::normalize::LocalPolicy;
use super::table::{Field, KnownTargets, MailboxSpec, RoutingTable, TableBuilder};
use crate::diagnostics::{Diagnostics, LineIndex, one_line};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoutes {
    #[serde(default)]
    domains: IndexMap<String, Spanned<RawDomain>>,
    #[serde(default)]
    sites: IndexMap<String, Spanned<RawSite>>,
    #[serde(default)]
    mailbox: Vec<RawMailbox>,
    #[serde(default)]
    import: Option<RawImport>,
    /// Per-mailbox owners set by `coexist cutover --mailbox`: applied on top of every source.
    #[serde(default)]
    owners: IndexMap<String, Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDomain {
    unknown: Spanned<String>,
    #[serde(default)]
    case_sensitive: bool,
    #[serde(default)]
    subaddress_separator: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    owner: Spanned<String>,
    #[serde(default)]
    #[allow(dead_code)] // documentation for humans; kept so that it is allowed
    description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMailbox {
    address: Spanned<String>,
    #[serde(default)]
    aliases: Vec<Spanned<String>>,
    site: Spanned<String>,
    #[serde(default)]
    owner: Option<Spanned<String>>,
    #[serde(default)]
    guid: Option<Spanned<String>>,
    #[serde(default)]
    logins: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImport {
    #[serde(default)]
    csv: Vec<Spanned<String>>,
}

/// Why a routing table could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}", .0)]
    Invalid(Diagnostics),
}

impl LoadError {
    pub fn diagnostics(&self) -> &Diagnostics {
        match self {
            LoadError::Invalid(d) => d,
        }
    }
}

/// One source file exactly as a table was compiled from it: what the control plane keeps
/// for a version, so that the kept bytes are the compiled bytes even if the file on disk
/// changes while a change is in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
}

/// Reads a source file's bytes: the disk, or a change's edited text and kept versions.
pub type ReadSource<'a> = dyn FnMut(&Path) -> std::io::Result<Vec<u8>> + 'a;

/// Loads, validates and compiles the table whose source is `path`.
pub fn load_routes(path: &Path, targets: &KnownTargets) -> Result<RoutingTable, LoadError> {
    compile_routes(path, targets, &mut |p: &Path| std::fs::read(p)).map(|(t, _)| t)
}

/// Compiles a routes file's `text` as if it were at `path` (CSV imports are read relative to
/// it): how a change is validated before it is written.
pub fn load_routes_text(
    path: &Path,
    text: &str,
    targets: &KnownTargets,
) -> Result<RoutingTable, LoadError> {
    let mut read = |p: &Path| {
        if p == path {
            Ok(text.as_bytes().to_vec())
        } else {
            std::fs::read(p)
        }
    };
    compile_routes(path, targets, &mut read).map(|(t, _)| t)
}

/// Compiles the table whose routes file is `path`, reading every file (the routes file and
/// its CSV imports) once through `read`, and returns the bytes it compiled, file by file
/// (routes file first).
pub fn compile_routes(
    path: &Path,
    targets: &KnownTargets,
    read: &mut ReadSource<'_>,
) -> Result<(RoutingTable, Vec<SourceFile>), LoadError> {
    let mut b = TableBuilder::new(targets);
    b.set_source(path.display().to_string());
    let file = b.add_file(path);
    let text = match read(path).and_then(|bytes| {
        String::from_utf8(bytes)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()))
    }) {
        Ok(t) => t,
        Err(e) => {
            b.error(file, 0, format!("cannot read: {e}"));
            return Err(LoadError::Invalid(finish_errors(b)));
        }
    };
    let lines = LineIndex::new(&text);
    let raw: RawRoutes = match toml::from_str(&text) {
        Ok(r) => r,
        Err(e) => {
            let line = e.span().map_or(0, |s| lines.line(s.start));
            b.error(file, line, one_line(e.message()));
            return Err(LoadError::Invalid(finish_errors(b)));
        }
    };
    let line_of = |s: &Spanned<String>| lines.line(s.span().start);
    let field = |s| spanned_field(s, &lines);

    for (name, d) in &raw.domains {
        let line = lines.line(d.span().start);
        let d = d.get_ref();
        b.add_domain(
            file,
            Field { text: name, line },
            field(&d.unknown),
            LocalPolicy::from_source(d.case_sensitive, d.subaddress_separator.as_deref()),
        );
    }
    for (name, s) in &raw.sites {
        let line = lines.line(s.span().start);
        b.add_site(file, Field { text: name, line }, field(&s.get_ref().owner));
    }
    for (address, owner) in &raw.owners {
        let line = lines.line(owner.span().start);
        b.add_owner_override(
            file,
            Field {
                text: address,
                line,
            },
            field(owner),
        );
    }
    for m in &raw.mailbox {
        let spec = MailboxSpec {
            address: field(&m.address),
            aliases: m.aliases.iter().map(field).collect(),
            site: field(&m.site),
            owner: m.owner.as_ref().map(field),
            guid: m.guid.as_ref().map(field),
            logins: m.logins.iter().map(field).collect(),
        };
        b.add_mailbox(file, &spec);
    }
    let mut sources = Vec::with_capacity(1 + raw.import.as_ref().map_or(0, |i| i.csv.len()));
    let base = path.parent().unwrap_or(Path::new("."));
    for csv in raw.import.iter().flat_map(|i| &i.csv) {
        let csv_path: PathBuf = base.join(csv.get_ref());
        let imported = read(&csv_path)
            .map_err(csv::Error::from)
            .and_then(|bytes| import_csv(&mut b, &csv_path, &bytes).map(|()| bytes));
        match imported {
            Ok(bytes) => sources.push(SourceFile {
                path: csv_path,
                bytes,
            }),
            Err(e) => b.error(
                file,
                line_of(csv),
                format!("cannot read {}: {e}", csv_path.display()),
            ),
        }
    }
    sources.insert(
        0,
        SourceFile {
            path: path.to_path_buf(),
            bytes: text.into_bytes(),
        },
    );
    let table = b.finish().map_err(LoadError::Invalid)?;
    Ok((table, sources))
}

fn spanned_field<'a>(s: &'a Spanned<String>, lines: &LineIndex) -> Field<'a> {
    Field {
        text: s.get_ref().as_str(),
        line: lines.line(s.span().start),
    }
}

fn finish_errors(b: TableBuilder) -> Diagnostics {
    b.into_errors()
}

/// The CSV columns, with the header names an Exchange `Export-Csv` gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Column {
    Address,
    Aliases,
    Site,
    Owner,
    Guid,
    Logins,
}

impl Column {
    fn from_header(h: &str) -> Option<Column> {
        Some(match h.trim().to_ascii_lowercase().as_str() {
            "address" | "primarysmtpaddress" => Column::Address,
            "aliases" | "emailaddresses" => Column::Aliases,
            "site" => Column::Site,
            "owner" => Column::Owner,
            "guid" | "exchangeguid" => Column::Guid,
            "logins" | "userprincipalname" => Column::Logins,
            _ => return None,
        })
    }
}

/// Splits a multi-value cell (`a;b;c`). Exchange's `EmailAddresses` carries prefixes:
/// `SMTP:`/`smtp:` are addresses; other proxy types (`X500:`, `SIP:`, `EUM:`) are not
/// routable by mail and are skipped.
fn cell_values(cell: &str, addresses: bool) -> impl Iterator<Item = &str> {
    cell.split(';').map(str::trim).filter_map(move |v| {
        if v.is_empty() {
            return None;
        }
        if !addresses {
            return Some(v);
        }
        match v.split_once(':') {
            Some((proto, rest)) if proto.eq_ignore_ascii_case("smtp") => Some(rest),
            Some((proto, _)) if !proto.contains('@') => None,
            _ => Some(v),
        }
    })
}

/// Reads one CSV import into the builder. I/O and CSV syntax errors end the file; field
/// problems are reported per row and the rest of the file is still checked.
fn import_csv(b: &mut TableBuilder, path: &Path, bytes: &[u8]) -> Result<(), csv::Error> {
    let file = b.add_file(path);
    let meta_len = bytes.len();
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        // PowerShell's Export-Csv writes a `#TYPE …` line first.
        .comment(Some(b'#'))
        .from_reader(bytes);
    let mut record = csv::StringRecord::new();
    if !rdr.read_record(&mut record)? {
        b.error(file, 0, "empty CSV file (expected a header row)");
        return Ok(());
    }
    let lines = LineIndex::from_bytes(bytes);
    let line_of = |r: &csv::StringRecord| {
        r.position()
            .map_or(0, |p| lines.line(row_start(bytes, p.byte() as usize)))
    };
    let header_line = line_of(&record);
    let mut columns = Vec::with_capacity(record.len());
    let mut bad_header = false;
    for h in &record {
        match Column::from_header(h) {
            Some(c) if columns.contains(&Some(c)) => {
                b.error(file, header_line, format!("column {h:?} appears twice"));
                bad_header = true;
            }
            Some(c) => columns.push(Some(c)),
            None => {
                b.error(
                    file,
                    header_line,
                    format!(
                        "unknown column {h:?} (columns: address,aliases,site,owner,guid,logins)"
                    ),
                );
                bad_header = true;
                columns.push(None);
            }
        }
    }
    for needed in [Column::Address, Column::Site] {
        if !columns.contains(&Some(needed)) {
            b.error(
                file,
                header_line,
                format!("the header names no {needed:?} column").to_lowercase(),
            );
            bad_header = true;
        }
    }
    if bad_header {
        return Ok(());
    }
    // ~70 bytes a row with two aliases; a good guess saves rehashing a large index.
    b.reserve(meta_len / 70, 3);
    let col = |c: Column| columns.iter().position(|x| *x == Some(c));
    let (c_addr, c_alias, c_site, c_owner, c_guid, c_login) = (
        col(Column::Address),
        col(Column::Aliases),
        col(Column::Site),
        col(Column::Owner),
        col(Column::Guid),
        col(Column::Logins),
    );
    while rdr.read_record(&mut record)? {
        let line = line_of(&record);
        if record.len() == 1 && record.get(0).is_some_and(str::is_empty) {
            continue; // blank line
        }
        if record.len() != columns.len() {
            b.error(
                file,
                line,
                format!("expected {} columns, found {}", columns.len(), record.len()),
            );
            continue;
        }
        let get = |c: Option<usize>| {
            c.and_then(|i| record.get(i))
                .map(|text| Field { text, line })
        };
        let spec = MailboxSpec {
            address: get(c_addr).unwrap_or(Field { text: "", line }),
            aliases: get(c_alias).map_or_else(Vec::new, |f| {
                cell_values(f.text, true)
                    .map(|text| Field { text, line })
                    .collect()
            }),
            site: get(c_site).unwrap_or(Field { text: "", line }),
            owner: get(c_owner),
            guid: get(c_guid),
            logins: get(c_login).map_or_else(Vec::new, |f| {
                cell_values(f.text, false)
                    .map(|text| Field { text, line })
                    .collect()
            }),
        };
        b.add_mailbox(file, &spec);
    }
    Ok(())
}

/// Where the CSV row that the reader placed at `pos` starts. The reader's position is
/// where the previous row ended (and its own line count leaves out what it skipped), so
/// the comment (`#TYPE …`) and blank lines in between are stepped over here.
fn row_start(bytes: &[u8], mut pos: usize) -> usize {
    while pos < bytes.len() {
        let end = memchr::memchr(b'\n', &bytes[pos..]).map_or(bytes.len(), |i| pos + i);
        let line = &bytes[pos..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if !line.is_empty() && !line.starts_with(b"#") {
            break;
        }
        pos = end + 1;
    }
    pos
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_start_after_comments_and_blank_lines() {
        let csv = b"#TYPE x\r\n\r\naddress,site\r\n\n#c\na,b\n";
        assert_eq!(row_start(csv, 0), 11);
        assert_eq!(row_start(csv, 25), 29);
        assert_eq!(row_start(csv, csv.len()), csv.len());
    }

    #[test]
    fn exchange_proxy_addresses_are_filtered() {
        let v: Vec<_> = cell_values(
            "SMTP:a@x.com;smtp:b@x.com; X500:/o=Org/cn=a ;c@x.com;;",
            true,
        )
        .collect();
        assert_eq!(v, ["a@x.com", "b@x.com", "c@x.com"]);
        let l: Vec<_> = cell_values("EX\\a;a@corp.x", false).collect();
        assert_eq!(l, ["EX\\a", "a@corp.x"]);
    }
}
