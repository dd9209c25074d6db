//! Output files: written to a temporary file in the same directory and renamed into place
//! on success, so a failure (a full disk, a crash) leaves the previous file as it was and
//! never half a file; and never written over an input of the same command.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The temporary file beside `path` that [`write_atomically`] writes first: hidden, named
/// for the process, keeping the extension (some writers choose the format from it).
fn temporary(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    let tmp = match path.extension() {
        Some(ext) => format!(
            ".{}.parley-{}.tmp.{}",
            name,
            std::process::id(),
            ext.to_string_lossy()
        ),
        None => format!(".{name}.parley-{}.tmp", std::process::id()),
    };
    path.with_file_name(tmp)
}

/// Writes `path` through `write`, which is given a temporary path beside it; renames the
/// result into place once `write` succeeded, and removes it otherwise.
pub fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if path.as_os_str().is_empty() || path.file_name().is_none() {
        return Err(Error::InvalidInput(format!(
            "output path `{}` names no file",
            path.display()
        )));
    }
    let tmp = temporary(path);
    let r = write(&tmp).and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// An error when `out` is `input` (the same file by any path): the output would destroy
/// what it is made from.
pub fn refuse_overwriting(out: &Path, input: &Path) -> Result<()> {
    let same = match (std::fs::canonicalize(out), std::fs::canonicalize(input)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return Err(Error::InvalidInput(format!(
            "the output {} is the input file: choose another output path",
            out.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_the_previous_file_and_no_temporary() {
        let dir = std::env::temp_dir().join(format!("parley-outfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let out = dir.join("codes.npy");
        std::fs::write(&out, b"previous").expect("write");
        let err = write_atomically(&out, |tmp| {
            std::fs::write(tmp, b"half").expect("tmp");
            Err(Error::InvalidInput("disk full".into()))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&out).expect("read"), b"previous");
        assert_eq!(
            std::fs::read_dir(&dir).expect("ls").count(),
            1,
            "no temporary left"
        );
        write_atomically(&out, |tmp| {
            assert_eq!(tmp.extension().and_then(|e| e.to_str()), Some("npy"));
            std::fs::write(tmp, b"new").map_err(|e| Error::io(tmp, e))
        })
        .expect("write");
        assert_eq!(std::fs::read(&out).expect("read"), b"new");
        assert!(refuse_overwriting(
            &out,
            &dir.join("../")
                .join(dir.file_name().expect("name"))
                .join("codes.npy")
        )
        .is_err());
        assert!(refuse_overwriting(&dir.join("other.npy"), &out).is_ok());
        std::fs::remove_dir_all(&dir).ok();
    }
}
