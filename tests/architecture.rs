//! The architecture invariants of docs/ARCHITECTURE.md, checked against the source: which
//! module may name which (`crate::X` anywhere in a file), and where `unsafe` may appear.
//! A change that breaks a rule fails here, not in review.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// What the pure layers (config, codec, token) must never name: they know nothing of
/// sessions, threads or transports.
const PURE_LAYER_MUST_NOT_NAME: &[&str] = &[
    "session",
    "link",
    "shard",
    "transport",
    "control",
    "rpc",
    "app",
    "presence",
    "callback",
    "handover",
];

/// Each layer and the modules it must never name. Dependencies point one way:
/// config/codec/token -> session -> link -> shard/transport -> control/rpc -> app.
const RULES: &[(&str, &[&str])] = &[
    ("config", PURE_LAYER_MUST_NOT_NAME),
    ("codec", PURE_LAYER_MUST_NOT_NAME),
    ("token", PURE_LAYER_MUST_NOT_NAME),
    (
        "session",
        &[
            "link",
            "shard",
            "transport",
            "control",
            "rpc",
            "app",
            "presence",
            "callback",
            "handover",
        ],
    ),
    ("link", &["shard", "transport", "control", "rpc", "app"]),
    ("shard", &["control", "rpc", "app"]),
    ("transport", &["control", "rpc", "app"]),
    ("control", &["shard", "transport", "app"]),
    ("rpc", &["shard", "transport", "app"]),
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`src/shard/table.rs` -> `shard`).
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

/// The code of a file without its unit tests (`#[cfg(test)] mod tests` at the end) and
/// without comments, which may name anything.
fn code_of(text: &str) -> String {
    let code = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    code.lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every top-level module a piece of code names with `crate::X` or `use crate::{X, ..}`.
fn named_modules(code: &str) -> BTreeSet<String> {
    let mut named = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    named.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            named.insert(name);
        }
    }
    named
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn dependencies_point_one_way() {
    let src = src_dir();
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut broken = Vec::new();
    for file in &files {
        let module = module_of(&src, file);
        let Some((_, forbidden)) = RULES.iter().find(|(layer, _)| *layer == module) else {
            continue;
        };
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        for name in named_modules(&code) {
            if forbidden.contains(&name.as_str()) {
                broken.push(format!(
                    "{} names crate::{name}",
                    file.strip_prefix(&src).unwrap().display()
                ));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "architecture invariants broken:\n{}",
        broken.join("\n")
    );
}

#[test]
fn unsafe_code_stays_in_sys() {
    let src = src_dir();
    let mut files = Vec::new();
    sources(&src, &mut files);
    let offenders: Vec<_> = files
        .iter()
        .filter(|f| !f.ends_with("sys.rs"))
        .filter(|f| {
            let code = code_of(&std::fs::read_to_string(f).unwrap());
            code.contains("unsafe {") || code.contains("unsafe fn") || code.contains("unsafe impl")
        })
        .map(|f| f.strip_prefix(&src).unwrap().display().to_string())
        .collect();
    assert!(
        offenders.is_empty(),
        "unsafe outside src/sys.rs: {offenders:?}"
    );
}

#[test]
fn the_scanner_finds_grouped_and_inline_names() {
    let named = named_modules(
        "use crate::{config::Config, codec::Message};\nlet x = crate::fault::panic_if_named(a, b);",
    );
    assert_eq!(
        named.into_iter().collect::<Vec<_>>(),
        ["codec", "config", "fault"]
    );
}
