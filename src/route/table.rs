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

use super::normalize::{
    self, KeyBuf, LocalPolicy, MAX_DOMAIN_LEN, canonical_domain, canonical_login, check_local,
    split_address,
};
use crate::diagnostics::Diagnostics;

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

impl std::str::FromStr for Version {
    type Err = String;

    /// Parses `SEQ-HASH` as displayed; only the short hash is known then.
    fn from_str(s: &str) -> Result<Self, String> {
        let (seq, hash) = s
            .split_once('-')
            .ok_or_else(|| format!("bad version {s:?}"))?;
        Ok(Version {
            seq: seq.parse().map_err(|_| format!("bad version {s:?}"))?,
            hash: u64::from(
                u32::from_str_radix(hash, 16).map_err(|_| format!("bad version {s:?}"))?,
            ) << 32,
        })
    }
}

impl<'de> serde::Deserialize<'de> for Version {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
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

impl Span {
    fn range(self) -> std::ops::Range<usize> {
        self.off as usize..(self.off + self.len) as usize
    }
}

/// One slot of the address or login index: where the key's text is, whose it is, and the
/// mailbox's owner, so that routing a hit never has to read the mailbox record.
#[derive(Debug, Clone, Copy)]
struct KeyEntry {
    off: u32,
    mailbox: u32,
    len: u16,
    owner: TargetId,
}

impl KeyEntry {
    fn span(self) -> Span {
        Span {
            off: self.off,
            len: u32::from(self.len),
        }
    }
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
    owner: TargetId,
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
        self.owner
    }

    pub fn owner_name(&self) -> &'t str {
        self.table.target_name(self.owner)
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
    /// Every file the table was read from (routes file first, then CSV imports).
    files: Box<[Arc<Path>]>,
    targets: Box<[Box<str>]>,
    domains: Box<[DomainRec]>,
    domain_index: HashMap<Box<[u8]>, u32, RandomState>,
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

    /// The source files: what a rollback must restore to get this version back.
    pub fn files(&self) -> &[Arc<Path>] {
        &self.files
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
        (0..self.mailboxes.len() as u32).map(|idx| self.mailbox_ref(idx))
    }

    pub fn memory_usage(&self) -> MemoryUsage {
        use std::mem::size_of;
        let map_bytes = |cap: usize, entry: usize| bucket_count(cap) * (entry + 1);
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
        &self.arena[s.range()]
    }

    fn mailbox_ref(&self, idx: u32) -> MailboxRef<'_> {
        let rec = &self.mailboxes[idx as usize];
        MailboxRef {
            table: self,
            idx,
            matched: rec.primary,
            owner: rec.owner,
        }
    }

    fn entry_ref(&self, e: KeyEntry) -> MailboxRef<'_> {
        MailboxRef {
            table: self,
            idx: e.mailbox,
            matched: e.span(),
            owner: e.owner,
        }
    }

    fn find(&self, index: &HashTable<KeyEntry>, key: &[u8]) -> Option<KeyEntry> {
        let hash = self.hasher.hash_one(key);
        let arena = self.arena.as_bytes();
        index
            .find(hash, |e| &arena[e.span().range()] == key)
            .copied()
    }

    /// Routes one address (`local@domain`, no angle brackets). This is the hot path: an
    /// ASCII address is normalised on the stack and costs two hash probes at most.
    pub fn lookup(&self, address: &str) -> Route<'_> {
        let Ok((local, domain)) = split_address(address) else {
            return Route::NotOurs;
        };
        let Some(rec) = self.domain_rec(domain) else {
            return Route::NotOurs;
        };
        let keep_case = rec.policy.case_sensitive;
        let mut buf = KeyBuf::new();
        if let Some(key) = buf.build(local, &rec.name, keep_case)
            && let Some(e) = self.find(&self.addr_index, key)
        {
            return Route::Mailbox(self.entry_ref(e));
        }
        // An exact match wins over subaddress stripping, so a real mailbox named `a+b@`
        // keeps its mail.
        if let Some(base) = rec.policy.strip_subaddress(local)
            && let Some(key) = buf.build(base, &rec.name, keep_case)
            && let Some(e) = self.find(&self.addr_index, key)
        {
            return Route::Mailbox(self.entry_ref(e));
        }
        Self::unknown_route(rec)
    }

    /// Routes a domain alone, as [`lookup`](Self::lookup) routes an address of it that
    /// names no mailbox: `DomainDefault`, `Reject`, or `NotOurs` for a domain the table
    /// does not route. The HTTPS default step knows a request's domain (a placeholder
    /// anchor, a `<guid>@domain` hint) when it knows no mailbox.
    pub fn lookup_domain(&self, domain: &str) -> Route<'_> {
        match self.domain_rec(domain) {
            Some(rec) => Self::unknown_route(rec),
            None => Route::NotOurs,
        }
    }

    fn domain_rec(&self, domain: &str) -> Option<&DomainRec> {
        let mut dbuf = [0u8; MAX_DOMAIN_LEN + 1];
        let d = if domain.is_ascii() && domain.len() <= dbuf.len() {
            // Lower-casing is the whole canonical form of an ASCII domain that the table
            // holds; anything invalid simply is not in the index.
            let dom = &mut dbuf[..domain.len()];
            dom.copy_from_slice(domain.as_bytes());
            dom.make_ascii_lowercase();
            let dom = dom.strip_suffix(b".").unwrap_or(dom);
            self.domain_index.get(dom)
        } else {
            match canonical_domain(domain) {
                Ok(c) => self.domain_index.get(c.as_bytes()),
                Err(_) => None,
            }
        };
        d.map(|&d| &self.domains[d as usize])
    }

    fn unknown_route(rec: &DomainRec) -> Route<'_> {
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
        let e = self.find(&self.login_index, key.as_bytes())?;
        Some(self.entry_ref(e))
    }

    /// Finds a mailbox by ExchangeGuid (MAPI `MailboxId=`, RPC `<guid>@domain`).
    pub fn lookup_guid(&self, guid: uuid::Uuid) -> Option<MailboxRef<'_>> {
        let idx = *self.guid_index.get(&guid.as_u128())?;
        Some(self.mailbox_ref(idx))
    }

    /// Looks a mailbox up by an exact canonical key, as the diff needs: it compares
    /// mailboxes, not routes.
    pub(crate) fn mailbox_by_key(&self, key: &str) -> Option<MailboxRef<'_>> {
        let e = self.find(&self.addr_index, key.as_bytes())?;
        Some(self.entry_ref(e))
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

/// Which index a key goes into; named in duplicate errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// A key waiting for the index. Keys are collected first and inserted in bucket order at
/// the end (see [`TableBuilder::finish`]).
#[derive(Debug, Clone, Copy)]
struct PendingKey {
    hash: u64,
    off: u32,
    mailbox: u32,
    len: u16,
    owner: TargetId,
    kind: KeyKind,
}

/// Stand-ins for a mailbox or site whose owner or site is invalid: entered so that every
/// other problem is still found, never compiled (the builder has an error then).
const NO_TARGET: TargetId = TargetId(u16::MAX);
const NO_SITE: u32 = u32::MAX;

/// Builds a [`RoutingTable`] from source records, collecting every problem.
pub struct TableBuilder {
    files: Vec<Arc<Path>>,
    diags: Diagnostics,
    targets: Vec<Box<str>>,
    open_targets: bool,
    domains: Vec<DomainRec>,
    domain_index: HashMap<Box<[u8]>, u32, RandomState>,
    sites: Vec<SiteRec>,
    site_origins: Vec<Origin>,
    site_index: HashMap<Box<str>, u32, RandomState>,
    mailboxes: Vec<MailboxRec>,
    origins: Vec<Origin>,
    guids: Vec<u128>,
    spans: Vec<Span>,
    arena: String,
    addr_keys: Vec<PendingKey>,
    login_keys: Vec<PendingKey>,
    guid_index: hashbrown::HashMap<u128, u32, RandomState>,
    hasher: RandomState,
    source: String,
    recent_domains: Vec<(String, u32)>,
    /// `[owners]`: canonical address → (owner, where it was written, used yet).
    owner_overrides: HashMap<String, (TargetId, Origin, bool), RandomState>,
}

impl TableBuilder {
    pub fn new(targets: &KnownTargets) -> Self {
        let (targets, open_targets) = match targets {
            KnownTargets::Exactly(t) => (t.iter().map(|s| s.as_str().into()).collect(), false),
            KnownTargets::Any => (Vec::new(), true),
        };
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
            addr_keys: Vec::new(),
            login_keys: Vec::new(),
            guid_index: hashbrown::HashMap::default(),
            hasher: RandomState::default(),
            source: String::new(),
            owner_overrides: HashMap::default(),
            recent_domains: Vec::new(),
        }
    }

    /// A per-mailbox owner from `[owners]`; it must name a mailbox (by any of its
    /// addresses) that some source defines. Call after the domains, before the mailboxes.
    pub fn add_owner_override(&mut self, file: u16, address: Field<'_>, owner: Field<'_>) {
        let Some(target) = self.target(file, owner) else {
            return;
        };
        let mark = self.arena.len();
        let Some(span) = self.push_address(file, address, "owners entry") else {
            return;
        };
        let key = self.arena[span.range()].to_string();
        self.arena.truncate(mark);
        let origin = Origin {
            file,
            line: address.line,
        };
        if self
            .owner_overrides
            .insert(key, (target, origin, false))
            .is_some()
        {
            self.error(
                file,
                address.line,
                format!("{:?} is listed twice in [owners]", address.text),
            );
        }
    }

    /// The `[owners]` override for a mailbox with these keys, marking it used.
    fn owner_override(&mut self, keys: impl Iterator<Item = Span>) -> Option<TargetId> {
        if self.owner_overrides.is_empty() {
            return None;
        }
        for k in keys {
            let text = &self.arena[k.range()];
            if let Some((t, _, used)) = self.owner_overrides.get_mut(text) {
                *used = true;
                return Some(*t);
            }
        }
        None
    }

    /// Pre-sizes the buffers when a source knows roughly how many mailboxes follow, so a
    /// million-row import does not grow them a dozen times.
    pub fn reserve(&mut self, mailboxes: usize, keys_per_mailbox: usize) {
        self.mailboxes.reserve(mailboxes);
        self.origins.reserve(mailboxes);
        self.guids.reserve(mailboxes);
        self.spans.reserve(mailboxes * keys_per_mailbox);
        self.addr_keys.reserve(mailboxes * keys_per_mailbox);
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
            // A bad target is reported here once; the domain is still known, so its
            // addresses are checked (and not all reported as "not routed"). The table
            // cannot compile with the error, so the stand-in never routes.
            self.target(file, unknown)
                .map_or(Unknown::Reject, Unknown::Target)
        };
        if self.domain_index.contains_key(canon.as_bytes()) {
            self.error(
                file,
                name.line,
                format!("domain {:?} is listed twice (as {canon:?})", name.text),
            );
            return;
        }
        self.domain_index
            .insert(canon.as_bytes().into(), self.domains.len() as u32);
        self.domains.push(DomainRec {
            name: canon.into(),
            unknown,
            policy,
        });
    }

    pub fn add_site(&mut self, file: u16, name: Field<'_>, owner: Field<'_>) {
        if name.text.is_empty() || name.text.chars().any(|c| c.is_control() || c == '"') {
            self.error(
                file,
                name.line,
                format!("invalid site name {:?}", name.text),
            );
            return;
        }
        // A bad owner is reported here once; the site is still known, so its mailboxes
        // are checked (and not each reported as "unknown site"). The table cannot compile
        // with the error, so the stand-in owner never routes.
        let owner = self.target(file, owner).unwrap_or(NO_TARGET);
        if self.site_index.contains_key(name.text) {
            self.error(
                file,
                name.line,
                format!("site {:?} is listed twice", name.text),
            );
            return;
        }
        self.site_index
            .insert(name.text.into(), self.sites.len() as u32);
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

    /// The routed domain a source wrote, canonical, with its index. Sources list thousands
    /// of addresses per domain in a row, so the last answer is kept.
    fn routed_domain(&mut self, raw: &str) -> Result<u32, String> {
        if let Some((_, d)) = self.recent_domains.iter().find(|(r, _)| r.as_str() == raw) {
            return Ok(*d);
        }
        let canon = canonical_domain(raw).map_err(|e| e.to_string())?;
        let Some(&d) = self.domain_index.get(canon.as_bytes()) else {
            return Err(format!(
                "domain {canon:?} is not routed (add [domains.\"{canon}\"])"
            ));
        };
        if self.recent_domains.len() == 8 {
            self.recent_domains.remove(0);
        }
        self.recent_domains.push((raw.to_string(), d));
        Ok(d)
    }

    /// Normalises an address straight into the arena (no temporary string) after checking
    /// that its domain is routed.
    fn push_address(&mut self, file: u16, f: Field<'_>, what: &str) -> Option<Span> {
        let text = f.text.trim();
        let problem = match split_address(text) {
            Err(_) => Err("not an address (missing '@')".to_string()),
            Ok((local, domain)) => match check_local(local).map_err(|e| e.to_string()) {
                Err(e) => Err(e),
                Ok(()) => self.routed_domain(domain).map(|d| {
                    let rec = &self.domains[d as usize];
                    let keep_case = rec.policy.case_sensitive || local.starts_with('"');
                    let off = self.arena.len();
                    if keep_case {
                        self.arena.push_str(local);
                    } else if local.is_ascii() {
                        self.arena.push_str(local);
                        self.arena[off..].make_ascii_lowercase();
                    } else {
                        self.arena.push_str(&local.to_lowercase());
                    }
                    self.arena.push('@');
                    self.arena.push_str(&rec.name);
                    off
                }),
            },
        };
        match problem {
            Ok(off) => self.span_from(off, file, f.line),
            Err(msg) => {
                self.error(file, f.line, format!("{what} {:?}: {msg}", f.text));
                None
            }
        }
    }

    fn push_login(&mut self, file: u16, f: Field<'_>) -> Option<Span> {
        match canonical_login(f.text) {
            Ok(k) => {
                let off = self.arena.len();
                self.arena.push_str(&k);
                self.span_from(off, file, f.line)
            }
            Err(e) => {
                self.error(file, f.line, format!("login {:?}: {e}", f.text));
                None
            }
        }
    }

    /// The span of the text pushed since `off`, checked against the index's limits.
    fn span_from(&mut self, off: usize, file: u16, line: u32) -> Option<Span> {
        let len = self.arena.len() - off;
        match (u32::try_from(off), u32::try_from(self.arena.len())) {
            (Ok(off), Ok(_)) if u16::try_from(len).is_ok() => Some(Span {
                off,
                len: len as u32,
            }),
            _ => {
                self.error(file, line, "routing table larger than 4 GiB of keys");
                None
            }
        }
    }

    fn key_text(&self, s: Span) -> &str {
        &self.arena[s.range()]
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

    /// Adds one mailbox; problems are recorded and the mailbox is skipped.
    pub fn add_mailbox(&mut self, file: u16, m: &MailboxSpec<'_>) {
        let arena_mark = self.arena.len();
        let spans_mark = self.spans.len();
        let primary = self.push_address(file, m.address, "address");
        // Aliases then logins go to `spans`, skipping what this mailbox lists twice.
        let mut n_aliases = 0u16;
        for a in m.aliases.iter().filter(|a| !a.text.trim().is_empty()) {
            if let Some(span) = self.push_address(file, *a, "alias") {
                let text = self.key_text(span);
                let dup = primary.is_some_and(|p| self.key_text(p) == text)
                    || self.spans[spans_mark..]
                        .iter()
                        .any(|s| self.key_text(*s) == text);
                if dup {
                    self.arena.truncate(span.off as usize);
                } else {
                    self.spans.push(span);
                    n_aliases = n_aliases.saturating_add(1);
                }
            }
        }
        let logins_mark = self.spans.len();
        let mut n_logins = 0u16;
        for l in m.logins.iter().filter(|l| !l.text.trim().is_empty()) {
            if let Some(span) = self.push_login(file, *l) {
                let text = self.key_text(span);
                if self.spans[logins_mark..]
                    .iter()
                    .any(|s| self.key_text(*s) == text)
                {
                    self.arena.truncate(span.off as usize);
                } else {
                    self.spans.push(span);
                    n_logins = n_logins.saturating_add(1);
                }
            }
        }
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
                        format!(
                            "guid {:?}: not a GUID (expected 8-4-4-4-12 hex digits)",
                            g.text
                        ),
                    );
                    None
                }
            },
        };
        let Some(primary) = primary else {
            self.arena.truncate(arena_mark);
            self.spans.truncate(spans_mark);
            return;
        };
        // A mailbox with a problem is still entered with the keys that are valid, so
        // that every other problem (an address or alias claimed twice) is reported in the
        // same run. The table cannot compile with the problem, so stand-ins never route.
        let (owner, overridden) = owner.unwrap_or((NO_TARGET, false));
        let guid = guid.unwrap_or(0);

        let keys: Vec<Span> = std::iter::once(primary)
            .chain(self.spans[spans_mark..logins_mark].iter().copied())
            .collect();
        let (owner, overridden) = match self.owner_override(keys.into_iter()) {
            Some(t) => (t, true),
            None => (owner, overridden),
        };
        let idx = self.mailboxes.len() as u32;
        self.mailboxes.push(MailboxRec {
            primary,
            extra: spans_mark as u32,
            n_aliases,
            n_logins,
            site: site.unwrap_or(NO_SITE),
            owner,
            overridden,
        });
        self.origins.push(Origin {
            file,
            line: m.address.line,
        });
        self.guids.push(guid);
        if let Some(site) = site {
            self.sites[site as usize].mailboxes += 1;
        }

        let pending = |b: &Self, span: Span, kind| PendingKey {
            hash: b.hasher.hash_one(b.arena[span.range()].as_bytes()),
            off: span.off,
            mailbox: idx,
            len: span.len as u16,
            owner,
            kind,
        };
        let p = pending(self, primary, KeyKind::Address);
        self.addr_keys.push(p);
        for i in spans_mark..logins_mark {
            let p = pending(self, self.spans[i], KeyKind::Alias);
            self.addr_keys.push(p);
        }
        for i in logins_mark..self.spans.len() {
            let p = pending(self, self.spans[i], KeyKind::Login);
            self.login_keys.push(p);
        }
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
    }

    /// Builds one index from its pending keys and reports keys claimed by two mailboxes.
    ///
    /// Inserting a million keys in arrival order touches a random cache line (and, on a
    /// virtual machine, a random page) per key. Sorting the keys by their bucket first
    /// (a radix sort on the bucket bits) makes the inserts walk the table front to back,
    /// which is several times faster for large tables.
    fn build_index(&mut self, mut keys: Vec<PendingKey>) -> HashTable<KeyEntry> {
        let hasher = self.hasher;
        let arena = self.arena.as_bytes();
        let rehash = |e: &KeyEntry| hasher.hash_one(&arena[e.span().range()]);
        let mut index: HashTable<KeyEntry> = HashTable::with_capacity(keys.len());
        let buckets = bucket_count(index.capacity());
        radix_sort_by_bucket(&mut keys, buckets);
        let mut dups: Vec<(PendingKey, u32)> = Vec::new();
        for p in &keys {
            let key = &arena[p.off as usize..p.off as usize + usize::from(p.len)];
            if let Some(e) = index.find(p.hash, |e| &arena[e.span().range()] == key) {
                if e.mailbox != p.mailbox {
                    dups.push((*p, e.mailbox));
                }
                continue;
            }
            index.insert_unique(p.hash, entry(p), rehash);
        }
        drop(keys);
        for (p, other) in dups {
            // Report at the mailbox that comes later in the sources.
            let (later, earlier) = (p.mailbox.max(other), p.mailbox.min(other));
            let key = self.arena[p.off as usize..p.off as usize + usize::from(p.len)].to_string();
            let kind = if p.kind == KeyKind::Login {
                KeyKind::Login
            } else if self.key_text(self.mailboxes[later as usize].primary) == key {
                KeyKind::Address
            } else {
                KeyKind::Alias
            };
            let o = self.origins[later as usize];
            let other = self.describe(earlier);
            self.error(
                o.file,
                o.line,
                format!("{} {key:?} is already claimed by {other}", kind.word()),
            );
        }
        index
    }

    /// The problems found so far, when a source cannot be read far enough to finish.
    pub fn into_errors(self) -> Diagnostics {
        self.diags
    }

    /// Final checks and compilation. Every problem is returned at once.
    pub fn finish(mut self) -> Result<RoutingTable, Diagnostics> {
        if self.domains.is_empty() && !self.files.is_empty() {
            self.error(
                0,
                0,
                "the routing table routes no domain (add a [domains.\"…\"] table)",
            );
        }
        for (i, site) in self.sites.iter().enumerate() {
            if site.mailboxes == 0 {
                let o = self.site_origins[i];
                let f = Arc::clone(&self.files[o.file as usize]);
                self.diags
                    .push(&f, o.line, format!("site {:?} has no mailboxes", site.name));
            }
        }
        let unused: Vec<(String, Origin)> = self
            .owner_overrides
            .iter()
            .filter(|(_, (_, _, used))| !used)
            .map(|(k, (_, o, _))| (k.clone(), *o))
            .collect();
        for (k, o) in unused {
            self.error(
                o.file,
                o.line,
                format!("[owners] names {k:?}, which is no mailbox"),
            );
        }
        let addr_keys = std::mem::take(&mut self.addr_keys);
        let addr_index = self.build_index(addr_keys);
        let login_keys = std::mem::take(&mut self.login_keys);
        let login_index = self.build_index(login_keys);
        if !self.diags.is_empty() {
            let mut d = self.diags;
            d.sort(&self.files);
            return Err(d);
        }
        let hash = stable_hash(&self);
        Ok(RoutingTable {
            // 1 for a table loaded on its own; the router renumbers what it installs.
            version: Version { seq: 1, hash },
            loaded_at: SystemTime::now(),
            source: self.source.into(),
            files: self.files.clone().into(),
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
            login_index,
            guid_index: self.guid_index,
            hasher: self.hasher,
        })
    }
}

fn entry(p: &PendingKey) -> KeyEntry {
    KeyEntry {
        off: p.off,
        mailbox: p.mailbox,
        len: p.len,
        owner: p.owner,
    }
}

/// hashbrown keeps 7/8 of its buckets usable and rounds buckets to a power of two; this
/// inverts `capacity()` back to the bucket count (only used to order inserts, so a wrong
/// guess costs speed, never correctness).
fn bucket_count(capacity: usize) -> usize {
    if capacity < 8 {
        (capacity + 1).next_power_of_two()
    } else {
        (capacity * 8 / 7).next_power_of_two()
    }
}

/// Sorts keys by `hash & (buckets - 1)`, the bucket hashbrown starts probing at: LSD radix
/// sort, 11 bits a pass.
fn radix_sort_by_bucket(keys: &mut Vec<PendingKey>, buckets: usize) {
    const BITS: u32 = 11;
    let mask = (buckets as u64).saturating_sub(1);
    let total_bits = u64::BITS - mask.leading_zeros();
    if keys.len() < 64 || total_bits == 0 {
        keys.sort_unstable_by_key(|k| k.hash & mask);
        return;
    }
    let mut scratch = keys.clone();
    let mut shift = 0;
    while shift < total_bits {
        let digit = |k: &PendingKey| ((k.hash & mask) >> shift) as usize & ((1 << BITS) - 1);
        let mut counts = vec![0usize; (1 << BITS) + 1];
        for k in keys.iter() {
            counts[digit(k) + 1] += 1;
        }
        for i in 1..counts.len() {
            counts[i] += counts[i - 1];
        }
        for k in keys.iter() {
            let d = digit(k);
            scratch[counts[d]] = *k;
            counts[d] += 1;
        }
        std::mem::swap(keys, &mut scratch);
        shift += BITS;
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
