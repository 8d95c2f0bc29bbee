//! The layering ARCHITECTURE.md describes holds: every `crate::` path in a
//! module of src/ names a module of a row above it in the "Layers" table,
//! or one earlier in its own row, so there is no import loop.

use std::collections::HashMap;
use std::path::Path;

/// Module name → (row, position in the row), from the table.
fn layers() -> HashMap<String, (usize, usize)> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/ARCHITECTURE.md")).unwrap();
    let table = text.split("## Layers (src/)").nth(1).unwrap();
    let table = table.split("\n## ").next().unwrap();
    let mut layers = HashMap::new();
    for (row, line) in table.lines().filter(|l| l.starts_with("| `")).enumerate() {
        let first = line.split('|').nth(1).unwrap();
        for (pos, name) in first.split('`').skip(1).step_by(2).enumerate() {
            let module = name
                .trim_end_matches(".rs")
                .trim_end_matches('/')
                .to_string();
            layers.insert(module, (row, pos));
        }
    }
    layers
}

/// The top-level module a file of src/ belongs to.
fn module_of(path: &Path) -> String {
    let relative = path
        .strip_prefix(concat!(env!("CARGO_MANIFEST_DIR"), "/src"))
        .unwrap();
    let first = relative
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_uses_only_modules_above_it() {
    let layers = layers();
    let mut sources = Vec::new();
    files(
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src")),
        &mut sources,
    );
    let mut wrong = Vec::new();
    for path in sources {
        let module = module_of(&path);
        if module == "lib" {
            continue;
        }
        let Some(&(row, pos)) = layers.get(&module) else {
            panic!(
                "{module} (from {}) is not in ARCHITECTURE.md's Layers table",
                path.display()
            );
        };
        let text = std::fs::read_to_string(&path).unwrap();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + 7..];
            let used: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if used == module || used.is_empty() {
                continue;
            }
            let Some(&(used_row, used_pos)) = layers.get(&used) else {
                // crate::{a, b} groups and the like: names checked below.
                continue;
            };
            if (used_row, used_pos) > (row, pos) && used_row >= row {
                wrong.push(format!("{module} uses {used} ({})", path.display()));
            }
        }
        // use crate::{a, b}
        for group in text.split("use crate::{").skip(1) {
            let names = group.split('}').next().unwrap();
            for name in names.split(',') {
                let used = name.trim().split("::").next().unwrap().trim().to_string();
                if let Some(&(used_row, used_pos)) = layers.get(&used)
                    && used != module
                    && (used_row, used_pos) > (row, pos)
                    && used_row >= row
                {
                    wrong.push(format!("{module} uses {used} ({})", path.display()));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "upward or sideways uses:\n{}",
        wrong.join("\n")
    );
}
