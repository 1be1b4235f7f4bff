//! One lookup explained for people and scripts: what `coexist lookup` and the admin API's
//! `/lookup` print.

use serde_json::json;

use super::normalize::{canonical_domain, check_local, split_address};
use super::{MailboxRef, Route, RoutingTable};

/// What one lookup found, for both output forms.
pub fn explain(table: &RoutingTable, input: &str) -> serde_json::Value {
    let query = input.trim().trim_start_matches('<').trim_end_matches('>');
    let version = table.version().to_string();
    let mailbox = |m: MailboxRef<'_>, via: &str| {
        json!({
            "query": input,
            "result": "mailbox",
            "via": via,
            "mailbox": m.address(),
            "site": m.site(),
            "owner": m.owner_name(),
            "owner_source": if m.owner_overridden() { "mailbox" } else { "site" },
            "guid": m.guid().map(|g| g.to_string()),
            "version": version,
        })
    };
    // A bare GUID or `<guid>@domain` (MAPI MailboxId, RPC/HTTP) names a mailbox by GUID.
    let guid_part = query.split_once('@').map_or(query, |(g, _)| g);
    if let Ok(g) = uuid::Uuid::parse_str(guid_part.trim_matches(['{', '}'])) {
        if let Some(m) = table.lookup_guid(g) {
            return mailbox(m, "guid");
        }
        // A well-formed GUID that no mailbox has is an answer, not a malformed address.
        if !query.contains('@') {
            return json!({"query": input, "result": "not_found", "via": "guid", "version": version});
        }
    }
    if query.contains('\\') {
        return match table.lookup_login(query) {
            Some(m) => mailbox(m, "login"),
            None => {
                json!({"query": input, "result": "not_found", "via": "login", "version": version})
            }
        };
    }
    match table.lookup(query) {
        Route::Mailbox(m) => {
            let via = if m.matched() == m.address() {
                if query.eq_ignore_ascii_case(m.address()) {
                    "address"
                } else {
                    "subaddress"
                }
            } else {
                "alias"
            };
            mailbox(m, via)
        }
        route => {
            // A UPN looks like an address in a domain we may not route.
            if let Some(m) = table.lookup_login(query) {
                return mailbox(m, "login");
            }
            // "not ours" or a domain default would send an operator looking in the wrong
            // place: `a b@example.com` is no address in any domain.
            if let Some(reason) = invalid(query) {
                return json!({
                    "query": input, "result": "invalid", "reason": reason, "version": version,
                });
            }
            match route {
                Route::DomainDefault { domain, target } => json!({
                    "query": input, "result": "domain_default", "domain": domain,
                    "owner": table.target_name(target), "version": version,
                }),
                Route::Reject { domain } => json!({
                    "query": input, "result": "reject", "domain": domain, "version": version,
                }),
                _ => json!({"query": input, "result": "not_ours", "version": version}),
            }
        }
    }
}

/// Why `query` is not an address at all, or `None` when it is one.
fn invalid(query: &str) -> Option<String> {
    let check = || {
        let (local, domain) = split_address(query)?;
        check_local(local)?;
        canonical_domain(domain).map(|_| ())
    };
    check().err().map(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::invalid;

    #[test]
    fn what_is_no_address() {
        assert_eq!(invalid("bad address").as_deref(), Some("missing '@'"));
        assert!(invalid("a b@example.com").is_some());
        assert!(invalid("a@exa mple.com").is_some());
        assert!(invalid("a@").is_some());
        assert_eq!(invalid("someone@gmail.com"), None);
        assert_eq!(invalid("\"a b\"@example.com"), None);
    }
}
