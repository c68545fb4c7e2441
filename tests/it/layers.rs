//! The house is one-way (issue 15): a module imports (`crate::…`) only modules below it.
//! The layers, top to bottom: the service (`service`, which composes `run`), the command
//! line's commands (`cli`; `check`, `rebase`, `tail`), `config` (which
//! composes the settings each module defines for itself), the HTTP API (`api`), the job
//! runner (`jobs`) and the console's data (`console`), the service (`app`), the stages (`source`, `consumer`) over what they
//! share (`bus`, `central`), `store` and `values` (Postgres text to event values), and the
//! core (`event` and `pg` over `lsn`, `json`, `backoff`, `metrics`, `time`, `setting`, `ownership`). Imports that go against the order and are not yet removed are
//! listed in `KNOWN`; the test fails on any other, and on a listed one that is gone (so the
//! list only shrinks).

use std::collections::BTreeSet;
use std::path::Path;

/// Each top-level module's layer: higher may import lower.
const LAYERS: &[(&str, u8)] = &[
    ("lsn", 0),
    ("json", 0),
    ("backoff", 0),
    ("metrics", 0),
    ("time", 0),
    ("setting", 0),
    ("ownership", 0),
    ("pg", 1),
    ("values", 2),
    ("event", 1),
    ("store", 2),
    ("bus", 3),
    ("central", 3),
    ("source", 4),
    ("consumer", 4),
    ("app", 5),
    ("jobs", 6),
    ("console", 6),
    ("api", 7),
    ("config", 8),
    ("check", 9),
    ("rebase", 9),
    ("tail", 9),
    ("cli", 10),
    ("service", 11),
];

/// Imports against the order that are still to be removed (issue 15), as (from, to).
const KNOWN: &[(&str, &str)] = &[];

fn layer(module: &str) -> u8 {
    LAYERS
        .iter()
        .find(|(m, _)| *m == module)
        .map(|(_, l)| *l)
        .unwrap_or_else(|| panic!("module {module} has no layer in tests/it/layers.rs"))
}

/// Every (module, imported module) pair of `crate::` paths in `dir`'s code (comments left
/// out: a doc link is not a dependency).
fn imports(dir: &Path, module: Option<&str>, out: &mut BTreeSet<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            imports(&path, Some(module.unwrap_or(&name)), out);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let from = module.unwrap_or(&name).to_string();
        if from == "lib" || from == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for (i, _) in line.match_indices("crate::") {
                let to: String = line[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                // `crate::Lsn` and other root re-exports are the core.
                if !to.is_empty() && to != from {
                    out.insert((from.clone(), to));
                }
            }
        }
    }
}

#[test]
fn modules_import_only_the_layers_below_them() {
    let mut found = BTreeSet::new();
    imports(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        None,
        &mut found,
    );
    let upward: BTreeSet<(String, String)> = found
        .into_iter()
        .filter(|(from, to)| layer(to) >= layer(from))
        .collect();
    let known: BTreeSet<(String, String)> = KNOWN
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let new: Vec<_> = upward.difference(&known).collect();
    assert!(
        new.is_empty(),
        "imports against the layer order (a module may import only modules below it): {new:?}"
    );
    let gone: Vec<_> = known.difference(&upward).collect();
    assert!(
        gone.is_empty(),
        "no longer imported, take them out of KNOWN: {gone:?}"
    );
}
