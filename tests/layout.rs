//! The module tree stays as README and `src/lib.rs` draw it: layers that import only
//! downwards (so no cycles), protocols that never import each other, and a README layout
//! section that names what is in `src/`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Bottom to top; a module may import from its own layer or below. Within a layer, the
/// graph must still be acyclic (checked separately).
const LAYERS: &[&[&str]] = &[
    &["diagnostics", "date", "metric_names"],
    &["route", "config"],
    &["net", "upstream"],
    &["traffic"],
    &["smtp", "https"],
    &["control"],
    &["admin"],
    &["app", "demo"],
];

/// Protocol front ends: none may import another.
const PROTOCOLS: &[&str] = &["smtp", "https"];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// Top-level module → the top-level modules its code names: `crate::X`, each name of a
/// `crate::{X, Y::z}` group (on one line or several), and `super::` paths that climb to the
/// crate root (`super::X` in `src/a/mod.rs`, `super::super::X` in `src/a/b.rs`). Comment
/// lines are left out: a doc link is not an import.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "main" || module == "lib" {
            continue;
        }
        // How many `super::` reach the crate root from this file's module.
        let depth = rel.components().count() - usize::from(rel.ends_with("mod.rs"));
        let root_prefix = "super::".repeat(depth);
        let text: String = std::fs::read_to_string(&f)
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let deps = graph.entry(module.clone()).or_default();
        let mut names = Vec::new();
        for prefix in ["crate::", root_prefix.as_str()] {
            for (i, _) in text.match_indices(prefix) {
                // `super::` preceded by more `super::` climbs further than the root.
                if prefix.starts_with("super") && text[..i].ends_with("super::") {
                    continue;
                }
                names.extend(path_heads(&text[i + prefix.len()..]));
            }
        }
        deps.extend(names.into_iter().filter(|n| *n != module));
    }
    // Only names of top-level modules count: an inline `mod tests` adds a level, so its
    // `super::super::x` can look like a root path while naming a sibling.
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for deps in graph.values_mut() {
        deps.retain(|d| modules.contains(d));
    }
    graph
}

/// The first segment of a path, or of each path in a `{…}` group.
fn path_heads(rest: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let Some(group) = rest.strip_prefix('{') else {
        return vec![ident(rest)]
            .into_iter()
            .filter(|n| !n.is_empty())
            .collect();
    };
    // The group's items at depth 0, up to its closing brace.
    let mut heads = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                heads.push(ident(&group[start..i]));
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                heads.push(ident(&group[start..i]));
                start = i + 1;
            }
            _ => {}
        }
    }
    heads.retain(|n| !n.is_empty());
    heads
}

#[test]
fn the_import_reader_sees_groups_and_root_supers() {
    assert_eq!(path_heads("smtp::session::Session;"), ["smtp"]);
    assert_eq!(
        path_heads("{\n    net::Shutdown,\n    route::{Route, Router},\n}"),
        ["net", "route"]
    );
    assert!(path_heads("{}").is_empty());
}

#[test]
fn every_module_has_a_layer_and_imports_only_downwards() {
    let graph = imports();
    let mut wrong = Vec::new();
    for (module, deps) in &graph {
        let Some(own) = layer_of(module) else {
            wrong.push(format!(
                "src/{module} is in no layer: add it to LAYERS, lib.rs and README"
            ));
            continue;
        };
        for d in deps {
            match layer_of(d) {
                Some(l) if l <= own => {}
                Some(_) => wrong.push(format!("{module} imports {d}, a layer above it")),
                None => wrong.push(format!("{module} imports {d}, which is in no layer")),
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn no_import_cycles() {
    let graph = imports();
    // Kahn's algorithm: whatever cannot be ordered is on a cycle.
    let mut indegree: BTreeMap<&str, usize> = graph.keys().map(|m| (m.as_str(), 0)).collect();
    for deps in graph.values() {
        for d in deps {
            if let Some(n) = indegree.get_mut(d.as_str()) {
                *n += 1;
            }
        }
    }
    let mut ready: Vec<&str> = indegree
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(m, _)| *m)
        .collect();
    let mut ordered = 0;
    while let Some(m) = ready.pop() {
        ordered += 1;
        for d in &graph[m] {
            if let Some(n) = indegree.get_mut(d.as_str()) {
                *n -= 1;
                if *n == 0 {
                    ready.push(d.as_str());
                }
            }
        }
    }
    let on_cycle: Vec<&str> = indegree
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(m, _)| *m)
        .collect();
    assert_eq!(
        ordered,
        graph.len(),
        "modules on an import cycle: {on_cycle:?}"
    );
}

#[test]
fn protocols_never_import_each_other() {
    let graph = imports();
    for p in PROTOCOLS {
        let Some(deps) = graph.get(*p) else { continue };
        for other in PROTOCOLS.iter().filter(|o| *o != p) {
            assert!(!deps.contains(*other), "{p} imports {other}");
        }
    }
}

#[test]
fn readme_layout_names_what_is_in_src() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let section = readme
        .split("## Layout")
        .nth(1)
        .and_then(|s| s.split("```").nth(1))
        .expect("README has a ## Layout section with a code block");
    let listed: BTreeSet<String> = section
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.starts_with("src/"))
        .map(|w| w.trim_end_matches('/').to_string())
        .collect();
    let mut present = BTreeSet::new();
    for e in std::fs::read_dir(root.join("src")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().to_string();
        present.insert(format!("src/{name}"));
    }
    let missing: Vec<_> = present.difference(&listed).collect();
    let stale: Vec<_> = listed.difference(&present).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "README layout: not listed {missing:?}; listed but gone {stale:?}"
    );
}
