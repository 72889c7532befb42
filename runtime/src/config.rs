//! One configuration for every role: flags, then `EVENTBUS_*` variables, then a TOML file, then
//! the defaults written once, on the flags themselves.

/// The defaults of a settings group, as its flags declare them (environment not consulted): the
/// one place a default is written is its `#[arg(default_value…)]`.
pub fn defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let command = T::augment_args(clap::Command::new("defaults").no_binary_name(true))
        .mut_args(|arg| arg.env(None));
    let matches = command
        .try_get_matches_from(Vec::<String>::new())
        .unwrap_or_else(|err| panic!("a settings group must parse with no arguments: {err}"));
    T::from_arg_matches(&matches)
        .unwrap_or_else(|err| panic!("a settings group must parse with no arguments: {err}"))
}
