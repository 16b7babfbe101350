//! Shell completions (`engine completions bash|zsh|fish`), written from the
//! one table of flags, so they list every flag and complete its value: a
//! directory, a file, or one of the words a flag takes.

use crate::options::{Kind, FLAGS};

/// The completion script for `shell`.
pub fn script(shell: &str) -> Result<String, String> {
    match shell {
        "bash" => Ok(bash()),
        // zsh runs bash completions through its bashcompinit.
        "zsh" => Ok(format!("autoload -U +X bashcompinit && bashcompinit\n{}", bash())),
        "fish" => Ok(fish()),
        other => Err(format!("no completions for `{other}`: the shells are bash, zsh and fish")),
    }
}

/// What a flag's value completes to.
enum Completes {
    Nothing,
    Directory,
    File,
    Words(Vec<&'static str>),
}

fn completes(kind: Kind, value: &'static str) -> Completes {
    match kind {
        Kind::Switch => Completes::Nothing,
        Kind::Paths => Completes::Directory,
        Kind::Path => Completes::File,
        _ if value.contains('|') => Completes::Words(value.split('|').collect()),
        _ if matches!(value, "FILE" | "PATH" | "DIR") => Completes::File,
        _ => Completes::Nothing,
    }
}

fn bash() -> String {
    let mut cases = String::new();
    for f in FLAGS {
        let action = match completes(f.kind, f.value) {
            Completes::Nothing => continue,
            Completes::Directory => "COMPREPLY=($(compgen -d -- \"$cur\"))".to_string(),
            Completes::File => "COMPREPLY=($(compgen -f -- \"$cur\"))".to_string(),
            Completes::Words(w) => format!("COMPREPLY=($(compgen -W \"{}\" -- \"$cur\"))", w.join(" ")),
        };
        cases.push_str(&format!("        --{}) {action}; return ;;\n", f.name));
    }
    let flags: Vec<String> = FLAGS.iter().map(|f| format!("--{}", f.name)).collect();
    format!(
        "# bash completion for the wirestub engine: source it, or put it in\n\
         # /etc/bash_completion.d/ (made by `engine completions bash`).\n\
         _wirestub_engine() {{\n\
         \x20   local cur=\"${{COMP_WORDS[COMP_CWORD]}}\" prev=\"${{COMP_WORDS[COMP_CWORD-1]}}\"\n\
         \x20   if [[ $COMP_CWORD -eq 1 ]]; then\n\
         \x20       COMPREPLY=($(compgen -W \"run completions --help --version\" -- \"$cur\")); return\n\
         \x20   fi\n\
         \x20   if [[ ${{COMP_WORDS[1]}} == completions ]]; then\n\
         \x20       COMPREPLY=($(compgen -W \"bash zsh fish\" -- \"$cur\")); return\n\
         \x20   fi\n\
         \x20   case \"$prev\" in\n{cases}\x20   esac\n\
         \x20   if [[ $cur == -* ]]; then\n\
         \x20       COMPREPLY=($(compgen -W \"{}\" -- \"$cur\"))\n\
         \x20   else\n\
         \x20       COMPREPLY=($(compgen -f -- \"$cur\"))\n\
         \x20   fi\n\
         }}\n\
         complete -F _wirestub_engine engine\n",
        flags.join(" ")
    )
}

fn fish() -> String {
    let mut out = String::from(
        "# fish completion for the wirestub engine (made by `engine completions fish`).\n\
         complete -c engine -f -n __fish_use_subcommand -a run -d 'serve a plan, or protos and rules'\n\
         complete -c engine -f -n __fish_use_subcommand -a completions -d 'print a shell completion script'\n\
         complete -c engine -f -n '__fish_seen_subcommand_from completions' -a 'bash zsh fish'\n",
    );
    for f in FLAGS {
        let help = f.help.split(';').next().unwrap_or_default().replace('\'', "\\'");
        let value = match completes(f.kind, f.value) {
            Completes::Nothing if f.kind == Kind::Switch => String::new(),
            Completes::Nothing => " -x".to_string(),
            Completes::Directory => " -r -a '(__fish_complete_directories)'".to_string(),
            Completes::File => " -r -F".to_string(),
            Completes::Words(w) => format!(" -x -a '{}'", w.join(" ")),
        };
        out.push_str(&format!(
            "complete -c engine -n '__fish_seen_subcommand_from run' -l {}{value} -d '{help}'\n",
            f.name
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_is_completed_in_every_shell() {
        let (bash, zsh, fish) = (script("bash").unwrap(), script("zsh").unwrap(), script("fish").unwrap());
        for f in FLAGS {
            assert!(bash.contains(&format!("--{}", f.name)), "bash lacks --{}", f.name);
            assert!(zsh.contains(&format!("--{}", f.name)), "zsh lacks --{}", f.name);
            assert!(fish.contains(&format!("-l {}", f.name)), "fish lacks --{}", f.name);
        }
        assert!(bash.contains("--protos) COMPREPLY=($(compgen -d"));
        assert!(bash.contains("--no-match) COMPREPLY=($(compgen -W \"not-found empty-ok\""));
        assert!(script("tcsh").is_err());
    }
}
