//! Where durable groups keep their state between starts: a file per group beside the embedded
//! log, or a row per group in PostgreSQL (written on the connection that holds the groups'
//! leadership, so a replica that lost it can no longer overwrite its successor's state).

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::state::Saved;
use crate::log::LogError;

#[async_trait]
pub trait Saving: Send + Sync + 'static {
    /// Every saved group.
    async fn load(&self) -> Result<Vec<(String, Saved)>, LogError>;
    /// Replaces the saved state of each group given, durably, all or none.
    async fn save(&self, changed: Vec<(String, Saved)>) -> Result<(), LogError>;
    /// Forgets group `name`.
    async fn remove(&self, name: &str) -> Result<(), LogError>;
}

/// `<dir>/<name>.json`, each replaced atomically and durably.
pub struct Files {
    dir: PathBuf,
}

impl Files {
    pub fn new(dir: PathBuf) -> Files {
        Files { dir }
    }
}

fn decode(path: &Path, bytes: &[u8]) -> Result<Saved, LogError> {
    serde_json::from_slice(bytes).map_err(|err| LogError::Corrupt {
        path: path.to_owned(),
        offset: 0,
        cause: err.to_string(),
    })
}

#[async_trait]
impl Saving for Files {
    async fn load(&self) -> Result<Vec<(String, Saved)>, LogError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|err| LogError::io(&dir, err))?;
            let mut all = Vec::new();
            for entry in std::fs::read_dir(&dir).map_err(|err| LogError::io(&dir, err))? {
                let path = entry.map_err(|err| LogError::io(&dir, err))?.path();
                let Some(name) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".json"))
                else {
                    continue;
                };
                let bytes = std::fs::read(&path).map_err(|err| LogError::io(&path, err))?;
                all.push((name.to_owned(), decode(&path, &bytes)?));
            }
            Ok(all)
        })
        .await
        .map_err(|_| LogError::Failed)?
    }

    async fn save(&self, changed: Vec<(String, Saved)>) -> Result<(), LogError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            for (name, saved) in &changed {
                write_file(&dir, name, saved)?;
            }
            Ok(())
        })
        .await
        .map_err(|_| LogError::Failed)?
    }

    async fn remove(&self, name: &str) -> Result<(), LogError> {
        let path = self.dir.join(format!("{name}.json"));
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || match std::fs::remove_file(&path) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(LogError::io(&dir, err)),
            _ => Ok(()),
        })
        .await
        .map_err(|_| LogError::Failed)?
    }
}

/// Replaces `<dir>/<name>.json` atomically and durably.
fn write_file(dir: &Path, name: &str, saved: &Saved) -> Result<(), LogError> {
    use std::io::Write;
    let path = dir.join(format!("{name}.json"));
    let tmp = dir.join(format!("{name}.json.tmp"));
    let text = serde_json::to_vec(saved).map_err(|err| LogError::Invalid(err.to_string()))?;
    let mut file = std::fs::File::create(&tmp).map_err(|err| LogError::io(&tmp, err))?;
    file.write_all(&text)
        .and_then(|()| file.sync_all())
        .map_err(|err| LogError::io(&tmp, err))?;
    std::fs::rename(&tmp, &path).map_err(|err| LogError::io(&path, err))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|err| LogError::io(dir, err))?;
    Ok(())
}

/// Serialized for a database row.
pub fn encode(saved: &Saved) -> Result<Vec<u8>, LogError> {
    serde_json::to_vec(saved).map_err(|err| LogError::Invalid(err.to_string()))
}

/// A database row's state.
pub fn decode_row(name: &str, bytes: &[u8]) -> Result<Saved, LogError> {
    decode(Path::new(name), bytes)
}
