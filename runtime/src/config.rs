//! One configuration for every role. A setting is read from, in order: its flag, its
//! `EVENTBUS_*` variable, the TOML file named by `--config` (or `EVENTBUS_CONFIG`), and its
//! default, which is written once, on the flag (`#[arg(default_value…)]`): the code takes its
//! defaults from the same place ([`defaults`]).
//!
//! The file has a section per role (`[serve]`, `[store]`, `[auth]`, `[ingest]`, `[gateway]`,
//! `[hooks]`);
//! its keys are the flags' names in snake case (`--segment-bytes` is `segment_bytes`). Keys at
//! the top, before any section, apply to every role that has that setting (the NATS URL, TLS
//! files, HTTP limits...); a role's section overrides them. `serve` runs every role, so it also
//! takes the settings of the other roles' sections it shares with them (the
//! same setting: the same variable), then its own `[serve]`. An unknown section or key, a value
//! of the wrong type, or one setting given two different values for `serve` is an error that
//! names the file and the key.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, Command};

/// The roles, in the order `serve` reads their sections.
pub const ROLES: [&str; 6] = ["store", "auth", "ingest", "gateway", "hooks", "serve"];

/// The defaults of a settings group, as its flags declare them (environment not consulted).
pub fn defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let command = T::augment_args(Command::new("defaults").no_binary_name(true))
        .mut_args(|arg| arg.env(None));
    let matches = command
        .try_get_matches_from(Vec::<String>::new())
        .unwrap_or_else(|err| panic!("a settings group must parse with no arguments: {err}"));
    T::from_arg_matches(&matches)
        .unwrap_or_else(|err| panic!("a settings group must parse with no arguments: {err}"))
}

/// A configuration file, read and checked for its shape (not yet against the roles).
pub struct File {
    path: PathBuf,
    table: toml::Table,
}

impl File {
    pub fn read(path: &Path) -> Result<File, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
        File::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<File, String> {
        let table: toml::Table = text
            .parse()
            .map_err(|err| format!("{}: {err}", path.display()))?;
        Ok(File {
            path: path.to_owned(),
            table,
        })
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }

    /// The top-level settings.
    fn root(&self) -> impl Iterator<Item = (&String, &toml::Value)> {
        self.table.iter().filter(|(_, v)| !v.is_table())
    }

    fn section(&self, role: &str) -> Option<&toml::Table> {
        self.table.get(role).and_then(|v| v.as_table())
    }

    /// Checks every section and key against the roles' commands in `roles` (a binary that runs
    /// one role knows only that one: the other sections are checked by the binaries that run them,
    /// and by `eventbus checkconfig`).
    pub fn check(&self, roles: &BTreeMap<&str, &Command>) -> Result<(), String> {
        let all_known = ROLES.iter().all(|r| roles.contains_key(r));
        for (key, value) in self.root() {
            scalars(value).map_err(|why| format!("{}: `{key}`: {why}", self.name()))?;
            if all_known && !roles.values().any(|c| setting(c, key).is_some()) {
                return Err(format!("{}: unknown key `{key}`", self.name()));
            }
        }
        for (name, value) in self.table.iter().filter(|(_, v)| v.is_table()) {
            if !ROLES.contains(&name.as_str()) {
                return Err(format!(
                    "{}: unknown section [{name}] (the sections are {})",
                    self.name(),
                    ROLES.map(|r| format!("[{r}]")).join(", ")
                ));
            }
            let Some(command) = roles.get(name.as_str()) else {
                continue;
            };
            for (key, value) in value.as_table().into_iter().flatten() {
                let arg = setting(command, key)
                    .ok_or_else(|| format!("{}: unknown key `{key}` in [{name}]", self.name()))?;
                let values = scalars(value)
                    .map_err(|why| format!("{}: [{name}] `{key}`: {why}", self.name()))?;
                check_values(arg, &values)
                    .map_err(|why| format!("{}: [{name}] `{key}`: {why}", self.name()))?;
            }
        }
        Ok(())
    }

    /// What the file sets for `role`, by argument id, as values for clap.
    fn values_for(
        &self,
        role: &str,
        roles: &BTreeMap<&str, &Command>,
    ) -> Result<BTreeMap<String, Vec<String>>, String> {
        let command = roles.get(role).ok_or_else(|| format!("no role {role}"))?;
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (key, value) in self.root() {
            if let Some(arg) = setting(command, key) {
                let values =
                    scalars(value).map_err(|why| format!("{}: `{key}`: {why}", self.name()))?;
                check_values(arg, &values)
                    .map_err(|why| format!("{}: `{key}`: {why}", self.name()))?;
                out.insert(arg.get_id().to_string(), values);
            }
        }
        if role == "serve" {
            // The same setting given by two roles' sections must agree.
            let mut given_by: BTreeMap<String, (&str, Vec<String>)> = BTreeMap::new();
            for other in ROLES.iter().filter(|r| **r != "serve") {
                let (Some(section), Some(other_command)) = (self.section(other), roles.get(other))
                else {
                    continue;
                };
                for (key, value) in section {
                    let Some(theirs) = setting(other_command, key) else {
                        continue;
                    };
                    let Some(ours) = same_setting(command, theirs) else {
                        // Theirs alone (an address, a directory): serve has its own.
                        continue;
                    };
                    let values = scalars(value)
                        .map_err(|why| format!("{}: [{other}] `{key}`: {why}", self.name()))?;
                    let id = ours.get_id().to_string();
                    if let Some((first, earlier)) = given_by.get(&id)
                        && *earlier != values
                    {
                        return Err(format!(
                            "{}: `{key}` differs in [{first}] and [{other}], and serve runs both: give it once, at the top or in [serve]",
                            self.name()
                        ));
                    }
                    check_values(ours, &values)
                        .map_err(|why| format!("{}: [{other}] `{key}`: {why}", self.name()))?;
                    given_by.insert(id.clone(), (other, values.clone()));
                    out.insert(id, values);
                }
            }
        }
        if let Some(section) = self.section(role) {
            for (key, value) in section {
                let arg = setting(command, key)
                    .ok_or_else(|| format!("{}: unknown key `{key}` in [{role}]", self.name()))?;
                let values = scalars(value)
                    .map_err(|why| format!("{}: [{role}] `{key}`: {why}", self.name()))?;
                check_values(arg, &values)
                    .map_err(|why| format!("{}: [{role}] `{key}`: {why}", self.name()))?;
                out.insert(arg.get_id().to_string(), values);
            }
        }
        Ok(out)
    }

    /// `command` (the role's) with the file's settings as its defaults: flags and variables still
    /// come first.
    pub fn apply(
        &self,
        role: &str,
        command: Command,
        roles: &BTreeMap<&str, &Command>,
    ) -> Result<Command, String> {
        let values = self.values_for(role, roles)?;
        let mut command = command;
        for (id, values) in values {
            command = command.mut_arg(id, |arg| {
                // A list may also be given as one string, separated as on the command line.
                let values: Vec<String> = match arg.get_value_delimiter() {
                    Some(delimiter) => values
                        .iter()
                        .flat_map(|v| v.split(delimiter).map(str::to_owned))
                        .collect(),
                    None => values,
                };
                arg.default_values(values)
            });
        }
        Ok(command)
    }
}

/// The file key of an argument: its long flag in snake case (`None`: not a setting).
pub fn key_of(arg: &Arg) -> Option<String> {
    let long = arg.get_long()?;
    if matches!(long, "help" | "version" | "config") {
        return None;
    }
    Some(long.replace('-', "_"))
}

fn setting<'c>(command: &'c Command, key: &str) -> Option<&'c Arg> {
    command
        .get_arguments()
        .find(|arg| key_of(arg).as_deref() == Some(key))
}

/// Which setting an argument is: its variable (two roles' flags with one variable are one
/// setting), or its flag when it has no variable.
fn identity(arg: &Arg) -> String {
    match arg.get_env() {
        Some(env) => env.to_string_lossy().into_owned(),
        None => format!("--{}", arg.get_long().unwrap_or_default()),
    }
}

fn same_setting<'c>(command: &'c Command, other: &Arg) -> Option<&'c Arg> {
    let wanted = identity(other);
    command
        .get_arguments()
        .find(|arg| key_of(arg).is_some() && identity(arg) == wanted)
}

/// A TOML value as clap values: a scalar, or an array of scalars.
fn scalars(value: &toml::Value) -> Result<Vec<String>, String> {
    let scalar = |value: &toml::Value| match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        toml::Value::Datetime(d) => Ok(d.to_string()),
        toml::Value::Array(_) | toml::Value::Table(_) => {
            Err("expected a string, a number or a boolean".to_owned())
        }
    };
    match value {
        toml::Value::Array(items) => items.iter().map(scalar).collect(),
        other => Ok(vec![scalar(other)?]),
    }
}

fn takes_many(arg: &Arg) -> bool {
    arg.get_value_delimiter().is_some()
        || matches!(arg.get_action(), ArgAction::Append)
        || arg.get_num_args().is_some_and(|n| n.max_values() > 1)
}

/// Checks `values` with the argument's own parser, so a bad value is named by its file key (and
/// clap never meets a default it cannot parse).
fn check_values(arg: &Arg, values: &[String]) -> Result<(), String> {
    if values.len() != 1 && !takes_many(arg) {
        return Err("expected one value, not a list".into());
    }
    if matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
        return match values[0].as_str() {
            "true" | "false" => Ok(()),
            other => Err(format!("invalid value {other:?}: expected true or false")),
        };
    }
    let long = arg.get_long().unwrap_or_default();
    // The argument alone, as clap would parse it from the command line.
    let alone = arg
        .clone()
        .env(None)
        .default_value(None)
        .required(false)
        .requires(clap::builder::Resettable::<clap::Id>::Reset)
        .conflicts_with(clap::builder::Resettable::<clap::Id>::Reset)
        .group(clap::builder::Resettable::<clap::Id>::Reset);
    let probe = Command::new("check").no_binary_name(true).arg(alone);
    for value in values {
        let pieces: Vec<&str> = match arg.get_value_delimiter() {
            Some(delimiter) => value.split(delimiter).collect(),
            None => vec![value.as_str()],
        };
        for piece in pieces {
            probe
                .clone()
                .try_get_matches_from([format!("--{long}={piece}")])
                .map_err(|err| {
                    let text = err.to_string();
                    text.trim_start_matches("error: ")
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_owned()
                })?;
        }
    }
    Ok(())
}

/// The `--config` flag every role takes.
pub fn config_arg() -> Arg {
    Arg::new("config")
        .long("config")
        .env("EVENTBUS_CONFIG")
        .value_name("FILE")
        .help("TOML configuration file (flags and EVENTBUS_* variables override it; `eventbus genconfig` prints one)")
}

/// The role a command line runs and the configuration file it names, if any.
fn role_and_file(command: &Command, args: &[OsString]) -> (Option<String>, Option<PathBuf>) {
    let role = if command.has_subcommands() {
        args.iter()
            .skip(1)
            .map(|a| a.to_string_lossy())
            .find(|a| !a.starts_with('-'))
            .filter(|a| ROLES.contains(&a.as_ref()))
            .map(|a| a.into_owned())
    } else {
        let name = command.get_name().trim_start_matches("eventbus-");
        ROLES.contains(&name).then(|| name.to_owned())
    };
    let mut file = None;
    let mut iter = args
        .iter()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned());
    while let Some(arg) = iter.next() {
        if arg == "--" {
            break;
        }
        if arg == "--config" {
            file = iter.next().map(PathBuf::from);
        } else if let Some(path) = arg.strip_prefix("--config=") {
            file = Some(PathBuf::from(path));
        }
    }
    let file = file.or_else(|| std::env::var_os("EVENTBUS_CONFIG").map(PathBuf::from));
    (role, file)
}

/// The roles' commands of `command`: its subcommands named as roles, or itself.
pub fn roles_of(command: &Command) -> BTreeMap<&str, &Command> {
    if command.has_subcommands() {
        command
            .get_subcommands()
            .filter(|c| ROLES.contains(&c.get_name()))
            .map(|c| (c.get_name(), c))
            .collect()
    } else {
        let name = command.get_name().trim_start_matches("eventbus-");
        ROLES
            .iter()
            .find(|r| **r == name)
            .map(|r| (*r, command))
            .into_iter()
            .collect()
    }
}

/// `command` with `--config` on each role, and, when the command line names a file, that file's
/// settings as the running role's defaults.
pub fn prepare(command: Command, args: &[OsString]) -> Result<Command, String> {
    let mut command = if command.has_subcommands() {
        command.mut_subcommands(|sub| {
            if ROLES.contains(&sub.get_name()) {
                sub.arg(config_arg())
            } else {
                sub
            }
        })
    } else if roles_of(&command).is_empty() {
        command
    } else {
        command.arg(config_arg())
    };
    let (Some(role), Some(path)) = role_and_file(&command, args) else {
        return Ok(command);
    };
    let file = File::read(&path)?;
    let snapshot = command.clone();
    let roles = roles_of(&snapshot);
    file.check(&roles)?;
    if command.has_subcommands() {
        let mut failure = None;
        command =
            command.mut_subcommand(&role, |sub| match file.apply(&role, sub.clone(), &roles) {
                Ok(applied) => applied,
                Err(why) => {
                    failure = Some(why);
                    sub
                }
            });
        if let Some(why) = failure {
            return Err(why);
        }
        Ok(command)
    } else {
        file.apply(&role, command, &roles)
    }
}

/// A complete configuration file for the roles of `command`, every setting with its default and
/// help: top-level keys for settings several roles share, then a section per role.
pub fn generate(command: &Command) -> String {
    let roles = roles_of(command);
    let services: Vec<&Command> = ROLES
        .iter()
        .filter(|r| **r != "serve")
        .filter_map(|r| roles.get(r).copied())
        .collect();
    // A setting goes to the top when two services or more have it, with one default.
    let mut shared: BTreeMap<String, (&Arg, usize, bool)> = BTreeMap::new();
    for service in &services {
        for arg in service.get_arguments().filter(|a| key_of(a).is_some()) {
            let entry = shared.entry(identity(arg)).or_insert((arg, 0, true));
            entry.1 += 1;
            entry.2 &= entry.0.get_default_values() == arg.get_default_values();
        }
    }
    let top: BTreeMap<String, &Arg> = shared
        .iter()
        .filter(|(_, (_, count, same))| *count >= 2 && *same)
        .map(|(id, (arg, _, _))| (id.clone(), *arg))
        .collect();
    let mut out = String::from(
        "# eventbus configuration: every setting, with its default.\n\
         # Use: eventbus <role> --config FILE (or EVENTBUS_CONFIG=FILE). Flags and EVENTBUS_*\n\
         # variables override this file. Keys here at the top apply to every role that has the\n\
         # setting; a role's section overrides them. `serve` runs every role: it takes the\n\
         # settings of [store], [auth], [ingest], [gateway] and [hooks] too, then [serve].\n",
    );
    let mut printed: Vec<(String, Vec<std::ffi::OsString>)> = Vec::new();
    let mut by_key: Vec<&Arg> = top.values().copied().collect();
    by_key.sort_by_key(|a| key_of(a));
    for arg in by_key {
        out.push('\n');
        entry(&mut out, arg);
        printed.push((identity(arg), defaults_of(arg)));
    }
    for role in ROLES {
        let Some(role_command) = roles.get(role) else {
            continue;
        };
        out.push_str(&format!("\n[{role}]\n"));
        for arg in role_command.get_arguments().filter(|a| key_of(a).is_some()) {
            let id = identity(arg);
            // Printed already with this default (at the top, or in a role's section that serve
            // reads): not again.
            if top.contains_key(&id)
                || (role == "serve"
                    && printed
                        .iter()
                        .any(|(p, d)| *p == id && *d == defaults_of(arg)))
            {
                continue;
            }
            out.push('\n');
            entry(&mut out, arg);
            printed.push((id, defaults_of(arg)));
        }
    }
    out
}

fn defaults_of(arg: &Arg) -> Vec<std::ffi::OsString> {
    arg.get_default_values().iter().map(|v| v.into()).collect()
}

/// Settings that are secrets: shown commented out, to be given from a file or a Secret.
fn is_secret(arg: &Arg) -> bool {
    arg.is_hide_env_values_set()
        || matches!(
            arg.get_long(),
            Some("api-keys" | "internal-token" | "nats-password")
        )
}

fn entry(out: &mut String, arg: &Arg) {
    let key = key_of(arg).unwrap_or_default();
    if let Some(help) = arg.get_long_help().or(arg.get_help()) {
        for line in wrap(&help.to_string(), 96) {
            out.push_str(&format!("# {line}\n"));
        }
    }
    if let Some(env) = arg.get_env() {
        out.push_str(&format!(
            "# flag --{}, variable {}\n",
            arg.get_long().unwrap_or_default(),
            env.to_string_lossy()
        ));
    }
    let defaults: Vec<String> = arg
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .collect();
    let flag = matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse);
    let value = if flag {
        Some(defaults.first().map_or("false".to_owned(), |d| d.clone()))
    } else if takes_many(arg) {
        let items: Vec<String> = defaults.iter().map(|d| toml_string(d)).collect();
        (!items.is_empty()).then(|| format!("[{}]", items.join(", ")))
    } else {
        defaults.first().map(|d| {
            if d.parse::<i64>().is_ok() {
                d.clone()
            } else {
                toml_string(d)
            }
        })
    };
    match value {
        Some(value) if !is_secret(arg) => out.push_str(&format!("{key} = {value}\n")),
        _ => {
            let example = if takes_many(arg) { "[]" } else { "\"\"" };
            out.push_str(&format!("# {key} = {example}\n"));
        }
    }
}

fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for paragraph in text.lines() {
        let mut line = String::new();
        for word in paragraph.split_whitespace() {
            if !line.is_empty() && line.len() + 1 + word.len() > width {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        lines.push(line);
    }
    lines
}
