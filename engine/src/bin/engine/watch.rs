//! `--watch`: a thread that polls the plan's sources (the plan file, or
//! every file the compiler reads under the `--protos` and `--rules`
//! directories) for changes of name, size or modification time, and asks
//! for a reload once they have stopped changing.
//!
//! Polling, not file-system notifications: it works the same on every
//! platform and file system (network mounts, container volumes), costs a
//! few `stat` calls per interval, and a save that writes several files (or
//! one file in several steps) is seen as one change.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// Time between two looks at the sources.
pub const INTERVAL: Duration = Duration::from_millis(500);

/// What to watch.
#[derive(Debug, Clone)]
pub enum Target {
    /// A plan file.
    Plan(PathBuf),
    /// The directories compiled in process.
    Sources { protos: Vec<PathBuf>, rules: Vec<PathBuf> },
}

/// One look at the sources: each file with its size and modification time
/// (None when it cannot be read), in a fixed order, so equal looks compare
/// equal.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot(Vec<(PathBuf, Option<(u64, SystemTime)>)>);

impl Target {
    fn files(&self) -> Vec<PathBuf> {
        match self {
            Target::Plan(path) => vec![path.clone()],
            Target::Sources { protos, rules } => {
                let list = |dirs: &[PathBuf], ext: &[&str]| -> Vec<PathBuf> {
                    // A directory that cannot be listed is an entry of its
                    // own, so that it appearing or going away is a change.
                    dirs.iter()
                        .flat_map(|d| wirestub_compiler::protos::list_files(d, ext).unwrap_or_else(|_| vec![d.clone()]))
                        .collect()
                };
                let mut files = list(protos, &["proto"]);
                files.extend(list(rules, &["yaml", "yml", "json"]));
                files
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot(
            self.files()
                .into_iter()
                .map(|path| {
                    let stamp = std::fs::metadata(&path)
                        .ok()
                        .map(|m| (m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH)));
                    (path, stamp)
                })
                .collect(),
        )
    }
}

/// A look at the sources taken, ready to watch them from a thread.
pub struct Watcher {
    target: Target,
    seen: Snapshot,
}

impl Watcher {
    /// Takes the first look at `target`: changes from this point on count.
    pub fn new(target: Target) -> Watcher {
        let seen = target.snapshot();
        Watcher { target, seen }
    }

    /// Starts the watching thread. `changed` is called, from that thread,
    /// once per change, after the sources have looked the same for one
    /// interval.
    pub fn spawn(self, changed: impl Fn() + Send + 'static) -> std::io::Result<()> {
        let Watcher { target, mut seen } = self;
        std::thread::Builder::new().name("wirestub-watch".into()).spawn(move || loop {
            std::thread::sleep(INTERVAL);
            let now = target.snapshot();
            if now == seen {
                continue;
            }
            // Changing: wait until two looks in a row agree.
            let mut last = now;
            loop {
                std::thread::sleep(INTERVAL);
                let next = target.snapshot();
                if next == last {
                    break;
                }
                last = next;
            }
            seen = last;
            changed();
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_see_edits_additions_and_removals() {
        let dir = std::env::temp_dir().join(format!("wirestub-watch-{}", std::process::id()));
        let (protos, rules) = (dir.join("protos"), dir.join("rules"));
        std::fs::create_dir_all(&protos).unwrap();
        std::fs::create_dir_all(rules.join("nested")).unwrap();
        std::fs::write(protos.join("a.proto"), "syntax = \"proto3\";").unwrap();
        std::fs::write(rules.join("nested/a.b.c.yaml"), "responses: []").unwrap();
        let target = Target::Sources { protos: vec![protos.clone()], rules: vec![rules.clone()] };
        let first = target.snapshot();
        assert_eq!(first.0.len(), 2);
        assert_eq!(first, target.snapshot());

        // Files the compiler does not read are not watched.
        std::fs::write(rules.join("notes.txt"), "x").unwrap();
        std::fs::write(rules.join(".a.b.c.yaml.swp"), "x").unwrap();
        assert_eq!(first, target.snapshot());

        std::fs::write(rules.join("nested/a.b.c.yaml"), "responses: [] # longer").unwrap();
        let edited = target.snapshot();
        assert_ne!(first, edited);
        std::fs::write(rules.join("x.y.z.json"), "{}").unwrap();
        let added = target.snapshot();
        assert_ne!(edited, added);
        std::fs::remove_file(protos.join("a.proto")).unwrap();
        assert_ne!(added, target.snapshot());

        let plan = Target::Plan(dir.join("plan.bin"));
        let missing = plan.snapshot();
        assert_eq!(missing.0[0].1, None);
        std::fs::write(dir.join("plan.bin"), "x").unwrap();
        assert_ne!(missing, plan.snapshot());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn one_change_is_one_call_once_it_settles() {
        let dir = std::env::temp_dir().join(format!("wirestub-watch-spawn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plan = dir.join("plan.bin");
        std::fs::write(&plan, "one").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        Watcher::new(Target::Plan(plan.clone()))
            .spawn(move || {
                let _ = tx.send(());
            })
            .unwrap();
        // Several writes in a row, each within the interval.
        for text in ["two", "three!", "four!!"] {
            std::fs::write(&plan, text).unwrap();
            std::thread::sleep(INTERVAL / 5);
        }
        rx.recv_timeout(INTERVAL * 20).expect("a call after the change");
        assert!(rx.recv_timeout(INTERVAL * 3).is_err(), "one call for one burst of writes");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
