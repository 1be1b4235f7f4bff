//! The compiled routing table: immutable, versioned, built off the hot path.
//!
//! Layout, chosen for a million mailboxes with aliases:
//! - every key string (addresses, aliases, logins) lives once in one arena `String`;
//! - the address and login indexes are `hashbrown::HashTable`s of 12-byte entries (arena
//!   span + mailbox number), so an index costs ~16 bytes per key instead of a boxed string
//!   and a pointer per key;
//! - a mailbox record is 24 bytes; its site and effective owner are resolved at build time,
//!   so a lookup touches the index, the arena (to compare the key) and one record.
//!
//! A table with any validation error is never compiled: [`TableBuilder::finish`] returns
//! every problem instead.

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use foldhash::fast::RandomState;
use hashbrown::HashTable;
use serde::Serialize;

use super::diagnostics::Diagnostics;
use super::normalize::{
    self, KeyBuf, LocalPolicy, canonical_domain, canonical_local, canonical_login, check_local,
    split_address,
};

/// Index of a target (migration side) in [`RoutingTable::targets`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetId(pub u16);

/// Table identity: a sequence number given by the router when the table is installed, and
/// a hash of the content that does not depend on the order of entries in the sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Version {
    pub seq: u64,
    pub hash: u64,
}

impl Version {
    /// The short content hash shown to operators (32 bits, 8 hex digits).
    pub fn short_hash(&self) -> u32 {
        (self.hash >> 32) as u32
    }

    /// Whether an operator's version string (`7`, `7-3fa2c19b` or `3fa2c19b`) names this one.
    pub fn matches(&self, spec: &str) -> bool {
        let spec = spec.trim().trim_start_matches('v');
        if let Some((seq, hash)) = spec.split_once('-') {
            return seq.parse() == Ok(self.seq)
                && u32::from_str_radix(hash, 16) == Ok(self.short_hash());
        }
        if spec.len() == 8 && spec.bytes().all(|b| b.is_ascii_hexdigit()) {
            return u32::from_str_radix(spec, 16) == Ok(self.short_hash());
        }
        spec.parse() == Ok(self.seq)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{:08x}", self.seq, self.short_hash())
    }
}

impl Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What a domain does with an address that matches no mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unknown {
    Target(TargetId),
    Reject,
}

#[derive(Debug, Clone)]
struct DomainRec {
    name: Box<str>,
    unknown: Unknown,
    policy: LocalPolicy,
}

#[derive(Debug, Clone)]
struct SiteRec {
    name: Box<str>,
    owner: TargetId,
    mailboxes: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    off: u32,
    len: u32,
}

#[derive(Debug, Clone, Copy)]
struct KeyEntry {
    span: Span,
    mailbox: u32,
}

#[derive(Debug, Clone, Copy)]
struct MailboxRec {
    primary: Span,
    /// First of this mailbox's alias spans, then its login spans, in `spans`.
    extra: u32,
    n_aliases: u16,
    n_logins: u16,
    site: u32,
    owner: TargetId,
    overridden: bool,
}

/// The outcome of looking up one address.
#[derive(Debug, Clone, Copy)]
pub enum Route<'t> {
    /// A known mailbox (by primary address, alias, subaddress, GUID or login).
    Mailbox(MailboxRef<'t>),
    /// A routed domain, no such mailbox: the domain's `unknown` target.
    DomainDefault { domain: &'t str, target: TargetId },
    /// A routed domain, no such mailbox, and the domain says `unknown = "reject"`.
    Reject { domain: &'t str },
    /// No routed domain: not ours to deliver (a relay attempt on port 25).
    NotOurs,
}

impl Route<'_> {
    /// The target that should receive this address, if any.
    pub fn target(&self) -> Option<TargetId> {
        match self {
            Route::Mailbox(m) => Some(m.owner()),
            Route::DomainDefault { target, .. } => Some(*target),
            Route::Reject { .. } | Route::NotOurs => None,
        }
    }
}

/// A mailbox inside one table version.
#[derive(Clone, Copy)]
pub struct MailboxRef<'t> {
    table: &'t RoutingTable,
    idx: u32,
    matched: Span,
}

impl fmt::Debug for MailboxRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MailboxRef")
            .field("address", &self.address())
            .field("site", &self.site())
            .field("owner", &self.owner_name())
            .finish_non_exhaustive()
    }
}

impl<'t> MailboxRef<'t> {
    fn rec(&self) -> &'t MailboxRec {
        &self.table.mailboxes[self.idx as usize]
    }

    /// Position of the mailbox in the table (stable only within one version).
    pub fn index(&self) -> u32 {
        self.idx
    }

    pub fn address(&self) -> &'t str {
        self.table.text(self.rec().primary)
    }

    /// The key that matched: the primary address, an alias, or a login.
    pub fn matched(&self) -> &'t str {
        self.table.text(self.matched)
    }

    pub fn aliases(&self) -> impl Iterator<Item = &'t str> + 't {
        let r = self.rec();
        let start = r.extra as usize;
        let table = self.table;
        table.spans[start..start + r.n_aliases as usize]
            .iter()
            .map(move |s| table.text(*s))
    }

    pub fn logins(&self) -> impl Iterator<Item = &'t str> + 't {
        let r = self.rec();
        let start = r.extra as usize + r.n_aliases as usize;
        let table = self.table;
        table.spans[start..start + r.n_logins as usize]
            .iter()
            .map(move |s| table.text(*s))
    }

    pub fn site(&self) -> &'t str {
        &self.table.sites[self.rec().site as usize].name
    }

    pub fn owner(&self) -> TargetId {
        self.rec().owner
    }

    pub fn owner_name(&self) -> &'t str {
        self.table.target_name(self.rec().owner)
    }

    /// True when the mailbox has its own owner (a pilot user), not its site's.
    pub fn owner_overridden(&self) -> bool {
        self.rec().overridden
    }

    pub fn guid(&self) -> Option<uuid::Uuid> {
        let g = self.table.guids[self.idx as usize];
        (g != 0).then(|| uuid::Uuid::from_u128(g))
    }
}

/// A site as listed by [`RoutingTable::sites`].
#[derive(Debug, Clone, Serialize)]
pub struct SiteInfo<'t> {
    pub name: &'t str,
    pub owner: &'t str,
    pub mailboxes: u32,
}

/// A domain as listed by [`RoutingTable::domains`].
#[derive(Debug, Clone, Serialize)]
pub struct DomainInfo<'t> {
    pub name: &'t str,
    /// A target name, or `reject`.
    pub unknown: &'t str,
    pub case_sensitive: bool,
    pub subaddress_separators: &'t str,
}

/// Bytes the table holds, split into the key strings and everything else (indexes, records).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MemoryUsage {
    pub strings: usize,
    pub structure: usize,
}

/// The immutable, versioned routing table.
pub struct RoutingTable {
    version: Version,
    loaded_at: SystemTime,
    source: Box<str>,
    targets: Box<[Box<str>]>,
    domains: Box<[DomainRec]>,
    domain_index: HashMap<Box<str>, u32, RandomState>,
    sites: Box<[SiteRec]>,
    site_index: HashMap<Box<str>, u32, RandomState>,
    mailboxes: Box<[MailboxRec]>,
    /// Parallel to `mailboxes`; 0 is "no GUID" (the nil GUID is rejected at build time).
    guids: Box<[u128]>,
    spans: Box<[Span]>,
    arena: Box<str>,
    addr_index: HashTable<KeyEntry>,
    login_index: HashTable<KeyEntry>,
    guid_index: hashbrown::HashMap<u128, u32, RandomState>,
    hasher: RandomState,
}

impl fmt::Debug for RoutingTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoutingTable")
            .field("version", &self.version)
            .field("mailboxes", &self.mailboxes.len())
            .finish_non_exhaustive()
    }
}

impl RoutingTable {
    pub fn version(&self) -> Version {
        self.version
    }

    /// Stamps the sequence number; only the router does this, before the table is shared.
    pub(crate) fn set_seq(&mut self, seq: u64) {
        self.version.seq = seq;
    }

    pub fn loaded_at(&self) -> SystemTime {
        self.loaded_at
    }

    /// Where the table came from (the routes file), for status output.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn mailbox_count(&self) -> usize {
        self.mailboxes.len()
    }

    pub fn target_names(&self) -> impl Iterator<Item = &str> {
        self.targets.iter().map(AsRef::as_ref)
    }

    pub fn target_name(&self, id: TargetId) -> &str {
        self.targets.get(id.0 as usize).map_or("?", AsRef::as_ref)
    }

    pub fn target_id(&self, name: &str) -> Option<TargetId> {
        self.targets
            .iter()
            .position(|t| t.as_ref() == name)
            .map(|i| TargetId(i as u16))
    }

    pub fn sites(&self) -> impl Iterator<Item = SiteInfo<'_>> {
        self.sites.iter().map(|s| SiteInfo {
            name: &s.name,
            owner: self.target_name(s.owner),
            mailboxes: s.mailboxes,
        })
    }

    pub fn site_owner(&self, site: &str) -> Option<&str> {
        let i = *self.site_index.get(site)?;
        Some(self.target_name(self.sites[i as usize].owner))
    }

    pub fn domains(&self) -> impl Iterator<Item = DomainInfo<'_>> {
        self.domains.iter().map(|d| DomainInfo {
            name: &d.name,
            unknown: match d.unknown {
                Unknown::Target(t) => self.target_name(t),
                Unknown::Reject => "reject",
            },
            case_sensitive: d.policy.case_sensitive,
            subaddress_separators: &d.policy.subaddress_separators,
        })
    }

    pub fn mailboxes(&self) -> impl Iterator<Item = MailboxRef<'_>> {
        (0..self.mailboxes.len() as u32).map(|idx| MailboxRef {
            table: self,
            idx,
            matched: self.mailboxes[idx as usize].primary,
        })
    }

    pub fn memory_usage(&self) -> MemoryUsage {
        use std::mem::size_of;
        let map_bytes = |cap: usize, entry: usize| cap * (entry + 1);
        let structure = size_of::<Self>()
            + self.mailboxes.len() * size_of::<MailboxRec>()
            + self.guids.len() * size_of::<u128>()
            + self.spans.len() * size_of::<Span>()
            + map_bytes(self.addr_index.capacity(), size_of::<KeyEntry>())
            + map_bytes(self.login_index.capacity(), size_of::<KeyEntry>())
            + map_bytes(self.guid_index.capacity(), size_of::<(u128, u32)>())
            + self.sites.len() * size_of::<SiteRec>()
            + self.domains.len() * size_of::<DomainRec>();
        MemoryUsage {
            strings: self.arena.len(),
            structure,
        }
    }

    fn text(&self, s: Span) -> &str {
        &self.arena[s.off as usize..(s.off + s.len) as usize]
    }

    fn mailbox(&self, idx: u32, matched: Span) -> Route<'_> {
        Route::Mailbox(MailboxRef {
            table: self,
            idx,
            matched,
        })
    }

    fn find(&self, index: &HashTable<KeyEntry>, key: &str) -> Option<KeyEntry> {
        let hash = self.hasher.hash_one(key);
        index
            .find(hash, |e| self.text(e.span) == key)
            .copied()
    }

    /// Routes one address (`local@domain`, no angle brackets). This is the hot path.
    pub fn lookup(&self, address: &str) -> Route<'_> {
        let Ok((local, domain)) = split_address(address) else {
            return Route::NotOurs;
        };
        let Ok(domain) = canonical_domain(domain) else {
            return Route::NotOurs;
        };
        let Some(&d) = self.domain_index.get(domain.as_ref()) else {
            return Route::NotOurs;
        };
        let rec = &self.domains[d as usize];
        let keep_case = rec.policy.case_sensitive;
        let mut buf = KeyBuf::new();
        if let Some(key) = buf.build(local, &rec.name, keep_case)
            && let Some(e) = self.find(&self.addr_index, key)
        {
            return self.mailbox(e.mailbox, e.span);
        }
        // An exact match wins over subaddress stripping, so a real mailbox named `a+b@`
        // keeps its mail.
        if let Some(base) = rec.policy.strip_subaddress(local)
            && let Some(key) = buf.build(base, &rec.name, keep_case)
            && let Some(e) = self.find(&self.addr_index, key)
        {
            return self.mailbox(e.mailbox, e.span);
        }
        match rec.unknown {
            Unknown::Target(target) => Route::DomainDefault {
                domain: &rec.name,
                target,
            },
            Unknown::Reject => Route::Reject { domain: &rec.name },
        }
    }

    /// Finds a mailbox by logon name: `DOMAIN\user` or a UPN.
    pub fn lookup_login(&self, login: &str) -> Option<MailboxRef<'_>> {
        let key = canonical_login(login).ok()?;
        let e = self.find(&self.login_index, &key)?;
        Some(MailboxRef {
            table: self,
            idx: e.mailbox,
            matched: e.span,
        })
    }

    /// Finds a mailbox by ExchangeGuid (MAPI `MailboxId=`, RPC `<guid>@domain`).
    pub fn lookup_guid(&self, guid: uuid::Uuid) -> Option<MailboxRef<'_>> {
        let idx = *self.guid_index.get(&guid.as_u128())?;
        Some(MailboxRef {
            table: self,
            idx,
            matched: self.mailboxes[idx as usize].primary,
        })
    }

    /// Looks a mailbox up by its primary address only (exact canonical key), as the diff
    /// needs: it compares mailboxes, not routes.
    pub(crate) fn mailbox_by_key(&self, key: &str) -> Option<MailboxRef<'_>> {
        let e = self.find(&self.addr_index, key)?;
        Some(MailboxRef {
            table: self,
            idx: e.mailbox,
            matched: e.span,
        })
    }
}

/// One field of a source record and the line it came from.
#[derive(Debug, Clone, Copy)]
pub struct Field<'a> {
    pub text: &'a str,
    pub line: u32,
}

/// One mailbox as a source wrote it, before normalisation.
#[derive(Debug, Clone)]
pub struct MailboxSpec<'a> {
    pub address: Field<'a>,
    pub aliases: Vec<Field<'a>>,
    pub site: Field<'a>,
    pub owner: Option<Field<'a>>,
    pub guid: Option<Field<'a>>,
    pub logins: Vec<Field<'a>>,
}

#[derive(Debug, Clone, Copy)]
struct Origin {
    file: u16,
    line: u32,
}

/// Which target names a table may use.
#[derive(Debug, Clone)]
pub enum KnownTargets {
    /// The targets of a config file: anything else is an error.
    Exactly(Vec<String>),
    /// Any name, added as first seen (for comparing two route files without a config).
    Any,
}

/// Builds a [`RoutingTable`] from source records, collecting every problem.
pub struct TableBuilder {
    files: Vec<Arc<Path>>,
    diags: Diagnostics,
    targets: Vec<Box<str>>,
    open_targets: bool,
    domains: Vec<DomainRec>,
    domain_index: HashMap<Box<str>, u32, RandomState>,
    sites: Vec<SiteRec>,
    site_origins: Vec<Origin>,
    site_index: HashMap<Box<str>, u32, RandomState>,
    mailboxes: Vec<MailboxRec>,
    origins: Vec<Origin>,
    guids: Vec<u128>,
    spans: Vec<Span>,
    arena: String,
    addr_index: HashTable<KeyEntry>,
    login_index: HashTable<KeyEntry>,
    guid_index: hashbrown::HashMap<u128, u32, RandomState>,
    hasher: RandomState,
    source: String,
}

/// Which index a key goes into; named in duplicate errors.
#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Address,
    Alias,
    Login,
}

impl KeyKind {
    fn word(self) -> &'static str {
        match self {
            KeyKind::Address => "address",
            KeyKind::Alias => "alias",
            KeyKind::Login => "login",
        }
    }
}

impl TableBuilder {
    pub fn new(targets: &KnownTargets) -> Self {
        let (targets, open_targets) = match targets {
            KnownTargets::Exactly(t) => (t.iter().map(|s| s.as_str().into()).collect(), false),
            KnownTargets::Any => (Vec::new(), true),
        };
        let hasher = RandomState::default();
        Self {
            files: Vec::new(),
            diags: Diagnostics::default(),
            targets,
            open_targets,
            domains: Vec::new(),
            domain_index: HashMap::default(),
            sites: Vec::new(),
            site_origins: Vec::new(),
            site_index: HashMap::default(),
            mailboxes: Vec::new(),
            origins: Vec::new(),
            guids: Vec::new(),
            spans: Vec::new(),
            arena: String::new(),
            addr_index: HashTable::new(),
            login_index: HashTable::new(),
            guid_index: hashbrown::HashMap::default(),
            hasher,
            source: String::new(),
        }
    }

    /// Pre-sizes the indexes when a source knows roughly how many mailboxes follow, so a
    /// million-row import does not rehash a dozen times.
    pub fn reserve(&mut self, mailboxes: usize, keys_per_mailbox: usize) {
        let h = self.hasher.clone();
        let arena = &self.arena;
        let rehash = |e: &KeyEntry| {
            h.hash_one(&arena[e.span.off as usize..(e.span.off + e.span.len) as usize])
        };
        self.addr_index.reserve(mailboxes * keys_per_mailbox, rehash);
        self.mailboxes.reserve(mailboxes);
        self.origins.reserve(mailboxes);
        self.guids.reserve(mailboxes);
        self.spans.reserve(mailboxes * keys_per_mailbox);
        self.arena.reserve(mailboxes * keys_per_mailbox * 24);
    }

    pub fn set_source(&mut self, source: impl Into<String>) {
        self.source = source.into();
    }

    /// Registers a source file; the id goes with every record from it.
    pub fn add_file(&mut self, path: &Path) -> u16 {
        self.files.push(Arc::from(path));
        (self.files.len() - 1) as u16
    }

    pub fn file(&self, id: u16) -> &Arc<Path> {
        &self.files[id as usize]
    }

    pub fn error(&mut self, file: u16, line: u32, message: impl Into<String>) {
        let f = Arc::clone(&self.files[file as usize]);
        self.diags.push(&f, line, message);
    }

    pub fn has_errors(&self) -> bool {
        !self.diags.is_empty()
    }

    fn target(&mut self, file: u16, f: Field<'_>) -> Option<TargetId> {
        if let Some(i) = self.targets.iter().position(|t| t.as_ref() == f.text) {
            return Some(TargetId(i as u16));
        }
        if self.open_targets && !f.text.is_empty() && f.text != "reject" {
            self.targets.push(f.text.into());
            return Some(TargetId((self.targets.len() - 1) as u16));
        }
        let known = self.targets.join(", ");
        self.error(
            file,
            f.line,
            format!("unknown target {:?} (known targets: {known})", f.text),
        );
        None
    }

    pub fn add_domain(
        &mut self,
        file: u16,
        name: Field<'_>,
        unknown: Field<'_>,
        policy: LocalPolicy,
    ) {
        let canon = match canonical_domain(name.text) {
            Ok(c) => c.into_owned(),
            Err(e) => {
                self.error(file, name.line, format!("domain {:?}: {e}", name.text));
                return;
            }
        };
        let unknown = if unknown.text == "reject" {
            Unknown::Reject
        } else {
            match self.target(file, unknown) {
                Some(t) => Unknown::Target(t),
                None => return,
            }
        };
        if self.domain_index.contains_key(canon.as_str()) {
            self.error(
                file,
                name.line,
                format!("domain {:?} is listed twice (as {canon:?})", name.text),
            );
            return;
        }
        self.domain_index
            .insert(canon.as_str().into(), self.domains.len() as u32);
        self.domains.push(DomainRec {
            name: canon.into(),
            unknown,
            policy,
        });
    }

    pub fn add_site(&mut self, file: u16, name: Field<'_>, owner: Field<'_>) {
        if name.text.is_empty() || name.text.chars().any(|c| c.is_control() || c == '"') {
            self.error(file, name.line, format!("invalid site name {:?}", name.text));
            return;
        }
        let Some(owner) = self.target(file, owner) else {
            return;
        };
        if self.site_index.contains_key(name.text) {
            self.error(file, name.line, format!("site {:?} is listed twice", name.text));
            return;
        }
        self.site_index.insert(name.text.into(), self.sites.len() as u32);
        self.sites.push(SiteRec {
            name: name.text.into(),
            owner,
            mailboxes: 0,
        });
        self.site_origins.push(Origin {
            file,
            line: name.line,
        });
    }

    /// Normalises an address and checks that its domain is routed.
    fn address_key(&mut self, file: u16, f: Field<'_>, what: &str) -> Option<String> {
        let fail = |b: &mut Self, msg: String| {
            b.error(file, f.line, format!("{what} {:?}: {msg}", f.text));
            None
        };
        let text = f.text.trim();
        let Ok((local, domain)) = split_address(text) else {
            return fail(self, "not an address (missing '@')".into());
        };
        if let Err(e) = check_local(local) {
            return fail(self, e.to_string());
        }
        let domain = match canonical_domain(domain) {
            Ok(d) => d,
            Err(e) => return fail(self, e.to_string()),
        };
        let Some(&d) = self.domain_index.get(domain.as_ref()) else {
            return fail(
                self,
                format!("domain {domain:?} is not routed (add [domains.\"{domain}\"])"),
            );
        };
        let policy = &self.domains[d as usize].policy;
        Some(format!("{}@{domain}", canonical_local(local, policy)))
    }

    fn push_text(&mut self, s: &str) -> Option<Span> {
        let off = u32::try_from(self.arena.len()).ok()?;
        let len = u32::try_from(s.len()).ok()?;
        off.checked_add(len)?;
        self.arena.push_str(s);
        Some(Span { off, len })
    }

    fn key_text(&self, s: Span) -> &str {
        &self.arena[s.off as usize..(s.off + s.len) as usize]
    }

    fn describe(&self, idx: u32) -> String {
        let m = &self.mailboxes[idx as usize];
        let o = self.origins[idx as usize];
        format!(
            "mailbox {} ({}:{})",
            self.key_text(m.primary),
            self.files[o.file as usize].display(),
            o.line
        )
    }

    /// Inserts one key; returns its span, or `None` when another mailbox already claims it
    /// (reported) or this mailbox lists it twice (harmless, skipped).
    fn insert_key(
        &mut self,
        kind: KeyKind,
        key: &str,
        idx: u32,
        file: u16,
        line: u32,
    ) -> Option<Span> {
        let index = if kind == KeyKind::Login {
            &self.login_index
        } else {
            &self.addr_index
        };
        let hash = self.hasher.hash_one(key);
        let arena = &self.arena;
        let existing = index
            .find(hash, |e| {
                &arena[e.span.off as usize..(e.span.off + e.span.len) as usize] == key
            })
            .copied();
        if let Some(e) = existing {
            if e.mailbox != idx {
                let other = self.describe(e.mailbox);
                self.error(
                    file,
                    line,
                    format!(
                        "{} {key:?} is already claimed by {other}",
                        kind.word()
                    ),
                );
            }
            return None;
        }
        let Some(span) = self.push_text(key) else {
            self.error(file, line, "routing table larger than 4 GiB of keys");
            return None;
        };
        let h = &self.hasher;
        let arena = &self.arena;
        let index = if kind == KeyKind::Login {
            &mut self.login_index
        } else {
            &mut self.addr_index
        };
        index.insert_unique(hash, KeyEntry { span, mailbox: idx }, |e| {
            h.hash_one(&arena[e.span.off as usize..(e.span.off + e.span.len) as usize])
        });
        Some(span)
    }

    /// Adds one mailbox; problems are recorded and the mailbox is skipped.
    pub fn add_mailbox(&mut self, file: u16, m: &MailboxSpec<'_>) {
        let errors_before = self.diags.len();
        let primary = self.address_key(file, m.address, "address");
        let aliases: Vec<(Option<String>, u32)> = m
            .aliases
            .iter()
            .filter(|a| !a.text.trim().is_empty())
            .map(|a| (self.address_key(file, *a, "alias"), a.line))
            .collect();
        let logins: Vec<(Option<String>, u32)> = m
            .logins
            .iter()
            .filter(|l| !l.text.trim().is_empty())
            .map(|l| match canonical_login(l.text) {
                Ok(k) => (Some(k), l.line),
                Err(e) => {
                    self.error(file, l.line, format!("login {:?}: {e}", l.text));
                    (None, l.line)
                }
            })
            .collect();
        let site = self.site_index.get(m.site.text).copied();
        if site.is_none() {
            let msg = if m.site.text.is_empty() {
                "mailbox has no site".to_string()
            } else {
                format!("unknown site {:?}", m.site.text)
            };
            self.error(file, m.site.line, msg);
        }
        let owner = match m.owner.filter(|o| !o.text.is_empty()) {
            Some(o) => self.target(file, o).map(|t| (t, true)),
            None => site.map(|s| (self.sites[s as usize].owner, false)),
        };
        let guid = match m.guid.filter(|g| !g.text.trim().is_empty()) {
            None => Some(0),
            Some(g) => match uuid::Uuid::parse_str(g.text.trim().trim_matches(['{', '}'])) {
                Ok(u) if !u.is_nil() => Some(u.as_u128()),
                Ok(_) => {
                    self.error(file, g.line, "guid: the nil GUID names no mailbox");
                    None
                }
                Err(_) => {
                    self.error(
                        file,
                        g.line,
                        format!("guid {:?}: not a GUID (expected 8-4-4-4-12 hex digits)", g.text),
                    );
                    None
                }
            },
        };
        if self.diags.len() != errors_before {
            return;
        }
        let (Some(primary), Some(site), Some((owner, overridden)), Some(guid)) =
            (primary, site, owner, guid)
        else {
            return;
        };

        let idx = self.mailboxes.len() as u32;
        let Some(primary_span) = self.insert_key(KeyKind::Address, &primary, idx, file, m.address.line)
        else {
            return;
        };
        // The record goes in before the other keys so that duplicate errors for them can
        // describe this mailbox too.
        self.mailboxes.push(MailboxRec {
            primary: primary_span,
            extra: self.spans.len() as u32,
            n_aliases: 0,
            n_logins: 0,
            site,
            owner,
            overridden,
        });
        self.origins.push(Origin {
            file,
            line: m.address.line,
        });
        self.guids.push(guid);
        let mut n_aliases = 0u16;
        for (key, line) in aliases {
            let Some(key) = key else { continue };
            if let Some(span) = self.insert_key(KeyKind::Alias, &key, idx, file, line) {
                self.spans.push(span);
                n_aliases = n_aliases.saturating_add(1);
            }
        }
        let mut n_logins = 0u16;
        for (key, line) in logins {
            let Some(key) = key else { continue };
            if let Some(span) = self.insert_key(KeyKind::Login, &key, idx, file, line) {
                self.spans.push(span);
                n_logins = n_logins.saturating_add(1);
            }
        }
        let rec = &mut self.mailboxes[idx as usize];
        rec.n_aliases = n_aliases;
        rec.n_logins = n_logins;
        if guid != 0 {
            if let Some(&other) = self.guid_index.get(&guid) {
                let other = self.describe(other);
                let line = m.guid.map_or(m.address.line, |g| g.line);
                self.error(
                    file,
                    line,
                    format!(
                        "guid {} is already claimed by {other}",
                        uuid::Uuid::from_u128(guid)
                    ),
                );
            } else {
                self.guid_index.insert(guid, idx);
            }
        }
        self.sites[site as usize].mailboxes += 1;
    }

    /// The problems found so far, when a source cannot be read far enough to finish.
    pub fn into_errors(self) -> Diagnostics {
        self.diags
    }

    /// Final checks and compilation. Every problem is returned at once.
    pub fn finish(mut self) -> Result<RoutingTable, Diagnostics> {
        if self.domains.is_empty() && !self.files.is_empty() {
            self.error(0, 0, "the routing table routes no domain (add a [domains.\"…\"] table)");
        }
        for (i, site) in self.sites.iter().enumerate() {
            if site.mailboxes == 0 {
                let o = self.site_origins[i];
                let f = Arc::clone(&self.files[o.file as usize]);
                self.diags.push(
                    &f,
                    o.line,
                    format!("site {:?} has no mailboxes", site.name),
                );
            }
        }
        if !self.diags.is_empty() {
            let mut d = self.diags;
            d.sort(&self.files);
            return Err(d);
        }
        // Content hash: deterministic across builds (fixed seed), independent of the
        // per-process random seed used for the hash tables above.
        let hash = stable_hash(&self);
        let mut addr_index = self.addr_index;
        let h = &self.hasher;
        let arena = &self.arena;
        addr_index.shrink_to_fit(|e| {
            h.hash_one(&arena[e.span.off as usize..(e.span.off + e.span.len) as usize])
        });
        Ok(RoutingTable {
            // 1 for a table loaded on its own; the router renumbers what it installs.
            version: Version { seq: 1, hash },
            loaded_at: SystemTime::now(),
            source: self.source.into(),
            targets: self.targets.into(),
            domains: self.domains.into(),
            domain_index: self.domain_index,
            sites: self.sites.into(),
            site_index: self.site_index,
            mailboxes: self.mailboxes.into(),
            guids: self.guids.into(),
            spans: self.spans.into(),
            arena: self.arena.into(),
            addr_index,
            login_index: self.login_index,
            guid_index: self.guid_index,
            hasher: self.hasher,
        })
    }
}

/// A bijective 64-bit mixer (splitmix64 finaliser): summing mixed values keeps the
/// order-independent combination from cancelling out structure in the inputs.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The version hash must be equal for equal content across processes, so it cannot use
/// the tables' random seed: xxh3 per entry, summed after mixing so that the same entries
/// in another order (or split differently between TOML and CSV) give the same hash.
fn stable_hash(b: &TableBuilder) -> u64 {
    use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};
    let mut acc = 0u64;
    for d in &b.domains {
        let s = format!(
            "d\0{}\0{}\0{}\0{}",
            d.name,
            match d.unknown {
                Unknown::Target(t) => b.targets[t.0 as usize].as_ref(),
                Unknown::Reject => "\0reject",
            },
            d.policy.case_sensitive,
            d.policy.subaddress_separators
        );
        acc = acc.wrapping_add(mix(xxh3_64(s.as_bytes())));
    }
    for s in &b.sites {
        let t = format!("s\0{}\0{}", s.name, b.targets[s.owner.0 as usize]);
        acc = acc.wrapping_add(mix(xxh3_64(t.as_bytes())));
    }
    let mut buf = Vec::with_capacity(256);
    for (i, m) in b.mailboxes.iter().enumerate() {
        buf.clear();
        let text = |s: Span| &b.arena.as_bytes()[s.off as usize..(s.off + s.len) as usize];
        buf.extend_from_slice(text(m.primary));
        buf.push(0);
        buf.extend_from_slice(b.sites[m.site as usize].name.as_bytes());
        buf.push(0);
        if m.overridden {
            buf.extend_from_slice(b.targets[m.owner.0 as usize].as_bytes());
        }
        buf.push(0);
        buf.extend_from_slice(&b.guids[i].to_le_bytes());
        let mut extra = 0u64;
        let start = m.extra as usize;
        for (j, s) in b.spans[start..start + (m.n_aliases + m.n_logins) as usize]
            .iter()
            .enumerate()
        {
            let seed = if j < m.n_aliases as usize { 1 } else { 2 };
            extra = extra.wrapping_add(mix(xxh3_64_with_seed(text(*s), seed)));
        }
        buf.extend_from_slice(&extra.to_le_bytes());
        acc = acc.wrapping_add(mix(xxh3_64(&buf)));
    }
    acc
}

impl normalize::LocalPolicy {
    /// The policy as `routes.toml` writes it.
    pub fn from_source(case_sensitive: bool, separators: Option<&str>) -> Self {
        Self {
            case_sensitive,
            subaddress_separators: separators.unwrap_or("+").into(),
        }
    }
}
