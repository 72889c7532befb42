//! The data directory's format version, in `store.format`: the version of the files that carry
//! none of their own (segments, snapshots). A directory without the file was written before
//! versions were recorded (version 0: the layout of version 1). Version 2 records may carry their
//! publisher. Older directories are read as they are and marked with the current version; a
//! directory of a newer version than this build knows is refused, never misread or rewritten.

use std::path::{Path, PathBuf};

use super::{LogError, segments};

/// The format this build writes. 2: records may carry their publisher (`source`), which an older
/// build would misread.
pub const VERSION: u32 = 2;
/// The oldest format this build reads.
pub const OLDEST: u32 = 0;

const NAME: &str = "store.format";

fn path_of(dir: &Path) -> PathBuf {
    dir.join(NAME)
}

/// Refuses a directory this build cannot read; records the current version in one it can.
pub fn check_and_mark(dir: &Path) -> Result<(), LogError> {
    let path = path_of(dir);
    let found = match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .strip_prefix("eventbus-store ")
            .and_then(|v| v.parse::<u32>().ok())
            .ok_or_else(|| LogError::Corrupt {
                path: path.clone(),
                offset: 0,
                cause: format!("not a format version: {:?}", text.trim()),
            })?,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => OLDEST,
        Err(err) => return Err(LogError::io(&path, err)),
    };
    if found > VERSION {
        return Err(LogError::Invalid(format!(
            "{} holds store format {found}, newer than this build reads ({OLDEST}-{VERSION}); run a newer eventbus",
            dir.display()
        )));
    }
    if found == VERSION && path.exists() {
        return Ok(());
    }
    segments::replace_durably(dir, NAME, format!("eventbus-store {VERSION}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_old_directories_and_refuses_newer_ones() {
        let dir = tempfile::tempdir().unwrap();
        check_and_mark(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(path_of(dir.path())).unwrap(),
            format!("eventbus-store {VERSION}\n")
        );
        check_and_mark(dir.path()).unwrap();
        std::fs::write(path_of(dir.path()), "eventbus-store 99\n").unwrap();
        let err = check_and_mark(dir.path()).unwrap_err().to_string();
        assert!(err.contains("newer than this build"), "{err}");
        std::fs::write(path_of(dir.path()), "garbage").unwrap();
        assert!(check_and_mark(dir.path()).is_err());
    }
}
