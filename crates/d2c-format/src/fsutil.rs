//! File-system habits shared by every writer: atomic replace, never clobber an input.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// True when `a` and `b` name the same existing file (hard links and symlinks included).
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Refuses an output path that is one of the inputs: a crash mid-write must never cost a user
/// the adapter they started from.
pub fn check_not_input(out: &Path, inputs: &[&Path]) -> Result<()> {
    for input in inputs {
        if same_file(out, input) {
            return Err(Error::Usage(format!("refusing to write {}: it is an input of this command (choose another output path)", out.display())));
        }
    }
    Ok(())
}

/// The directory a file at `path` lives in (`.` for a bare file name): where its temporary
/// sibling is created, so that the final rename stays on one filesystem.
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A file being written to a temporary name beside its destination: nothing appears at the
/// destination until [`StagedFile::commit`], and dropping it uncommitted removes it. Writers
/// that must check several outputs before publishing any (`convert --peft-dir`) stage them all
/// first.
pub struct StagedFile {
    tmp: tempfile::NamedTempFile,
    dest: PathBuf,
}

impl StagedFile {
    /// Refuses a destination that is one of `inputs`.
    pub fn create(dest: &Path, inputs: &[&Path]) -> Result<Self> {
        check_not_input(dest, inputs)?;
        let dir = parent_dir(dest);
        let tmp = tempfile::Builder::new().prefix(".d2c-").suffix(".tmp").tempfile_in(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(StagedFile { tmp, dest: dest.to_path_buf() })
    }

    pub fn file_mut(&mut self) -> &mut File {
        self.tmp.as_file_mut()
    }

    /// Where the bytes are until the commit (for checks that read the file back).
    pub fn staged_path(&self) -> &Path {
        self.tmp.path()
    }

    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Syncs the file and renames it into place.
    pub fn commit(self) -> Result<()> {
        let dest = &self.dest;
        // Temporary files are created owner-only; what we publish must be readable by a
        // llama-server running as another user, like any file the user's umask allows.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            self.tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644)).map_err(|e| Error::io(dest, e))?;
        }
        self.tmp.as_file().sync_all().map_err(|e| Error::io(dest, e))?;
        self.tmp.persist(dest).map_err(|e| Error::io(dest, e.error))?;
        Ok(())
    }
}

/// Writes `path` through a temporary file in the same directory, synced, then renamed into place.
pub fn write_atomic<T>(path: &Path, inputs: &[&Path], write: impl FnOnce(&mut File) -> io::Result<T>) -> Result<T> {
    let mut staged = StagedFile::create(path, inputs)?;
    let value = write(staged.file_mut()).map_err(|e| Error::io(path, e))?;
    staged.commit()?;
    Ok(value)
}

/// Reads a whole file that is parsed in memory, refusing one larger than `cap` bytes before
/// allocating for it (and if it grows past `cap` while being read). `field` names the kind of
/// file in the error, e.g. "adapter_config.json size".
pub fn read_capped(path: &Path, cap: u64, field: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let too_big =
        |n: u64| Error::Format { path: path.to_path_buf(), field: field.to_string(), reason: format!("{n} bytes exceeds the limit of {cap} bytes") };
    if len > cap {
        return Err(too_big(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(cap + 1).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > cap {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}
