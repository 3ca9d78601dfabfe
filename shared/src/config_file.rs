//! `--config FILE`: a TOML file that sets a command's flags by their long
//! names (`idle-timeout = 600`, or `idle_timeout = 600`). Flags given on
//! the command line win over the file; the file wins over the built-in
//! defaults. Values go through the same parsers as the flags, and unknown
//! keys or bad values are refused with one line naming the key.

use std::ffi::OsString;
use std::path::Path;

use clap::ArgAction;
use clap::parser::ValueSource;

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("{path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// The parser's message, on one line.
        message: String,
    },
    /// A key names no flag of the command.
    #[error("{path}: unknown key `{key}`")]
    UnknownKey {
        /// The file.
        path: String,
        /// The key.
        key: String,
    },
    /// A value of a kind no flag takes (a table, a date, a nested list).
    #[error("{path}: `{key}` must be {expected}")]
    BadValue {
        /// The file.
        path: String,
        /// The key.
        key: String,
        /// What it must be.
        expected: &'static str,
    },
    /// A value the flag's own parser refused.
    #[error("{path}: `{key}`: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// The key.
        key: String,
        /// The parser's message.
        message: String,
    },
}

/// One setting taken from the file: its key and the arguments it becomes.
#[derive(Debug, Clone, PartialEq)]
pub struct FileSetting {
    /// The key as written in the file.
    pub key: String,
    /// The equivalent command-line arguments (`--flag value`, repeated for lists).
    pub args: Vec<OsString>,
}

/// The settings of the file at `path` for the flags of `command` that
/// `matches` did not get from the command line. Tables named in `sections`
/// are the caller's to read (see [`section_error`]) and are skipped here.
pub fn file_settings(
    command: &clap::Command,
    matches: &clap::ArgMatches,
    path: &Path,
    sections: &[&str],
) -> Result<Vec<FileSetting>, ConfigFileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: shown.clone(),
        source,
    })?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e: toml::de::Error| ConfigFileError::Syntax {
            path: shown.clone(),
            message: e.message().to_owned(),
        })?;
    let mut settings = Vec::new();
    for (key, value) in table {
        if value.is_table() && sections.contains(&key.as_str()) {
            continue;
        }
        let long = key.replace('_', "-");
        let arg = command
            .get_arguments()
            .find(|arg| arg.get_long() == Some(long.as_str()) && long != "config")
            .ok_or_else(|| ConfigFileError::UnknownKey {
                path: shown.clone(),
                key: key.clone(),
            })?;
        if matches.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine) {
            continue;
        }
        let flag = OsString::from(format!("--{long}"));
        let is_switch = matches!(arg.get_action(), ArgAction::SetTrue);
        let mut args = Vec::new();
        let bad = |expected| ConfigFileError::BadValue {
            path: shown.clone(),
            key: key.clone(),
            expected,
        };
        match value {
            toml::Value::Boolean(on) if is_switch => {
                if on {
                    args.push(flag);
                }
            }
            _ if is_switch => return Err(bad("true or false")),
            toml::Value::Array(items) => {
                for item in items {
                    args.push(flag.clone());
                    args.push(scalar(&item).ok_or_else(|| bad("a list of plain values"))?);
                }
            }
            other => {
                args.push(flag);
                args.push(scalar(&other).ok_or_else(|| bad("a plain value or a list"))?);
            }
        }
        settings.push(FileSetting { key, args });
    }
    Ok(settings)
}

/// A string, number or boolean as the text a flag would get.
fn scalar(value: &toml::Value) -> Option<OsString> {
    match value {
        toml::Value::String(s) => Some(s.into()),
        toml::Value::Integer(i) => Some(i.to_string().into()),
        toml::Value::Float(f) => Some(f.to_string().into()),
        toml::Value::Boolean(b) => Some(b.to_string().into()),
        _ => None,
    }
}

/// Inserts the file's settings into `argv` right after the subcommand at
/// `subcommand_index`, so the command line parses once with both.
pub fn merged_argv(
    argv: &[OsString],
    subcommand_index: usize,
    settings: &[FileSetting],
) -> Vec<OsString> {
    let split = (subcommand_index + 1).min(argv.len());
    let mut merged = argv[..split].to_vec();
    merged.extend(settings.iter().flat_map(|s| s.args.iter().cloned()));
    merged.extend_from_slice(&argv[split..]);
    merged
}

/// Why the command line and config file could not be parsed.
#[derive(Debug)]
pub enum ParseFailure {
    /// The file was refused.
    Config(ConfigFileError),
    /// clap refused the (merged) command line, or was asked for help.
    Usage(clap::Error),
}

impl std::fmt::Display for ParseFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseFailure::Config(e) => e.fmt(f),
            ParseFailure::Usage(e) => {
                let text = e.to_string();
                f.write_str(
                    text.lines()
                        .next()
                        .unwrap_or_default()
                        .trim_start_matches("error: "),
                )
            }
        }
    }
}

/// Parses `argv` as `P`. When one of its subcommands `names` was given
/// `--config FILE`, the file's settings are merged in first (flags on the
/// command line win); those settings are returned too.
pub fn try_parse_with_config<P: clap::Parser>(
    argv: &[OsString],
    names: &[&str],
    sections: &[&str],
) -> Result<(P, Vec<FileSetting>), ParseFailure> {
    let parsed =
        |matches: &clap::ArgMatches| P::from_arg_matches(matches).map_err(ParseFailure::Usage);
    // A first pass without required flags: they may come from the file.
    let lenient = names.iter().fold(P::command(), |command, name| {
        command.mut_subcommand(name, |sub| sub.mut_args(|arg| arg.required(false)))
    });
    let first = lenient
        .clone()
        .try_get_matches_from(argv)
        .map_err(ParseFailure::Usage)?;
    let config = match first.subcommand() {
        Some((sub, matches)) if names.contains(&sub) => matches
            .get_one::<std::path::PathBuf>("config")
            .cloned()
            .map(|path| (sub.to_owned(), path, matches.clone())),
        _ => None,
    };
    let Some((name, path, sub_matches)) = config else {
        let matches = P::command()
            .try_get_matches_from(argv)
            .map_err(ParseFailure::Usage)?;
        return Ok((parsed(&matches)?, Vec::new()));
    };
    let name = name.as_str();
    let settings = match lenient.find_subcommand(name) {
        Some(sub_command) => file_settings(sub_command, &sub_matches, &path, sections)
            .map_err(ParseFailure::Config)?,
        None => Vec::new(),
    };
    let index = argv
        .iter()
        .skip(1)
        .position(|arg| arg == name)
        .map_or(1, |i| i + 1);
    let merged = merged_argv(argv, index, &settings);
    match P::command().try_get_matches_from(&merged) {
        Ok(matches) => Ok((parsed(&matches)?, settings)),
        Err(e) => Err(match blame(&e, &path, &settings) {
            Some(blamed) => ParseFailure::Config(blamed),
            None => ParseFailure::Usage(e),
        }),
    }
}

/// Parses the process's arguments as `P` (see [`try_parse_with_config`]);
/// usage errors and `--help` exit as clap does.
pub fn parse_with_config<P: clap::Parser>(
    names: &[&str],
    sections: &[&str],
) -> Result<P, ConfigFileError> {
    let argv: Vec<OsString> = std::env::args_os().collect();
    match try_parse_with_config(&argv, names, sections) {
        Ok((parsed, _)) => Ok(parsed),
        Err(ParseFailure::Config(e)) => Err(e),
        Err(ParseFailure::Usage(e)) => e.exit(),
    }
}

/// One line for an error of serde-reading a section of the file: the
/// message and the line it points at.
pub fn section_error(path: &Path, text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim();
    let Some(start) = error.span().map(|span| span.start) else {
        return format!("{}: {message}", path.display());
    };
    let before = text.get(..start).unwrap_or_default();
    let number = before.matches('\n').count() + 1;
    let line = text.lines().nth(number - 1).unwrap_or_default().trim();
    format!("{}: line {number} `{line}`: {message}", path.display())
}

/// Names the file key behind a parse error of the merged command line,
/// when one of the file's settings caused it.
pub fn blame(
    error: &clap::Error,
    path: &Path,
    settings: &[FileSetting],
) -> Option<ConfigFileError> {
    let invalid = error.get(clap::error::ContextKind::InvalidArg)?.to_string();
    let setting = settings.iter().find(|s| {
        s.args
            .first()
            .and_then(|flag| flag.to_str())
            .is_some_and(|flag| invalid == flag || invalid.starts_with(&format!("{flag} ")))
    })?;
    let message = error
        .to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_owned();
    Some(ConfigFileError::Invalid {
        path: path.display().to_string(),
        key: setting.key.clone(),
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, Command};

    fn command() -> Command {
        Command::new("serve")
            .arg(Arg::new("config").long("config"))
            .arg(
                Arg::new("idle_timeout")
                    .long("idle-timeout")
                    .default_value("600")
                    .value_parser(clap::value_parser!(u64)),
            )
            .arg(
                Arg::new("listen")
                    .long("listen")
                    .default_value("0.0.0.0:4433"),
            )
            .arg(Arg::new("relay").long("relay").action(ArgAction::Append))
            .arg(
                Arg::new("upstream_http2")
                    .long("upstream-http2")
                    .action(ArgAction::SetTrue),
            )
    }

    fn settings_for(toml: &str, cli: &[&str]) -> Result<Vec<FileSetting>, ConfigFileError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, toml).expect("write");
        let matches =
            command().get_matches_from(std::iter::once("serve").chain(cli.iter().copied()));
        file_settings(&command(), &matches, &path, &["clients"])
    }

    #[test]
    fn keys_become_flags_and_the_command_line_wins() {
        let settings = settings_for(
            "idle_timeout = 30\nlisten = \"127.0.0.1:1\"\nrelay = [\"a:1\", \"b:2\"]\nupstream-http2 = true\n",
            &["--listen", "127.0.0.1:2"],
        )
        .expect("valid");
        let args: Vec<OsString> = settings.iter().flat_map(|s| s.args.clone()).collect();
        let expected: Vec<OsString> = [
            "--idle-timeout",
            "30",
            "--relay",
            "a:1",
            "--relay",
            "b:2",
            "--upstream-http2",
        ]
        .map(OsString::from)
        .to_vec();
        assert_eq!(args, expected, "listen comes from the command line");
    }

    #[test]
    fn unknown_keys_and_odd_values_are_named() {
        let unknown = settings_for("idle_timout = 30\n", &[]).expect_err("refused");
        assert!(
            unknown.to_string().ends_with("unknown key `idle_timout`"),
            "{unknown}"
        );
        let table = settings_for("[listen]\nport = 1\n", &[]).expect_err("refused");
        assert!(table.to_string().contains("`listen` must be"), "{table}");
        let switch = settings_for("upstream_http2 = \"yes\"\n", &[]).expect_err("refused");
        assert!(switch.to_string().contains("true or false"), "{switch}");
        let syntax = settings_for("listen = \n", &[]).expect_err("refused");
        assert!(syntax.to_string().contains("not valid TOML"), "{syntax}");
    }

    #[test]
    fn a_bad_value_is_blamed_on_its_key() {
        let settings = settings_for("idle_timeout = \"soon\"\n", &[]).expect("read");
        let argv: Vec<OsString> = ["serve"].map(OsString::from).to_vec();
        let merged = merged_argv(&argv, 0, &settings);
        let error = command().try_get_matches_from(merged).expect_err("refused");
        let blamed = blame(&error, Path::new("relay.toml"), &settings).expect("blamed");
        assert!(
            blamed
                .to_string()
                .starts_with("relay.toml: `idle_timeout`: invalid value 'soon'"),
            "{blamed}"
        );
    }
}
