//! The layers of `src/` as the code has them: every `crate::MODULE` path
//! outside comments and unit-test modules is an arrow from the module it
//! is written in to the top-level module it names. The arrows must form no
//! cycle and point downwards only, as docs/architecture.md draws them:
//!
//! ```text
//! cli → service → operations (checkpoint, migration, numa) → transfer
//!     → devices → guest → vmm → arch, host → memory
//! ```
//!
//! with `api` (the contract: requests, reports, error kinds) and `util`
//! beneath everything, importing nothing. `cli` speaks only `api` (and
//! `util`, and `balance`, the planner: a pure function over API types);
//! no operation imports another. Run with `--nocapture` to print
//! the arrows.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each top-level module's layer: an arrow must go to a lower layer.
const LAYERS: &[(&str, u32)] = &[
    ("api", 0),
    ("util", 0),
    ("balance", 1),
    ("memory", 1),
    ("host", 2),
    ("arch", 2),
    ("vmm", 3),
    ("guest", 4),
    ("transfer", 4),
    ("devices", 5),
    ("checkpoint", 6),
    ("migration", 6),
    ("numa", 6),
    ("service", 7),
    ("cli", 8),
];

/// The only modules the CLI may name.
const CLI_MAY_USE: &[&str] = &["api", "balance", "util"];

/// Code of a source file without its unit-test module and its comments.
fn code(text: &str) -> String {
    let body = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    body.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            walk(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// module → modules it names, with where.
fn arrows() -> BTreeMap<String, BTreeMap<String, String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let known: BTreeSet<&str> = LAYERS.iter().map(|l| l.0).collect();
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).expect("under src");
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .expect("a path")
            .trim_end_matches(".rs")
            .to_string();
        // lib.rs and main.rs assemble the crate; a `tests.rs` file is a
        // unit-test module kept apart.
        if top == "lib" || top == "main" || rel.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        assert!(
            known.contains(top.as_str()),
            "src/{} is in module {top}, which LAYERS does not place",
            rel.display()
        );
        let text = code(&std::fs::read_to_string(&f).expect("read source"));
        for (i, line) in text.lines().enumerate() {
            let mut rest = line;
            while let Some(at) = rest.find("crate::") {
                rest = &rest[at + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if name != top && known.contains(name.as_str()) {
                    out.entry(top.clone())
                        .or_default()
                        .entry(name)
                        .or_insert_with(|| format!("src/{}:{}", rel.display(), i + 1));
                }
            }
        }
    }
    out
}

fn layer(m: &str) -> u32 {
    LAYERS
        .iter()
        .find(|l| l.0 == m)
        .map(|l| l.1)
        .expect("placed")
}

#[test]
fn every_import_points_down_the_layers_and_none_makes_a_cycle() {
    let arrows = arrows();
    for (from, tos) in &arrows {
        println!(
            "{from} → {}",
            tos.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    let mut wrong = Vec::new();
    for (from, tos) in &arrows {
        for (to, at) in tos {
            if layer(to) >= layer(from) {
                wrong.push(format!("{from} → {to} ({at})"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that go up or sideways:\n{}",
        wrong.join("\n")
    );
    // With every arrow going down, a cycle cannot exist; check it anyway
    // by depth-first search, so a wrong LAYERS table cannot hide one.
    fn visit(
        m: &str,
        arrows: &BTreeMap<String, BTreeMap<String, String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if let Some(i) = path.iter().position(|p| p == m) {
            panic!("module cycle: {} → {m}", path[i..].join(" → "));
        }
        if !done.insert(m.to_string()) {
            return;
        }
        path.push(m.to_string());
        for to in arrows.get(m).into_iter().flat_map(|t| t.keys()) {
            visit(to, arrows, path, done);
        }
        path.pop();
    }
    let mut done = BTreeSet::new();
    for m in arrows.keys() {
        visit(m, &arrows, &mut Vec::new(), &mut done);
    }
}

#[test]
fn the_cli_speaks_only_the_api() {
    let arrows = arrows();
    let cli = arrows.get("cli").cloned().unwrap_or_default();
    let below: Vec<String> = cli
        .iter()
        .filter(|(to, _)| !CLI_MAY_USE.contains(&to.as_str()))
        .map(|(to, at)| format!("{to} ({at})"))
        .collect();
    assert!(below.is_empty(), "cli names {}", below.join(", "));
}

#[test]
fn no_operation_imports_another_and_the_api_imports_nothing() {
    let arrows = arrows();
    for op in ["checkpoint", "migration", "numa"] {
        for other in ["checkpoint", "migration", "numa"] {
            if let Some(at) = arrows.get(op).and_then(|t| t.get(other)) {
                panic!("operation {op} imports operation {other} ({at})");
            }
        }
    }
    for leaf in ["api", "util"] {
        assert!(
            arrows.get(leaf).is_none_or(|t| t.is_empty()),
            "{leaf} imports {:?}",
            arrows.get(leaf)
        );
    }
}
