//! The `compiler` command: `build`, `check` and `dump`. Thin: it parses
//! arguments, calls the library and maps the result to an exit code.

use std::path::PathBuf;
use std::process::ExitCode;
use wirestub_compiler::{compile, dump, Options, Plan};

const USAGE: &str = "\
usage:
  compiler build [--protos DIR]... [--rules DIR]... [-o plan.bin]
  compiler check [--protos DIR]... [--rules DIR]...
  compiler dump plan.bin

defaults: --protos protos --rules rules -o plan.bin
exit status: 0 success, 1 errors in the inputs, 2 bad usage";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("error: {msg}\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &[String]) -> Result<ExitCode, String> {
    let Some(cmd) = args.first() else { return Err("no command given".into()) };
    let mut protos = Vec::new();
    let mut rules = Vec::new();
    let mut out = PathBuf::from("plan.bin");
    let mut positional = Vec::new();
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        let mut value = |flag: &str| it.next().cloned().ok_or_else(|| format!("`{flag}` needs a value"));
        match a.as_str() {
            "--protos" => protos.push(PathBuf::from(value(a)?)),
            "--rules" => rules.push(PathBuf::from(value(a)?)),
            "-o" | "--out" => out = PathBuf::from(value(a)?),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(ExitCode::SUCCESS);
            }
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
    match cmd.as_str() {
        "build" | "check" => {
            if !positional.is_empty() {
                return Err(format!("unexpected argument `{}`", positional[0]));
            }
            match compile(&options) {
                Err(diags) => {
                    eprint!("{}", diags.render());
                    Ok(ExitCode::from(1))
                }
                Ok(output) => {
                    eprint!("{}", output.warnings.render());
                    if cmd == "build" {
                        let bytes = output.plan.to_bytes();
                        if let Err(e) = std::fs::write(&out, &bytes) {
                            eprintln!("error: cannot write `{}`: {e}", out.display());
                            return Ok(ExitCode::from(1));
                        }
                        eprintln!("compiled {} -> {} ({} bytes)", output.summary(), out.display(), bytes.len());
                    } else {
                        eprintln!("checked {}: no errors", output.summary());
                    }
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
        "dump" => {
            let [path] = positional.as_slice() else { return Err("`dump` takes one plan file".into()) };
            let bytes = std::fs::read(path).map_err(|e| format!("cannot read `{path}`: {e}"))?;
            match Plan::from_bytes(&bytes) {
                Ok(plan) => {
                    print!("{}", dump(&plan));
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("error: `{path}`: {e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        other => Err(format!("unknown command `{other}`")),
    }
}
