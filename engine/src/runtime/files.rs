//! Uploaded file names and their files on disk: a name is checked to stay
//! inside its directory (no `..`, no absolute path, no hidden or empty
//! component, no symbolic link on the way), and a file is written
//! atomically (a hidden temporary file in the same directory, fsync,
//! rename, fsync of the directory), so a crash leaves the old file or the
//! new one, never a part.

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Longest name accepted, in bytes.
pub const MAX_NAME: usize = 512;

/// Checks an uploaded file's name: a relative `/`-separated path whose
/// components are not empty, `.`, `..` or hidden, of printable ASCII
/// without `\` or `:`, ending in one of `extensions`. Returns the name
/// normalised (leading `./` and repeated `/` are not accepted either).
pub fn check_name(name: &str, extensions: &[&str]) -> Result<String, String> {
    if name.is_empty() {
        return Err("the file name is empty".into());
    }
    if name.len() > MAX_NAME {
        return Err(format!("the file name is longer than {MAX_NAME} bytes"));
    }
    if name.starts_with('/') {
        return Err(format!("`{name}` is an absolute path; give a path relative to the directory"));
    }
    if let Some(c) = name.chars().find(|c| !c.is_ascii_graphic() || matches!(c, '\\' | ':')) {
        return Err(format!("`{}` holds `{}`, which file names here may not", name.escape_debug(), c.escape_debug()));
    }
    for part in name.split('/') {
        match part {
            "" => return Err(format!("`{name}` has an empty path component")),
            "." | ".." => return Err(format!("`{name}` leaves its directory (`{part}` is not allowed)")),
            p if p.starts_with('.') => return Err(format!("`{name}` has a hidden component `{p}`")),
            _ => {}
        }
    }
    // Exactly, as directories are read (`x.YAML` would be written, then
    // never read again).
    let ext = name.rsplit_once('.').map(|(_, e)| e).unwrap_or_default();
    if !extensions.contains(&ext) {
        let list: Vec<String> = extensions.iter().map(|e| format!(".{e}")).collect();
        return Err(format!("`{name}` must end in {}", list.join(", ")));
    }
    Ok(name.to_string())
}

/// `root/name` after checking that no directory on the way from `root` is
/// a symbolic link and that the file itself is not one. Directories that
/// do not exist yet are fine (they will be created).
pub fn confined(root: &Path, name: &str) -> Result<PathBuf, String> {
    let mut path = root.to_path_buf();
    let parts: Vec<&str> = name.split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        path.push(part);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!("`{name}`: `{}` is a symbolic link; uploads do not follow links", path.display()))
            }
            Ok(m) if i + 1 < parts.len() && !m.is_dir() => {
                return Err(format!("`{name}`: `{}` is not a directory", path.display()))
            }
            Ok(m) if i + 1 == parts.len() && m.is_dir() => {
                return Err(format!("`{name}`: `{}` is a directory", path.display()))
            }
            _ => {}
        }
    }
    Ok(path)
}

/// Writes `bytes` to `root/name` atomically, creating directories below
/// `root` as needed.
pub fn write(root: &Path, name: &str, bytes: &[u8]) -> Result<(), String> {
    let path = confined(root, name)?;
    let dir = path.parent().unwrap_or(root).to_path_buf();
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create `{}`: {e}", dir.display()))?;
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{file_name}.{:016x}.tmp", crate::rng::next_u64()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok::<(), std::io::Error>(())
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write `{}`: {e}", path.display())
    })
}

/// A set of writes and removals made all or nothing: [`Batch::write`]
/// puts each new file beside its place (a hidden temporary, fsynced),
/// [`Batch::commit`] renames them all into place and then removes; a batch
/// dropped before its commit removes its temporaries. Every path is checked
/// before anything is renamed or removed, so a name that cannot be written
/// changes nothing.
#[derive(Default)]
pub struct Batch {
    writes: Vec<(PathBuf, PathBuf)>,
    removals: Vec<(PathBuf, String)>,
    committed: bool,
}

impl Batch {
    pub fn write(&mut self, root: &Path, name: &str, bytes: &[u8]) -> Result<(), String> {
        let path = confined(root, name)?;
        let dir = path.parent().unwrap_or(root).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create `{}`: {e}", dir.display()))?;
        // `create_dir_all` followed no link: `confined` checked the way.
        let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
        let tmp = dir.join(format!(".{file_name}.{:016x}.tmp", crate::rng::next_u64()));
        let written = (|| {
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!("cannot write `{}`: {e}", path.display()));
        }
        self.writes.push((tmp, path));
        Ok(())
    }

    pub fn remove(&mut self, root: &Path, name: &str) -> Result<(), String> {
        confined(root, name)?;
        self.removals.push((root.to_path_buf(), name.to_string()));
        Ok(())
    }

    pub fn commit(mut self) -> Result<(), String> {
        self.committed = true;
        for (tmp, path) in &self.writes {
            if let Err(e) = std::fs::rename(tmp, path) {
                return Err(format!("cannot write `{}`: {e}", path.display()));
            }
            if let Some(d) = path.parent().and_then(|d| std::fs::File::open(d).ok()) {
                let _ = d.sync_all();
            }
        }
        for (root, name) in &self.removals {
            remove(root, name)?;
        }
        Ok(())
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        if !self.committed {
            for (tmp, _) in &self.writes {
                let _ = std::fs::remove_file(tmp);
            }
        }
    }
}

/// Removes the temporary files (`.NAME.<16 hex digits>.tmp`) an engine
/// killed while writing left below `dir`.
pub fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else { continue };
        if kind.is_dir() {
            remove_stale_temporaries(&path);
            continue;
        }
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let stale = name.starts_with('.')
            && name
                .strip_suffix(".tmp")
                .and_then(|n| n.rsplit_once('.'))
                .is_some_and(|(_, hex)| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
        if kind.is_file() && stale {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Removes `root/name`, then the directories below `root` it leaves empty.
/// A file already gone is not an error.
pub fn remove(root: &Path, name: &str) -> Result<(), String> {
    let path = confined(root, name)?;
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot remove `{}`: {e}", path.display())),
    }
    let mut dir = path.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        if d == root || !d.starts_with(root) || std::fs::remove_dir(&d).is_err() {
            break;
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    if let Some(parent) = path.parent() {
        let dir = if parent.exists() { parent } else { root };
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_inside_their_directory() {
        let ok = |n: &str| check_name(n, &["proto"]).unwrap();
        assert_eq!(ok("a.proto"), "a.proto");
        assert_eq!(ok("common/v1/types.proto"), "common/v1/types.proto");
        for bad in [
            "",
            "/etc/passwd.proto",
            "../x.proto",
            "a/../../x.proto",
            "a/./x.proto",
            "a//x.proto",
            ".hidden.proto",
            "a/.git/x.proto",
            "a\\x.proto",
            "c:x.proto",
            "a b.proto",
            "x.yaml",
            "x",
            "a\u{0}.proto",
            "é.proto",
        ] {
            assert!(check_name(bad, &["proto"]).is_err(), "{bad:?} accepted");
        }
        assert!(check_name(&"a".repeat(600), &["proto"]).is_err());
    }

    #[test]
    fn writes_are_atomic_and_links_are_not_followed() {
        let root = std::env::temp_dir().join(format!("wirestub-files-{:x}", crate::rng::next_u64()));
        std::fs::create_dir_all(&root).unwrap();
        write(&root, "a/b/c.proto", b"one").unwrap();
        write(&root, "a/b/c.proto", b"two").unwrap();
        assert_eq!(std::fs::read(root.join("a/b/c.proto")).unwrap(), b"two");
        let leftovers: Vec<_> = std::fs::read_dir(root.join("a/b")).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");
        remove(&root, "a/b/c.proto").unwrap();
        assert!(!root.join("a").exists(), "empty directories are removed");
        remove(&root, "a/b/c.proto").unwrap();
        #[cfg(unix)]
        {
            let outside = std::env::temp_dir().join(format!("wirestub-outside-{:x}", crate::rng::next_u64()));
            std::fs::create_dir_all(&outside).unwrap();
            std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
            assert!(write(&root, "link/x.proto", b"x").unwrap_err().contains("symbolic link"));
            assert!(!outside.join("x.proto").exists());
            std::fs::remove_dir_all(&outside).unwrap();
        }
        std::fs::remove_dir_all(&root).unwrap();
    }
}
