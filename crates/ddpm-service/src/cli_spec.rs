//! Every option of a binary's command line, as data: the source the deployment checks
//! (`scripts/deploy_env.py`: the README's environment table, the compose file's and
//! `.env.example`'s variables) read, instead of parsing `--help` text.
//!
//! `ddpm-trainer --cli-spec` and `ddpm-server --cli-spec` print it as JSON (see
//! [`print_and_exit_if_asked`]); the flag is read before clap parses, so it appears in
//! no help text and needs no subcommand.

use clap::Command;
use serde::Serialize;

/// The flag that prints the spec instead of running.
pub const FLAG: &str = "--cli-spec";

/// One option of one (sub)command.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OptionSpec {
    /// The subcommand path (`[]` for the top level, `["runs", "list"]`).
    pub command: Vec<String>,
    /// `--long-name`.
    pub flag: String,
    /// The environment variable it falls back to.
    pub env: Option<String>,
    /// The default as a user writes it: clap's, or the one the help text states in
    /// `[default: …]` (e.g. "the hostname").
    pub default: Option<String>,
    /// The accepted values of an enumerated option.
    pub possible: Vec<String>,
    /// The help text, without the `[default: …]` note.
    pub about: String,
    /// Whether subcommands take it too.
    pub global: bool,
}

/// Every visible long option of `command` and of its subcommands, depth first, each
/// (sub)command's in its help order. A global option is listed once, at the top.
pub fn options(command: &Command) -> Vec<OptionSpec> {
    let mut out = Vec::new();
    let mut command = command.clone();
    // Global options reach subcommands only once clap has built the command tree.
    command.build();
    walk(&command, &mut Vec::new(), &mut out);
    out
}

fn walk(command: &Command, path: &mut Vec<String>, out: &mut Vec<OptionSpec>) {
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if arg.is_hide_set() || matches!(long, "help" | "version") {
            continue;
        }
        // A global option propagated into a subcommand: listed once, where it is defined.
        if arg.is_global_set() && !path.is_empty() {
            continue;
        }
        let help = arg
            .get_long_help()
            .or_else(|| arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        let (about, stated_default) = split_default(&help);
        // A switch (`--once`) has clap's implicit "false", which is no value a user sets.
        let switch = !arg.get_action().takes_values();
        let default = arg
            .get_default_values()
            .iter()
            .filter(|_| !switch)
            .map(|v| v.to_string_lossy().into_owned())
            .collect::<Vec<_>>();
        out.push(OptionSpec {
            command: path.clone(),
            flag: format!("--{long}"),
            env: arg.get_env().map(|e| e.to_string_lossy().into_owned()),
            default: if default.is_empty() {
                stated_default
            } else {
                Some(default.join(","))
            },
            possible: arg
                .get_possible_values()
                .iter()
                .filter(|v| !v.is_hide_set())
                .map(|v| v.get_name().to_string())
                .collect(),
            about,
            global: arg.is_global_set(),
        });
    }
    for sub in command.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        path.push(sub.get_name().to_string());
        walk(sub, path, out);
        path.pop();
    }
}

/// The help text without a trailing `[default: …]` note, and that note's value.
fn split_default(help: &str) -> (String, Option<String>) {
    let flat = help.split_whitespace().collect::<Vec<_>>().join(" ");
    if let Some(start) = flat.find("[default: ") {
        if let Some(len) = flat[start..].find(']') {
            let value = flat[start + "[default: ".len()..start + len]
                .trim()
                .to_string();
            let about = format!("{}{}", &flat[..start], &flat[start + len + 1..]);
            return (about.trim().to_string(), Some(value));
        }
    }
    (flat, None)
}

/// If the process was started as `<binary> --cli-spec`, prints `command`'s options as a
/// JSON array on stdout and exits; otherwise returns. Call it first in `main`.
pub fn print_and_exit_if_asked(command: impl FnOnce() -> Command) {
    let mut args = std::env::args_os().skip(1);
    if args.next().is_some_and(|a| a == FLAG) && args.next().is_none() {
        let json = serde_json::to_string_pretty(&options(&command())).expect("plain data");
        println!("{json}");
        std::process::exit(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Parser, Subcommand};

    #[derive(Parser)]
    struct Cli {
        /// Top-level and global.
        #[arg(long, env = "X_ROOT", default_value = "./r", global = true)]
        root: String,
        /// Who runs it [default: the hostname].
        #[arg(long, env = "X_HOST")]
        host: Option<String>,
        #[arg(long, hide = true)]
        secret_switch: bool,
        /// A switch.
        #[arg(long, env = "X_ONCE")]
        once: bool,
        #[command(subcommand)]
        command: Sub,
    }

    #[derive(Subcommand)]
    enum Sub {
        /// A subcommand.
        Go {
            /// How.
            #[arg(long, env = "X_MODE", value_enum, default_value = "fast")]
            mode: Mode,
        },
    }

    #[derive(Clone, clap::ValueEnum)]
    enum Mode {
        Fast,
        Slow,
    }

    #[test]
    fn lists_each_option_once_with_its_command_env_and_default() {
        use clap::CommandFactory;
        let spec = options(&Cli::command());
        let flags: Vec<(Vec<String>, &str)> = spec
            .iter()
            .map(|o| (o.command.clone(), o.flag.as_str()))
            .collect();
        assert_eq!(
            flags,
            vec![
                (vec![], "--root"),
                (vec![], "--host"),
                (vec![], "--once"),
                (vec!["go".to_string()], "--mode"),
            ]
        );
        assert!(spec[0].global && !spec[1].global);
        assert_eq!(spec[0].default.as_deref(), Some("./r"));
        assert_eq!(spec[1].env.as_deref(), Some("X_HOST"));
        assert_eq!(spec[1].default.as_deref(), Some("the hostname"));
        assert_eq!(spec[1].about, "Who runs it");
        assert_eq!(spec[2].default, None, "a switch has no default to show");
        assert_eq!(spec[3].possible, ["fast", "slow"]);
        assert_eq!(spec[3].default.as_deref(), Some("fast"));
    }
}
