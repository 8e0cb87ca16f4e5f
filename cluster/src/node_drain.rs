//! The keep-alive-safe drain for Node workers: `node/drain.mjs`, loaded into each Node
//! worker before its program, which stays unchanged. What it does is said in the
//! module's opening comment and in [`Settings::node_keepalive_drain`](crate::Settings).
//!
//! How it is loaded: as CommonJS with `node --require FILE`, the file written once into
//! a directory of this user's own under the temporary directory (`cluster-node-UID/`,
//! mode 0755, which nobody else may write; the file named by its content's hash); or,
//! when no such file can be made, as `node --import data:text/javascript,<the module>`.
//! The file is the fast way: Node starts its ES module loader for an `--import`, about
//! 8 ms more per worker start.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The module's source (an ES module, for `--import`).
const DRAIN_MODULE: &str = include_str!("node/drain.mjs");

/// The arguments for `node`, before the program, that load the drain: `--require` and
/// the module's file when it can be written (or is there already), else `--import` and
/// the module as a `data:` URL.
pub(crate) fn preload_args() -> [String; 2] {
    match commonjs_file(&std::env::temp_dir()) {
        Ok(path) => ["--require".to_owned(), path.to_string_lossy().into_owned()],
        Err(e) => {
            tracing::debug!(error = %e, "the drain module goes as a data: URL");
            import_args()
        }
    }
}

/// Whether the file `args` names (if they name one) is still there: a temporary-files
/// cleaner may have removed it while the primary ran.
pub(crate) fn still_there(args: &[String; 2]) -> bool {
    args[0] != "--require" || Path::new(&args[1]).is_file()
}

/// `--import` and the module as a `data:` URL: nothing on disk.
fn import_args() -> [String; 2] {
    ["--import".to_owned(), data_url(DRAIN_MODULE)]
}

/// The module as CommonJS: its `import X from 'node:Y';` lines as `require`s.
fn commonjs(source: &str) -> String {
    source
        .lines()
        .map(|line| {
            let import = line
                .strip_prefix("import ")
                .and_then(|rest| rest.strip_suffix(';'))
                .and_then(|rest| rest.split_once(" from "));
            match import {
                Some((name, module)) => format!("const {name} = require({module});"),
                None => line.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// Writes the CommonJS module into `TMP/cluster-node-UID/drain-HASH.cjs` unless it is
/// there already, and returns its path. The directory must be a real directory of this
/// user's, which nobody else may write (created 0755 if missing: workers that run as
/// another user can read the module); the file is written
/// under a name of its own and renamed into place, so a reader never sees half of it.
fn commonjs_file(tmp: &Path) -> std::io::Result<PathBuf> {
    use std::hash::{Hash, Hasher};
    let uid = nix::unistd::geteuid().as_raw();
    let dir = tmp.join(format!("cluster-node-{uid}"));
    match std::fs::DirBuilder::new().mode(0o755).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(&dir)?;
    if !meta.is_dir() || meta.uid() != uid || meta.permissions().mode() & 0o022 != 0 {
        return Err(std::io::Error::other(format!(
            "{} is not a directory of this user's that only it may write",
            dir.display()
        )));
    }
    let source = commonjs(DRAIN_MODULE);
    // `DefaultHasher::new` has fixed keys: the same module, the same name.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    source.hash(&mut hasher);
    let path = dir.join(format!("drain-{:016x}.cjs", hasher.finish()));
    if std::fs::read_to_string(&path).is_ok_and(|there| there == source) {
        return Ok(path);
    }
    let partial = dir.join(format!(".drain-{}.partial", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&partial)?;
    file.write_all(source.as_bytes())?;
    drop(file);
    std::fs::rename(&partial, &path)?;
    Ok(path)
}

/// `data:text/javascript,` and `source` percent-encoded (everything but RFC 3986's
/// unreserved characters).
fn data_url(source: &str) -> String {
    let mut url = String::from("data:text/javascript,");
    for byte in source.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            url.push(char::from(byte));
        } else {
            url.push_str(&format!("%{byte:02X}"));
        }
    }
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(encoded: &str) -> String {
        let bytes = encoded.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_module_travels_whole_in_a_url_of_safe_characters() {
        let [flag, url] = import_args();
        assert_eq!(flag, "--import");
        let body = url
            .strip_prefix("data:text/javascript,")
            .expect("a data URL");
        assert!(
            body.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b)),
            "{body}"
        );
        assert_eq!(decode(body), DRAIN_MODULE);
        assert!(DRAIN_MODULE.contains("exitedAfterDisconnect"));
    }

    #[test]
    fn the_commonjs_module_requires_what_the_es_module_imports() {
        let cjs = commonjs(DRAIN_MODULE);
        assert!(!cjs.lines().any(|l| l.starts_with("import ")), "{cjs}");
        for module in ["cluster", "http"] {
            assert!(
                cjs.contains(&format!("const {module} = require('node:{module}');")),
                "{cjs}"
            );
        }
        assert_eq!(
            cjs.lines().count(),
            DRAIN_MODULE.lines().count(),
            "only the import lines change"
        );
    }

    /// Both forms load in Node and patch the one `closeIdleConnections` that HTTP servers
    /// have and HTTPS servers copy when `https` is loaded, without loading `https`
    /// themselves. Skipped without `node`.
    #[test]
    fn node_loads_either_form_and_https_servers_get_the_drain_lazily() {
        let probe = "const early = process.moduleLoadList.includes('NativeModule https'); \
            const http = require('http'); const https = require('https'); \
            const drain = http.Server.prototype.closeIdleConnections; \
            console.log(JSON.stringify([early, https.Server.prototype.closeIdleConnections === drain, \
            drain.toString().includes('exitedAfterDisconnect')]));";
        let tmp = testkit::TempDir::new("cluster-drain-node");
        let file = commonjs_file(tmp.path()).expect("written");
        let forms = [
            ["--require".to_owned(), file.to_string_lossy().into_owned()],
            import_args(),
        ];
        for [flag, module] in forms {
            let output = std::process::Command::new("node")
                .args([&flag, &module, "-e", probe])
                .output();
            let output = match output {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    eprintln!("node is not installed: skipped");
                    break;
                }
                other => other.expect("node runs"),
            };
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert!(
                output.status.success(),
                "{flag}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            assert_eq!(stdout.trim(), "[false,true,true]", "{flag}");
        }
    }

    #[test]
    fn the_file_is_written_once_in_a_directory_of_ours_and_one_others_may_write_is_refused() {
        let tmp = testkit::TempDir::new("cluster-drain-test");
        let path = commonjs_file(tmp.path()).expect("written");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            commonjs(DRAIN_MODULE)
        );
        let dir = path.parent().expect("its directory");
        let mode = std::fs::metadata(dir).expect("dir").permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(
            commonjs_file(tmp.path()).expect("found"),
            path,
            "the same file again"
        );
        assert!(still_there(&[
            "--require".into(),
            path.to_string_lossy().into()
        ]));
        // A directory others may write is not used.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        assert!(commonjs_file(tmp.path()).is_err());
        drop(tmp);
        assert!(!still_there(&[
            "--require".into(),
            path.to_string_lossy().into()
        ]));
    }
}
