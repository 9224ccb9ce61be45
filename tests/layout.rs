//! The source tree's layering, checked: every `crate::…` (and `super::…`)
//! path in `src/` is resolved to the top-level module it names, and
//!
//! - no module imports one of a higher layer (commands → pipeline → stages
//!   → foundation; the stages in stream order);
//! - the graph of top-level modules has no cycle.
//!
//! `cargo test --test main layout` prints the graph when it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first. A module may use modules of its own layer or
/// below; within a layer the graph must still be acyclic.
const LAYERS: &[&[&str]] = &[
    &["lsn", "config", "retry", "metrics", "shutdown", "recent"],
    &["source"],
    &["decode"],
    &["transactions"],
    &["mapping"],
    &["batch"],
    &["sink"],
    &["pipeline"],
    &["http"],
    &["commands"],
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a file below `src/` (`src/batch/plan.rs` → batch, plan).
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" && stem != "main" {
        parts.push(stem.to_string());
    }
    parts
}

fn ident_at(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// The first segments of the paths a `crate::` or `super::` prefix starts
/// at `rest` (one, or several for a `{a, b::c}` group).
fn first_segments(rest: &str) -> Vec<String> {
    if let Some(group) = rest.strip_prefix('{') {
        let mut depth = 0usize;
        let mut items = vec![String::new()];
        for c in group.chars() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => items.push(String::new()),
                _ => {}
            }
            if depth == 0 && c != ',' && c != '{' && c != '}' {
                if let Some(last) = items.last_mut() {
                    last.push(c);
                }
            }
        }
        items
            .iter()
            .map(|i| ident_at(i.trim()))
            .filter(|i| !i.is_empty() && i != "self")
            .collect()
    } else {
        vec![ident_at(rest)]
    }
}

/// Top-level modules that `file` (at module path `at`) refers to.
fn references(text: &str, at: &[String]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let before = rest[..i].chars().last();
            rest = &rest[i + "crate::".len()..];
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
                continue;
            }
            out.extend(first_segments(rest));
        }
        let mut rest = code;
        while let Some(i) = rest.find("super::") {
            let before = rest[..i].chars().last();
            let mut tail = &rest[i..];
            rest = &rest[i + "super::".len()..];
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            // Within a folder `super::` stays in its top-level module; from
            // a top-level file it reaches the crate root (or, in the file's
            // own `mod tests`, the file: such names are no module here).
            let mut up = 0usize;
            while let Some(t) = tail.strip_prefix("super::") {
                up += 1;
                tail = t;
            }
            if up < at.len() {
                out.insert(at[0].clone());
            } else {
                out.extend(first_segments(tail));
            }
        }
    }
    out
}

#[test]
fn modules_depend_one_way_from_commands_down_to_the_foundation() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut upward = Vec::new();
    for file in &files {
        let at = module_path(&src, file);
        let Some(top) = at.first().cloned() else {
            continue; // lib.rs and main.rs declare the modules.
        };
        let own = layer_of(&top)
            .unwrap_or_else(|| panic!("{top} (src/{top}) is in no layer of tests/layout.rs"));
        let text = std::fs::read_to_string(file).unwrap();
        for used in references(&text, &at) {
            if used == top || layer_of(&used).is_none() {
                continue; // itself, or a crate-root item (error_sentence)
            }
            let theirs = layer_of(&used).unwrap_or(0);
            if theirs > own {
                upward.push(format!(
                    "src/{} uses {used}",
                    file.strip_prefix(&src).unwrap_or(file).display()
                ));
            }
            graph.entry(top.clone()).or_default().insert(used);
        }
    }
    assert!(
        upward.is_empty(),
        "modules import ones of a higher layer:\n{}",
        upward.join("\n")
    );
    // Depth-first search for a cycle.
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut cycle = path[i..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for m in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        if let Some(cycle) = visit(n, &graph, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}\nthe graph: {graph:#?}", cycle.join(" → "));
        }
    }
    // Every layer named exists, so the table cannot drift from the tree.
    for m in LAYERS.iter().flat_map(|l| l.iter()) {
        assert!(
            src.join(format!("{m}.rs")).exists() || src.join(m).join("mod.rs").exists(),
            "tests/layout.rs names {m}, which src/ does not have"
        );
    }
}

#[test]
fn the_reference_reader_sees_groups_and_supers() {
    let at = vec!["batch".to_string(), "plan".to_string()];
    let r = references(
        "use crate::{lsn::Lsn, mapping::{Mapping, quote}};\nuse super::Statement;\nfn f() { crate::sink::x(); }\n",
        &at,
    );
    let want: BTreeSet<String> = ["lsn", "mapping", "batch", "sink"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(r, want);
}
