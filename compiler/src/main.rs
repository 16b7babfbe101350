//! The `compiler` command: `build`, `check` and `dump`. Thin: it parses
//! arguments, calls the library and maps the result to an exit code.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use wirestub_compiler::{compile, dump, Options, Plan};

const USAGE: &str = "\
usage:
  compiler build [--protos DIR]... [--protos-only FILE]... [--rules DIR]... [--lenient] [-o plan.bin]
  compiler check [--protos DIR]... [--protos-only FILE]... [--rules DIR]... [--lenient]

--protos-only FILE compiles only that file (a path below a --protos
directory) and what it imports, instead of every .proto of the tree.
--lenient makes what Wishmock ignores a warning: a .proto file that does
not compile, a rule document or entry with an error, are left out (a rule
file starting with `# wirestub: lenient` is lenient on its own).
  compiler dump plan.bin
  compiler completions bash|zsh|fish
  compiler --help | --version

defaults: --protos protos --rules rules -o plan.bin
exit status: 0 success, 1 errors in the inputs, 2 bad usage";

/// `compiler completions bash` (zsh runs it through bashcompinit).
const BASH: &str = r#"# bash completion for the wirestub compiler (made by `compiler completions bash`).
_wirestub_compiler() {
    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"
    if [[ $COMP_CWORD -eq 1 ]]; then
        COMPREPLY=($(compgen -W "build check dump completions --help --version" -- "$cur")); return
    fi
    case "$prev" in
        --protos|--rules) COMPREPLY=($(compgen -d -- "$cur")); return ;;
        --protos-only|-o|--out) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        completions) COMPREPLY=($(compgen -W "bash zsh fish" -- "$cur")); return ;;
    esac
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "--protos --protos-only --rules --lenient -o --out --help" -- "$cur"))
    else
        COMPREPLY=($(compgen -f -- "$cur"))
    fi
}
complete -F _wirestub_compiler compiler
"#;

/// `compiler completions fish`.
const FISH: &str = "# fish completion for the wirestub compiler (made by `compiler completions fish`).
complete -c compiler -f -n __fish_use_subcommand -a 'build check dump completions'
complete -c compiler -f -n '__fish_seen_subcommand_from completions' -a 'bash zsh fish'
complete -c compiler -l protos -r -a '(__fish_complete_directories)' -d 'directory of .proto files'
complete -c compiler -l rules -r -a '(__fish_complete_directories)' -d 'directory of rule files'
complete -c compiler -l protos-only -r -F -d 'compile only this .proto and its imports'
complete -c compiler -l lenient -d 'what Wishmock ignores is a warning'
complete -c compiler -s o -l out -r -F -d 'the plan file to write'
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err(msg) => {
            report(&format!("error: {msg}\n\n{USAGE}\n"));
            ExitCode::from(2)
        }
    }
}

/// Writes `text` to stdout. A reader that went away (`compiler dump
/// plan.bin | head`) is no failure: the rest is not wanted. Any other write
/// error is reported, exit 1. (`print!` would panic on both.)
fn print(text: &str) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            report(&format!("error: cannot write to stdout: {e}\n"));
            ExitCode::from(1)
        }
    }
}

/// Writes `text` to stderr (diagnostics, summaries); if that fails there is
/// nowhere left to say so (`eprint!` would panic).
fn report(text: &str) {
    let mut stderr = std::io::stderr().lock();
    let _ = stderr.write_all(text.as_bytes()).and_then(|()| stderr.flush());
}

fn run(args: &[String]) -> Result<ExitCode, String> {
    let Some(cmd) = args.first() else { return Err("no command given".into()) };
    if matches!(cmd.as_str(), "-h" | "--help" | "help") {
        return Ok(print(&format!("{USAGE}\n")));
    }
    if cmd == "completions" {
        return match args.get(1).map(String::as_str) {
            Some("bash") => Ok(print(BASH)),
            Some("zsh") => Ok(print(&format!("autoload -U +X bashcompinit && bashcompinit\n{BASH}"))),
            Some("fish") => Ok(print(FISH)),
            _ => Err("`compiler completions` takes a shell: bash, zsh or fish".into()),
        };
    }
    if matches!(cmd.as_str(), "-V" | "--version" | "version") {
        return Ok(print(&format!("compiler {}\n", env!("CARGO_PKG_VERSION"))));
    }
    let mut protos = Vec::new();
    let mut rules = Vec::new();
    let mut protos_only = Vec::new();
    let mut lenient = false;
    let mut out = PathBuf::from("plan.bin");
    let mut positional = Vec::new();
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        let mut value = |flag: &str| it.next().cloned().ok_or_else(|| format!("`{flag}` needs a value"));
        match a.as_str() {
            "--protos" => protos.push(PathBuf::from(value(a)?)),
            "--rules" => rules.push(PathBuf::from(value(a)?)),
            "--protos-only" => protos_only.push(value(a)?.replace('\\', "/")),
            "--lenient" => lenient = true,
            "-o" | "--out" => out = PathBuf::from(value(a)?),
            "-h" | "--help" => return Ok(print(&format!("{USAGE}\n"))),
            s if s.starts_with('-') => return Err(format!("unknown flag `{s}`")),
            s => positional.push(s.to_string()),
        }
    }
    let mut options = Options::default();
    if !protos.is_empty() {
        options.protos = protos;
    }
    if !rules.is_empty() {
        options.rules = rules;
    }
    options.protos_only = protos_only;
    options.lenient = lenient;
    match cmd.as_str() {
        "build" | "check" => {
            if !positional.is_empty() {
                return Err(format!("unexpected argument `{}`", positional[0]));
            }
            match compile(&options) {
                Err(diags) => {
                    report(&diags.render_ending((cmd == "build").then_some("no plan written")));
                    Ok(ExitCode::from(1))
                }
                Ok(output) => {
                    report(&output.warnings.render());
                    if cmd == "build" {
                        let bytes = output.plan.to_bytes();
                        if let Err(e) = std::fs::write(&out, &bytes) {
                            report(&format!("error: cannot write `{}`: {e}\n", out.display()));
                            return Ok(ExitCode::from(1));
                        }
                        report(&format!(
                            "compiled {} -> {} ({} bytes, identity {})\n",
                            output.summary(),
                            out.display(),
                            bytes.len(),
                            wirestub_plan::identity(&bytes)
                        ));
                    } else {
                        report(&format!("checked {}: no errors\n", output.summary()));
                    }
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
        "dump" => {
            let [path] = positional.as_slice() else { return Err("`dump` takes one plan file".into()) };
            let bytes = std::fs::read(path).map_err(|e| format!("cannot read `{path}`: {e}"))?;
            match Plan::from_bytes(&bytes) {
                Ok(plan) => Ok(print(&dump(&plan))),
                Err(e) => {
                    report(&format!("error: `{path}`: {e}\n"));
                    Ok(ExitCode::from(1))
                }
            }
        }
        other => Err(format!("unknown command `{other}`")),
    }
}
