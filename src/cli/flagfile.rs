//! Config files for long-running commands: `/etc/tailgate/node.toml` for
//! `tailgate up`, `/etc/tailgate/control.toml` for `tailgate control` (or
//! `--config FILE`). Every `key = value` is the long flag `--key` of that
//! command, so a flag added to the clap structs is configurable with no
//! change here. The file's flags are appended to the command line and the
//! whole is parsed again by clap; a flag (or its environment variable)
//! given by the user wins over the file.
//!
//! The file is checked against the command's own definition: unknown keys,
//! a list for a single-valued flag, a value the flag's parser refuses, are
//! errors at `FILE:LINE`, before anything starts.
#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};
use toml::Spanned;

/// Overrides the directory of the default files (tests; packaging).
pub(crate) const DIR_ENV: &str = "TAILGATE_CONFIG_DIR";
pub(crate) const DEFAULT_DIR: &str = "/etc/tailgate";

/// Which subcommands read a file, and its name in the config directory.
const FILES: &[(&str, &str)] = &[("up", "node.toml"), ("control", "control.toml")];

/// Flags that make no sense in a file.
const NOT_IN_FILES: &[&str] = &["config", "help", "version"];

#[derive(Debug, thiserror::Error)]
pub(crate) enum FlagFileError {
    #[error("{path}: {source} (give an existing file to --config, or leave --config out)")]
    Missing { path: String, source: std::io::Error },
    #[error("{path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}:{line}: {msg}")]
    At { path: String, line: usize, msg: String },
}

/// The command line with the config file's flags appended, or the command
/// line unchanged when the subcommand reads no file or there is none.
/// Clap's own errors (bad flags) are left for the caller's parse to report.
pub(crate) fn expand_args(mut cmd: Command, argv: Vec<OsString>) -> Result<Vec<OsString>, FlagFileError> {
    cmd.build();
    let Ok(top) = cmd.clone().try_get_matches_from(&argv) else { return Ok(argv) };
    let Some((sub, sub_m)) = top.subcommand() else { return Ok(argv) };
    let Some(&(_, file_name)) = FILES.iter().find(|(n, _)| *n == sub) else { return Ok(argv) };
    let sub_cmd = cmd.find_subcommand(sub).expect("matched subcommand exists");

    let explicit = sub_m.get_one::<PathBuf>("config").cloned();
    let path = match &explicit {
        Some(p) => p.clone(),
        None => default_dir().join(file_name),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if explicit.is_none() && e.kind() == std::io::ErrorKind::NotFound => return Ok(argv),
        Err(e) if explicit.is_some() => return Err(FlagFileError::Missing { path: path.display().to_string(), source: e }),
        Err(e) => return Err(FlagFileError::Read { path: path.display().to_string(), source: e }),
    };

    // Match levels from the subcommand down (`control serve`): a flag set on
    // the command line at any level wins over the file.
    let mut levels: Vec<(&Command, &ArgMatches)> = vec![(sub_cmd, sub_m)];
    while let Some((name, m)) = levels.last().unwrap().1.subcommand() {
        let c = levels.last().unwrap().0.find_subcommand(name).expect("matched subcommand exists");
        levels.push((c, m));
    }
    let mut lines = Vec::new();
    let extra = file_flags(&path, &text, sub_cmd, &levels, &mut lines)?;
    let mut out = argv;
    out.extend(extra);
    // A value the flag's own parser refuses is reported at its line here,
    // rather than by the final parse as if the user had typed it.
    if let Err(e) = cmd.try_get_matches_from(&out) {
        use clap::error::{ContextKind, ContextValue};
        if let Some(ContextValue::String(a)) = e.get(ContextKind::InvalidArg) {
            let long = a.trim_start_matches("--").split([' ', '=']).next().unwrap_or_default();
            if let Some((_, line)) = lines.iter().find(|(l, _)| l == long) {
                return Err(FlagFileError::At { path: path.display().to_string(), line: *line, msg: clap_message(&e) });
            }
        }
    }
    Ok(out)
}

fn default_dir() -> PathBuf {
    std::env::var_os(DIR_ENV).filter(|d| !d.is_empty()).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
}

/// Flags a file may set: the command's own (global ones included).
fn settable(cmd: &Command) -> Vec<&Arg> {
    let mut v: Vec<&Arg> = Vec::new();
    for a in cmd.get_arguments() {
        let Some(long) = a.get_long() else { continue };
        if a.is_positional() || NOT_IN_FILES.contains(&long) || v.iter().any(|b| b.get_long() == Some(long)) {
            continue;
        }
        v.push(a);
    }
    v
}

/// The flags for `text`; `lines` gets each flag's line for later errors.
fn file_flags(
    path: &Path,
    text: &str,
    cmd: &Command,
    levels: &[(&Command, &ArgMatches)],
    lines: &mut Vec<(String, usize)>,
) -> Result<Vec<OsString>, FlagFileError> {
    let p = path.display().to_string();
    let at = |span: std::ops::Range<usize>, msg: String| FlagFileError::At { path: p.clone(), line: line_of(text, span.start), msg };
    let table: BTreeMap<Spanned<String>, Spanned<toml::Value>> = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(1);
        FlagFileError::At { path: p.clone(), line, msg: e.message().to_string() }
    })?;
    let settable = settable(cmd);
    let mut out = Vec::new();
    // In file order, so errors come in the order a reader would fix them.
    let mut entries: Vec<_> = table.iter().collect();
    entries.sort_by_key(|(k, _)| k.span().start);
    for (key, value) in entries {
        let long = key.get_ref().replace('_', "-");
        let Some(arg) = settable.iter().find(|a| a.get_long() == Some(long.as_str())) else {
            return Err(at(key.span(), unknown_key(key.get_ref(), cmd, &settable)));
        };
        // The flags go at the end of the command line, so the innermost
        // subcommand must take them. A server flag while an admin subcommand
        // runs (`control users list`) is left out: the file describes the
        // server; global flags like --state-dir still apply.
        let (last_cmd, _) = levels.last().expect("at least the subcommand");
        let Some(arg) = last_cmd.get_arguments().find(|a| a.get_id() == arg.get_id()) else { continue };
        if levels.iter().any(|(_, m)| given_by_user(m, arg.get_id().as_str())) {
            continue;
        }
        let values = flag_values(&long, arg, value.get_ref()).map_err(|e| at(value.span(), e.to_string()))?;
        for v in values {
            lines.push((long.clone(), line_of(text, value.span().start)));
            out.push(match v {
                Some(v) => OsString::from(format!("--{long}={v}")),
                None => OsString::from(format!("--{long}")),
            });
        }
    }
    Ok(out)
}

fn given_by_user(m: &ArgMatches, id: &str) -> bool {
    matches!(m.try_contains_id(id), Ok(true))
        && matches!(m.value_source(id), Some(ValueSource::CommandLine) | Some(ValueSource::EnvVariable))
}

/// A value whose TOML type does not fit its flag (the key is in each variant).
#[derive(Debug, thiserror::Error)]
enum ValueShape {
    #[error("`{0}` is a switch: write `{0} = true` or `{0} = false`")]
    Switch(String),
    #[error("`{0}` is a level: write a number, e.g. `{0} = 1`")]
    Level(String),
    #[error("`{0}` takes one value, not a list")]
    NotAList(String),
    #[error("`{0}` takes a string, number or boolean")]
    NotAScalar(String),
}

/// The command-line words for one `key = value`: `None` is a bare `--key`.
fn flag_values(long: &str, arg: &Arg, v: &toml::Value) -> Result<Vec<Option<String>>, ValueShape> {
    match arg.get_action() {
        ArgAction::SetTrue => match v {
            toml::Value::Boolean(true) => Ok(vec![None]),
            toml::Value::Boolean(false) => Ok(vec![]),
            _ => Err(ValueShape::Switch(long.into())),
        },
        ArgAction::Count => match v {
            toml::Value::Integer(n) if (0..=16).contains(n) => Ok(vec![None; *n as usize]),
            _ => Err(ValueShape::Level(long.into())),
        },
        ArgAction::Append => match v {
            toml::Value::Array(items) => items.iter().map(|i| scalar(long, i).map(Some)).collect(),
            other => Ok(vec![Some(scalar(long, other)?)]),
        },
        _ => match v {
            toml::Value::Array(_) => Err(ValueShape::NotAList(long.into())),
            other => Ok(vec![Some(scalar(long, other)?)]),
        },
    }
}

fn scalar(long: &str, v: &toml::Value) -> Result<String, ValueShape> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        _ => Err(ValueShape::NotAScalar(long.into())),
    }
}

fn unknown_key(key: &str, cmd: &Command, settable: &[&Arg]) -> String {
    let names: Vec<&str> = settable.iter().filter(|a| !a.is_hide_set()).filter_map(|a| a.get_long()).collect();
    let close = names.iter().find(|n| strsim::damerau_levenshtein(n, &key.replace('_', "-")) <= 2);
    let hint = close.map(|n| format!(" (did you mean `{n}`?)")).unwrap_or_default();
    format!("unknown key `{key}`{hint}; `tailgate {}` takes: {}", cmd.get_name(), names.join(", "))
}

/// Clap's message without its "error: " prefix and usage footer.
fn clap_message(e: &clap::Error) -> String {
    let s = e.render().to_string();
    s.lines().next().unwrap_or_default().trim_start_matches("error: ").to_string()
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd() -> Command {
        Command::new("t").subcommand(
            Command::new("up")
                .arg(Arg::new("config").long("config").value_parser(clap::value_parser!(PathBuf)))
                .arg(Arg::new("port").long("port").value_parser(clap::value_parser!(u16)))
                .arg(Arg::new("no_ssh").long("no-ssh").action(ArgAction::SetTrue))
                .arg(Arg::new("forward").long("forward").action(ArgAction::Append)),
        )
    }

    fn expand(file: &str, args: &[&str]) -> Result<Vec<String>, FlagFileError> {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("node.toml");
        std::fs::write(&f, file).unwrap();
        let mut argv: Vec<OsString> = ["t", "up", "--config"].iter().map(OsString::from).collect();
        argv.push(f.clone().into());
        argv.extend(args.iter().map(OsString::from));
        let n = argv.len();
        Ok(expand_args(cmd(), argv)?.into_iter().skip(n).map(|s| s.into_string().unwrap()).collect())
    }

    #[test]
    fn keys_become_flags_and_the_command_line_wins() {
        let got = expand("port = 7\nno_ssh = true\nforward = [\"1=a:1\", \"2=b:2\"]\n", &[]).unwrap();
        assert_eq!(got, ["--port=7", "--no-ssh", "--forward=1=a:1", "--forward=2=b:2"]);
        let got = expand("port = 7\nno-ssh = false\n", &["--port", "9"]).unwrap();
        assert!(got.is_empty(), "{got:?}");
    }

    #[test]
    fn errors_name_the_line() {
        let e = expand("port = 7\n\nprot = 8\n", &[]).unwrap_err().to_string();
        assert!(e.ends_with("node.toml:3: unknown key `prot` (did you mean `port`?); `tailgate up` takes: port, no-ssh, forward"), "{e}");
        let e = expand("port = 70000\n", &[]).unwrap_err().to_string();
        assert!(e.contains("node.toml:1: ") && e.contains("70000"), "{e}");
        let e = expand("port = [1]\n", &[]).unwrap_err().to_string();
        assert!(e.contains(":1: `port` takes one value"), "{e}");
        let e = expand("no_ssh = \"yes\"\n", &[]).unwrap_err().to_string();
        assert!(e.contains(":1: `no-ssh` is a switch"), "{e}");
        let e = expand("port = \n", &[]).unwrap_err().to_string();
        assert!(e.contains("node.toml:1: "), "{e}");
    }
}
