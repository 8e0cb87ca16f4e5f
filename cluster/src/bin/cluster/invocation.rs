//! What the command line asks to run: a Node program (spoken to in Node's cluster
//! protocol) or any other program (spoken to in this crate's protocol).
//!
//! Node programs are recognised in every form an operator writes them:
//!
//! ```text
//! cluster -- app.js ARGS                       .js, .mjs, .cjs: run with --node (node)
//! cluster -- node [NODE_FLAGS] app.js ARGS     node, nodejs, node20, /path/to/node
//! cluster -- ./server ARGS                     a script whose #! line runs node
//! ```
//!
//! NODE_FLAGS (and `--node-args "..."`, split like a shell would) become the workers'
//! `execArgv`, placed between node and the script.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::path::Path;

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Invocation {
    /// A Node script, run as `node NODE_ARGS script ARGS`.
    Node {
        /// The Node executable (a name looked up in `PATH`, or a path).
        node: OsString,
        /// Node's options, before the script.
        node_args: Vec<OsString>,
        /// The script.
        script: OsString,
        /// The script's arguments.
        args: Vec<OsString>,
    },
    /// Any other program (built on the `cluster` crate).
    Program {
        /// The program.
        program: OsString,
        /// Its arguments.
        args: Vec<OsString>,
    },
}

/// Why a command line cannot be run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum InvocationError {
    /// No program at all.
    #[error("no PROGRAM given (see cluster --help)")]
    NoProgram,
    /// `node` with options and no script.
    #[error("no script after {0}: write `cluster -- node [NODE_FLAGS] app.js [ARGS]`")]
    NoScript(String),
    /// A node option whose value is missing.
    #[error("node option {0} needs a value")]
    MissingValue(String),
    /// A node option that runs no script file (eval, REPL, test runner, watch mode).
    #[error(
        "`node {0}` does not run a script file as a cluster worker: write `cluster -- node \
         [NODE_FLAGS] app.js [ARGS]`{hint}",
        hint = match .0.as_str() {
            "--watch" | "--watch-path" => " (reload new code with SIGHUP instead of --watch)",
            _ => "",
        }
    )]
    NoScriptFile(String),
    /// `--node-args` for a program that is not a Node program.
    #[error("--node-args applies to Node programs only, and {0} is not one")]
    NodeArgsWithoutNode(String),
    /// `--node-args` that cannot be split (an unclosed quote).
    #[error("--node-args {0:?} cannot be split into arguments (an unclosed quote?)")]
    BadNodeArgs(String),
    /// The script does not exist.
    #[error("cannot start {0}: no such file")]
    NoSuchScript(String),
}

/// Node options that take their value as the next argument (unless written `--opt=value`).
const VALUE_OPTIONS: &[&str] = &[
    "-r",
    "--require",
    "--import",
    "--loader",
    "--experimental-loader",
    "-C",
    "--conditions",
    "--input-type",
    "--inspect-port",
    "--debug-port",
    "--title",
    "--env-file",
    "--env-file-if-exists",
    "--disable-warning",
    "--redirect-warnings",
    "--openssl-config",
    "--icu-data-dir",
    "--diagnostic-dir",
    "--report-dir",
    "--report-directory",
    "--report-filename",
    "--report-signal",
    "--heapsnapshot-signal",
    "--heapsnapshot-near-heap-limit",
    "--cpu-prof-dir",
    "--cpu-prof-name",
    "--cpu-prof-interval",
    "--heap-prof-dir",
    "--heap-prof-name",
    "--heap-prof-interval",
    "--secure-heap",
    "--secure-heap-min",
    "--unhandled-rejections",
    "--tls-cipher-list",
    "--tls-keylog",
    "--use-largepages",
    "--dns-result-order",
    "--max-http-header-size",
    "--trace-event-categories",
    "--trace-event-file-pattern",
    "--localstorage-file",
    "--stack-trace-limit",
    "--experimental-policy",
    "--policy-integrity",
];

/// Node options with which node runs no script file.
const NO_SCRIPT_OPTIONS: &[&str] = &[
    "-e",
    "--eval",
    "-p",
    "--print",
    "-i",
    "--interactive",
    "-c",
    "--check",
    "--test",
    "-v",
    "--version",
    "-h",
    "--help",
    "--run",
    "--watch",
    "--watch-path",
    "-",
];

impl Invocation {
    /// Reads `command` (PROGRAM and its arguments). `node` is `--node` (the executable for
    /// a bare `.js` script), `node_args` the `--node-args` text if given.
    pub(crate) fn parse(
        command: Vec<OsString>,
        node: &OsStr,
        node_args: Option<&str>,
    ) -> Result<Invocation, InvocationError> {
        let mut command = command.into_iter();
        let program = command.next().ok_or(InvocationError::NoProgram)?;
        let rest: Vec<OsString> = command.collect();
        let extra = match node_args {
            Some(text) => shlex::split(text)
                .ok_or_else(|| InvocationError::BadNodeArgs(text.to_owned()))?
                .into_iter()
                .map(OsString::from)
                .collect(),
            None => Vec::new(),
        };
        let shown = Path::new(&program).display().to_string();
        let invocation = if is_node_binary(Path::new(&program), node) {
            let (mut options, script, args) = split_node_command(&rest, &shown)?;
            options.extend(extra);
            Invocation::Node {
                node: program,
                node_args: options,
                script,
                args,
            }
        } else if is_node_script(Path::new(&program)) {
            Invocation::Node {
                node: node.to_owned(),
                node_args: extra,
                script: program,
                args: rest,
            }
        } else if let Some((interpreter, mut options)) = node_shebang(Path::new(&program), node) {
            options.extend(extra);
            Invocation::Node {
                node: interpreter,
                node_args: options,
                script: program,
                args: rest,
            }
        } else {
            if node_args.is_some() {
                return Err(InvocationError::NodeArgsWithoutNode(shown));
            }
            return Ok(Invocation::Program {
                program,
                args: rest,
            });
        };
        if let Invocation::Node { script, .. } = &invocation
            && !Path::new(script).is_file()
        {
            return Err(InvocationError::NoSuchScript(
                Path::new(script).display().to_string(),
            ));
        }
        Ok(invocation)
    }
}

/// Whether `program` names a Node executable: `node`, `nodejs`, `node` and a version
/// (`node20`, `node-22`), by any path, or the file `--node` names.
fn is_node_binary(program: &Path, node: &OsStr) -> bool {
    if program.as_os_str() == node {
        return true;
    }
    let Some(name) = program.file_name().and_then(OsStr::to_str) else {
        return false;
    };
    let name = name.strip_suffix(".exe").unwrap_or(name);
    match name
        .strip_prefix("nodejs")
        .or_else(|| name.strip_prefix("node"))
    {
        Some(version) => version
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '_')),
        None => false,
    }
}

/// Whether `program` is a Node script by its extension.
fn is_node_script(program: &Path) -> bool {
    matches!(
        program.extension().and_then(|e| e.to_str()),
        Some("js" | "mjs" | "cjs")
    )
}

/// Splits what follows `node` into its options, the script and the script's arguments.
fn split_node_command(
    rest: &[OsString],
    node: &str,
) -> Result<(Vec<OsString>, OsString, Vec<OsString>), InvocationError> {
    let mut options = Vec::new();
    let mut words = rest.iter();
    while let Some(word) = words.next() {
        let text = word.to_string_lossy();
        if text == "--" {
            let script = words
                .next()
                .ok_or_else(|| InvocationError::NoScript(node.to_owned()))?;
            return Ok((options, script.clone(), words.cloned().collect()));
        }
        let name = text.split('=').next().unwrap_or_default();
        if NO_SCRIPT_OPTIONS.contains(&name) {
            return Err(InvocationError::NoScriptFile(name.to_owned()));
        }
        if !text.starts_with('-') {
            return Ok((options, word.clone(), words.cloned().collect()));
        }
        options.push(word.clone());
        if !text.contains('=') && VALUE_OPTIONS.contains(&name) {
            let value = words
                .next()
                .ok_or_else(|| InvocationError::MissingValue(name.to_owned()))?;
            options.push(value.clone());
        }
    }
    Err(InvocationError::NoScript(node.to_owned()))
}

/// The Node executable and options of a script whose `#!` line runs node
/// (`#!/usr/bin/env node`, `#!/usr/bin/env -S node --flag`, `#!/usr/local/bin/node`).
fn node_shebang(program: &Path, node: &OsStr) -> Option<(OsString, Vec<OsString>)> {
    let mut head = [0_u8; 256];
    let mut file = std::fs::File::open(program).ok()?;
    let read = file.read(&mut head).ok()?;
    let line = head[..read].strip_prefix(b"#!")?;
    let line = line.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_whitespace();
    let mut interpreter = words.next()?;
    let mut options: Vec<&str> = words.collect();
    if Path::new(interpreter).file_name() == Some(OsStr::new("env")) {
        // env's own options (-S splits the rest, which we do anyway) and assignments.
        let at = options
            .iter()
            .position(|w| !w.starts_with('-') && !w.contains('='))?;
        interpreter = options[at];
        options.drain(..=at);
    }
    is_node_binary(Path::new(interpreter), node).then(|| {
        let options = options.into_iter().map(OsString::from).collect();
        (OsString::from(interpreter), options)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<OsString> {
        line.split_whitespace().map(OsString::from).collect()
    }

    #[track_caller]
    fn check(line: &str, node_args: Option<&str>, expected: Result<Invocation, InvocationError>) {
        assert_eq!(
            Invocation::parse(words(line), OsStr::new("node"), node_args),
            expected
        );
    }

    /// A file in a scratch directory, removed on drop.
    struct Scratch(std::path::PathBuf);

    impl Scratch {
        fn new(name: &str, text: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("cluster-invocation-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("scratch dir");
            let path = dir.join(name);
            std::fs::write(&path, text).expect("scratch file");
            Scratch(path)
        }

        fn path(&self) -> &str {
            self.0.to_str().expect("utf-8 path")
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn node(node: &str, node_args: &str, script: &str, args: &str) -> Invocation {
        Invocation::Node {
            node: node.into(),
            node_args: words(node_args),
            script: script.into(),
            args: words(args),
        }
    }

    #[test]
    fn every_way_of_naming_node_runs_the_script_with_its_options() {
        let app = Scratch::new("app.js", "");
        let a = app.path();
        check(
            &format!("node {a} 3000"),
            None,
            Ok(node("node", "", a, "3000")),
        );
        check(
            &format!("nodejs --max-old-space-size=100 -r dotenv/config {a} --port 1"),
            None,
            Ok(node(
                "nodejs",
                "--max-old-space-size=100 -r dotenv/config",
                a,
                "--port 1",
            )),
        );
        check(
            &format!("/opt/node20/bin/node --import=./t.mjs -- {a} x"),
            Some("--stack-size=2000 --trace-warnings"),
            Ok(node(
                "/opt/node20/bin/node",
                "--import=./t.mjs --stack-size=2000 --trace-warnings",
                a,
                "x",
            )),
        );
        check(
            &format!("{a} 1"),
            Some("--inspect"),
            Ok(node("node", "--inspect", a, "1")),
        );
    }

    #[test]
    fn a_script_whose_shebang_runs_node_is_a_node_program() {
        let env = Scratch::new("server", "#!/usr/bin/env -S node --max-old-space-size=64\n");
        check(
            &format!("{} 1", env.path()),
            None,
            Ok(node("node", "--max-old-space-size=64", env.path(), "1")),
        );
        let direct = Scratch::new("direct", "#!/usr/local/bin/node\nconsole.log(1)\n");
        check(
            direct.path(),
            None,
            Ok(node("/usr/local/bin/node", "", direct.path(), "")),
        );
        let shell = Scratch::new("shell", "#!/bin/sh\nexec node app.js\n");
        check(
            shell.path(),
            None,
            Ok(Invocation::Program {
                program: shell.path().into(),
                args: Vec::new(),
            }),
        );
    }

    #[test]
    fn what_cannot_run_as_a_node_worker_is_refused_with_the_form_that_works() {
        check(
            "node --max-old-space-size=100",
            None,
            Err(InvocationError::NoScript("node".into())),
        );
        check(
            "node -r",
            None,
            Err(InvocationError::MissingValue("-r".into())),
        );
        check(
            "node -e 1",
            None,
            Err(InvocationError::NoScriptFile("-e".into())),
        );
        check(
            "node --watch app.js",
            None,
            Err(InvocationError::NoScriptFile("--watch".into())),
        );
        check(
            "node missing.js",
            None,
            Err(InvocationError::NoSuchScript("missing.js".into())),
        );
        check(
            "/bin/sleep 1",
            Some("--inspect"),
            Err(InvocationError::NodeArgsWithoutNode("/bin/sleep".into())),
        );
        check(
            "app.js",
            Some("'--a"),
            Err(InvocationError::BadNodeArgs("'--a".into())),
        );
        check("", None, Err(InvocationError::NoProgram));
    }

    #[test]
    fn other_programs_keep_their_arguments() {
        check(
            "./server --port 1 -- x",
            None,
            Ok(Invocation::Program {
                program: "./server".into(),
                args: words("--port 1 -- x"),
            }),
        );
        assert!(!is_node_binary(Path::new("nodemon"), OsStr::new("node")));
        assert!(is_node_binary(Path::new("/x/node-22"), OsStr::new("node")));
        assert!(is_node_binary(
            Path::new("/x/mynode"),
            OsStr::new("/x/mynode")
        ));
    }
}
