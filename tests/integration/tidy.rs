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
