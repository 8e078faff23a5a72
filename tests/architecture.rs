//! The layout tells the truth: the crate's top-level modules are declared in `src/lib.rs` in data-flow
//! order, and each uses only modules declared before it (so there is no import cycle, and nothing upstream
//! reaches downstream). Checked from the source: every `crate::name` path and every name imported from
//! the crate root (mapped to the module it is re-exported from).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The top-level modules in declaration order.
fn module_order(lib: &str) -> Vec<String> {
    lib.lines()
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix("pub mod ")
                .or_else(|| l.strip_prefix("mod "))
                .and_then(|r| r.strip_suffix(';'))
                .map(str::to_string)
        })
        .collect()
}

/// Names re-exported at the crate root, and the module each comes from.
fn root_reexports(lib: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let text: String = lib.split('\n').collect::<Vec<_>>().join(" ");
    for stmt in text.split(';') {
        let Some(rest) = stmt.trim().strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, names)) = rest.split_once("::") else {
            continue;
        };
        let names = names.trim().trim_start_matches('{').trim_end_matches('}');
        for name in names.split(',') {
            let name = name.trim().rsplit("::").next().unwrap_or("").trim();
            if !name.is_empty() {
                map.insert(name.to_string(), module.trim().to_string());
            }
        }
    }
    map
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

/// The crate modules a file refers to: `crate::m` paths, and root names in `use crate::{...}` lists.
fn references(
    text: &str,
    modules: &[String],
    roots: &BTreeMap<String, String>,
) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(list) = rest.strip_prefix('{') {
            let list = &list[..list.find('}').unwrap_or(list.len())];
            for item in list.split(',') {
                let head = item.trim().split("::").next().unwrap_or("").trim();
                if modules.iter().any(|m| m == head) {
                    found.insert(head.to_string());
                } else if let Some(m) = roots.get(head) {
                    found.insert(m.clone());
                }
            }
            continue;
        }
        let head: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if modules.contains(&head) {
            found.insert(head);
        } else if let Some(m) = roots.get(&head) {
            found.insert(m.clone());
        }
    }
    found
}

#[test]
fn modules_depend_only_on_modules_declared_before_them() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let order = module_order(&lib);
    let roots = root_reexports(&lib);
    assert!(order.len() > 10, "modules found: {order:?}");
    let mut violations = Vec::new();
    for (position, module) in order.iter().enumerate() {
        let mut files = Vec::new();
        let dir = src().join(module);
        if dir.is_dir() {
            rust_files(&dir, &mut files);
        }
        let file = src().join(format!("{module}.rs"));
        if file.exists() {
            files.push(file);
        }
        assert!(!files.is_empty(), "no source for module {module}");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            // Only code: doc comments may point anywhere.
            let code: String = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            for used in references(&code, &order, &roots) {
                let at = order.iter().position(|m| *m == used).unwrap();
                if at > position {
                    violations.push(format!(
                        "{} (module {module}) uses {used}, declared after it",
                        file.strip_prefix(src()).unwrap().display()
                    ));
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "module order in src/lib.rs: {order:?}\n{}",
        violations.join("\n")
    );
}
