//! The agent's files: a private data directory and atomic writes.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Creates `dir` if needed and makes it 0700: it holds the node's key.
pub fn ensure_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| dir.display().to_string())
}

/// Writes `bytes` to `path` with `mode`: to a temporary file beside it,
/// synced, then renamed over `path`, so a reader (or a restart after a
/// crash) sees the old content or the new, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp: PathBuf = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| tmp.display().to_string())?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| tmp.display().to_string())?;
    std::fs::rename(&tmp, path).with_context(|| path.display().to_string())?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        // The rename is durable once the directory is.
        let _ = d.sync_all();
    }
    Ok(())
}
