//! Workspace-wide conventions checked by `cargo test`.

use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("dir entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            if !name.starts_with('.') && name != "target" {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

fn all_rust_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    rust_files(&workspace_root(), &mut files);
    assert!(files.len() > 10, "found only {} .rs files", files.len());
    files
}

#[test]
fn every_rust_file_opens_with_a_module_doc() {
    let missing: Vec<_> = all_rust_files()
        .into_iter()
        .filter(|path| {
            let text = std::fs::read_to_string(path).expect("read");
            !text.trim_start().starts_with("//!")
        })
        .collect();
    assert!(
        missing.is_empty(),
        "files without a `//!` first line: {missing:#?}"
    );
}

#[test]
fn unsafe_code_lives_in_sys_modules() {
    let offenders: Vec<_> = all_rust_files()
        .into_iter()
        .filter(|path| {
            // This file names the keyword in its patterns.
            if path.ends_with("tests/integration/tidy.rs") {
                return false;
            }
            let in_sys = path
                .components()
                .any(|c| c.as_os_str() == "sys.rs" || c.as_os_str() == "sys");
            let text = std::fs::read_to_string(path).expect("read");
            !in_sys
                && text.lines().any(|l| {
                    let code = l.split("//").next().unwrap_or("");
                    code.contains("unsafe {")
                        || code.contains("unsafe fn")
                        || code.contains("unsafe impl")
                })
        })
        .collect();
    assert!(
        offenders.is_empty(),
        "unsafe outside a sys module: {offenders:#?}"
    );
}

#[test]
fn every_member_uses_the_workspace_lints() {
    for member in [
        "ipc",
        "child",
        "cluster",
        "httpd-demo",
        "xtask",
        "tests",
        "testkit",
    ] {
        let manifest = workspace_root().join(member).join("Cargo.toml");
        let text = std::fs::read_to_string(&manifest).expect("read manifest");
        assert!(
            text.contains("[lints]\nworkspace = true"),
            "{} does not use the workspace lints",
            manifest.display()
        );
    }
}

/// Every file and directory under the root, relative to it with `/` separators (`target`
/// and `.git` left out); directories end with `/`.
fn workspace_paths() -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).expect("read_dir") {
            let path = entry.expect("dir entry").path();
            let relative = path.strip_prefix(root).expect("under the root");
            let relative = relative.to_str().expect("utf-8 path").to_owned();
            if path.is_dir() {
                if relative != "target" && relative != ".git" {
                    out.push(format!("{relative}/"));
                    walk(root, &path, out);
                }
            } else {
                out.push(relative);
            }
        }
    }
    let root = workspace_root();
    let mut paths = Vec::new();
    walk(&root, &root, &mut paths);
    paths
}

/// A code span of ARCHITECTURE.md that names a file or directory, and the crate whose
/// section of the code map names it (`None` above the code map's first crate heading).
#[derive(Debug)]
struct NamedPath {
    section: Option<String>,
    path: String,
}

/// The file kinds a code span without a `/` must end with to count as a path.
const FILE_EXTENSIONS: &[&str] = &[
    ".rs", ".mjs", ".js", ".toml", ".md", ".conf", ".json", ".txt", ".service", ".socket",
];

/// The paths ARCHITECTURE.md (`text`) names in code spans: `a/b.rs`, `dir/`, `main.rs`.
/// Absolute paths (`/proc/..`), outputs under `target/`, patterns and code are not paths.
fn named_paths(text: &str) -> Vec<NamedPath> {
    let mut named = Vec::new();
    let mut section = None;
    let mut fenced = false;
    let mut prose = String::new();
    let mut flush = |prose: &mut String, section: &Option<String>| {
        for (i, span) in prose.split('`').enumerate() {
            let is_path = i % 2 == 1
                && !span.is_empty()
                && !span.starts_with('/')
                && (span.contains('/') || !span.starts_with('.'))
                && !span.starts_with("target/")
                && span
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_./-".contains(c))
                && (span.contains('/') || FILE_EXTENSIONS.iter().any(|e| span.ends_with(e)));
            if is_path {
                named.push(NamedPath {
                    section: section.clone(),
                    path: span.to_owned(),
                });
            }
        }
        prose.clear();
    };
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        if line.starts_with('#') {
            flush(&mut prose, &section);
            section = line
                .strip_prefix("### `")
                .and_then(|rest| rest.strip_suffix('`'))
                .map(str::to_owned);
            continue;
        }
        prose.push_str(line);
        prose.push('\n');
    }
    flush(&mut prose, &section);
    named
}

/// Whether `named` names `path` (a workspace path): the whole of it, or its end at a `/`;
/// from a crate's section, a path inside that crate (or a path from the root).
fn names(named: &NamedPath, path: &str) -> bool {
    let tail = named.path.trim_end_matches('/');
    let path = path.trim_end_matches('/');
    let ends_with = |p: &str| p == tail || p.ends_with(&format!("/{tail}"));
    match &named.section {
        None => ends_with(path),
        Some(krate) => {
            (tail.contains('/') && path == tail)
                || path
                    .strip_prefix(&format!("{krate}/"))
                    .is_some_and(ends_with)
        }
    }
}

/// Whether `named` is a folder's entry (a directory: `bench/`, `tests/node/`) that
/// contains `path`. A module file (`channel.rs`) does not cover its submodules: the map
/// names them, so that a file added to a folder of submodules is noticed.
fn contains(named: &NamedPath, path: &str) -> bool {
    named.path.ends_with('/')
        && path
            .match_indices('/')
            .map(|(i, _)| &path[..=i])
            .any(|prefix| prefix.len() < path.len() && names(named, prefix))
}

fn architecture() -> String {
    std::fs::read_to_string(workspace_root().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md")
}

/// What [`every_path_in_architecture_md_exists`] reports: the named paths no file is.
fn missing_paths(text: &str, paths: &[String]) -> Vec<String> {
    named_paths(text)
        .into_iter()
        .filter(|named| !paths.iter().any(|path| names(named, path)))
        .map(|named| match named.section {
            Some(krate) => format!("`{}` (in the `{krate}` section)", named.path),
            None => format!("`{}`", named.path),
        })
        .collect()
}

#[test]
fn every_path_in_architecture_md_exists() {
    let text = architecture();
    assert!(named_paths(&text).len() > 50, "found too few paths");
    let missing = missing_paths(&text, &workspace_paths());
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names paths that do not exist (rename or remove them there): {missing:#?}"
    );
}

/// The source files: Rust, and the JavaScript the crates and tests run.
fn is_source(path: &str) -> bool {
    [".rs", ".js", ".mjs"].iter().any(|e| path.ends_with(e))
}

/// What [`every_source_file_is_in_architecture_md`] reports: the source files that no
/// path of ARCHITECTURE.md names or contains.
fn unmapped_files(text: &str, paths: &[String]) -> Vec<String> {
    let named = named_paths(text);
    paths
        .iter()
        .filter(|path| is_source(path))
        .filter(|path| !named.iter().any(|n| names(n, path) || contains(n, path)))
        .cloned()
        .collect()
}

#[test]
fn every_source_file_is_in_architecture_md() {
    let unmapped = unmapped_files(&architecture(), &workspace_paths());
    assert!(
        unmapped.is_empty(),
        "source files that ARCHITECTURE.md neither names nor covers with a folder's entry \
         (`dir/`): add them to the code map: {unmapped:#?}"
    );
}

/// The files that belong at the root: manifests, docs, licences.
const ROOT_FILES: &[&str] = &[
    ".git", // a worktree's link to its repository
    ".gitignore",
    "ARCHITECTURE.md",
    "Cargo.lock",
    "Cargo.toml",
    "LICENSE-APACHE",
    "LICENSE-MIT",
    "README.md",
];

/// The directories that belong at the root besides the members.
const ROOT_DIRS: &[&str] = &[".cargo", ".ci", ".git", "target"];

/// What [`the_root_holds_only_known_non_empty_files`] reports.
fn root_strays(root: &Path, members: &[String]) -> Vec<String> {
    let mut strays = Vec::new();
    for entry in std::fs::read_dir(root).expect("read_dir") {
        let entry = entry.expect("dir entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        let meta = entry.metadata().expect("metadata");
        if meta.is_dir() {
            if !ROOT_DIRS.contains(&name.as_str()) && !members.contains(&name) {
                strays.push(format!("{name}/: not a member"));
            }
        } else if !ROOT_FILES.contains(&name.as_str()) {
            strays.push(format!("{name}: unknown"));
        } else if meta.len() == 0 {
            strays.push(format!("{name}: empty"));
        }
    }
    strays
}

/// The members listed in the root manifest.
fn members() -> Vec<String> {
    let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml")).expect("read");
    let line = manifest
        .lines()
        .find(|l| l.starts_with("members = ["))
        .expect("a one-line members list");
    line.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_root_holds_only_known_non_empty_files() {
    let members = members();
    assert!(members.len() >= 7, "members: {members:?}");
    let strays = root_strays(&workspace_root(), &members);
    assert!(
        strays.is_empty(),
        "the workspace root holds files that do not belong there (remove them, or add \
         them to ROOT_FILES in tests/integration/tidy.rs): {strays:#?}"
    );
}
