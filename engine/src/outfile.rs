//! Output files: written to a temporary file in the same directory and renamed into place
//! on success, so a failure (a full disk, a crash) leaves the previous file as it was and
//! never half a file; and never written over an input of the same command.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The temporary file beside `path` that [`write_atomically`] writes first: hidden, keeping
/// the extension (some writers choose the format from it), and created here, empty, under
/// a name no one could have guessed (`create_new`: never through a link someone planted
/// in a shared folder, which the writer's own open would follow).
fn temporary(path: &Path) -> Result<PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    let mut last = None;
    for _ in 0..16 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let tag = format!(
            "parley-{}-{}-{nanos:08x}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let tmp = path.with_file_name(match path.extension() {
            Some(ext) => format!(".{name}.{tag}.tmp.{}", ext.to_string_lossy()),
            None => format!(".{name}.{tag}.tmp"),
        });
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
        {
            Ok(_) => return Ok(tmp),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(tmp),
            Err(e) => return Err(Error::io(&tmp, e)),
        }
    }
    Err(Error::InvalidInput(format!(
        "no free temporary name beside {} (last tried {})",
        path.display(),
        last.map_or_else(String::new, |p| p.display().to_string())
    )))
}

/// Where an output to `path` goes: `path` itself, or for a symbolic link the file it
/// points to (the link stays a link). An error for a path that names something other than
/// a regular file (a directory, a device such as /dev/full, a FIFO, a socket), which a
/// rename would replace.
fn destination(path: &Path) -> Result<PathBuf> {
    if path.as_os_str().is_empty() || path.file_name().is_none() {
        return Err(Error::InvalidInput(format!(
            "output path `{}` names no file",
            path.display()
        )));
    }
    if path.as_os_str() == "-" {
        return Err(Error::InvalidInput(
            "output `-`: this output is a file, not stdout (write ./- for a file named -)".into(),
        ));
    }
    // Through every link (a dangling chain too: to the file its last link names).
    let mut target = path.to_path_buf();
    for _ in 0..40 {
        let is_link = std::fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_symlink());
        if !is_link {
            break;
        }
        let to = std::fs::read_link(&target).map_err(|e| Error::io(&target, e))?;
        target = target.parent().unwrap_or(Path::new(".")).join(to);
    }
    if let Some(dir) = target.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(Error::InvalidInput(format!(
                "the output {}: its folder {} does not exist",
                path.display(),
                dir.display()
            )));
        }
    }
    match std::fs::metadata(&target) {
        Ok(m) if !m.is_file() => {
            let kind = if m.is_dir() {
                "a directory"
            } else {
                "not a regular file (a device, FIFO or socket)"
            };
            Err(Error::InvalidInput(format!(
                "the output {} is {kind}: outputs are written to regular files",
                path.display()
            )))
        }
        _ => Ok(target),
    }
}

/// Writes `path` through `write`, which is given a temporary path beside it; renames the
/// result into place once `write` succeeded (keeping a previous file's permissions), and
/// removes it otherwise. A symbolic link's target is written, not the link replaced.
pub fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let target = destination(path)?;
    let previous = std::fs::metadata(&target).ok().map(|m| m.permissions());
    let tmp = temporary(&target)?;
    let r = write(&tmp)
        .and_then(|()| match previous {
            Some(p) => std::fs::set_permissions(&tmp, p).map_err(|e| Error::io(&tmp, e)),
            None => Ok(()),
        })
        .and_then(|()| std::fs::rename(&tmp, &target).map_err(|e| Error::io(path, e)));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Every file `input` stands for: itself, or for a directory (a model directory) the
/// files in it.
fn files_of(input: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(input) {
        Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(_) => vec![input.to_path_buf()],
    }
}

/// An error when an output is one of the inputs (the same file by any path, or a file of
/// an input directory) or two outputs are the same file: the command would destroy what
/// it is made from, or write one output over another. Checked before any work.
pub fn check_outputs(outputs: &[&Path], inputs: &[&Path]) -> Result<()> {
    let canonical = |p: &Path| std::fs::canonicalize(p).ok();
    for (i, out) in outputs.iter().enumerate() {
        destination(out)?;
        if let Some(o) = canonical(out) {
            for input in inputs {
                for f in files_of(input) {
                    if canonical(&f).as_ref() == Some(&o) {
                        return Err(Error::InvalidInput(format!(
                            "the output {} is the input {}: choose another output path",
                            out.display(),
                            f.display()
                        )));
                    }
                }
            }
        }
        // Where each output really goes (through links, whether there yet or not), with
        // its folder resolved.
        let resolved = |p: &Path| -> Option<PathBuf> {
            let d = destination(p).ok()?;
            let dir = d.parent().filter(|d| !d.as_os_str().is_empty());
            dir.map_or(std::env::current_dir().ok(), canonical)
                .map(|dir| dir.join(d.file_name().unwrap_or_default()))
        };
        for other in &outputs[..i] {
            let same = resolved(out).is_some() && resolved(out) == resolved(other);
            if same {
                return Err(Error::InvalidInput(format!(
                    "two outputs are the same file, {}: give each its own path",
                    out.display()
                )));
            }
        }
    }
    Ok(())
}

/// An error when `out` is `input` (the same file by any path): the output would destroy
/// what it is made from.
pub fn refuse_overwriting(out: &Path, input: &Path) -> Result<()> {
    check_outputs(&[out], &[input])
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

    /// Outputs never replace what is not a regular file, follow symbolic links, keep a
    /// previous file's permissions, and are refused when they are an input's file or each
    /// other.
    #[cfg(unix)]
    #[test]
    fn special_files_links_permissions_and_inputs() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("parley-outfile2-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let write = |p: &Path, bytes: &'static [u8]| {
            write_atomically(p, |tmp| {
                std::fs::write(tmp, bytes).map_err(|e| Error::io(tmp, e))
            })
        };
        // A device (what /dev/full would have become), a directory, a FIFO, `-`.
        let err = write(Path::new("/dev/null"), b"x")
            .expect_err("device")
            .to_string();
        assert!(err.contains("not a regular file"), "{err}");
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::metadata("/dev/null")
            .expect("null")
            .file_type()
            .is_char_device());
        let err = write(&dir, b"x").expect_err("dir").to_string();
        assert!(err.contains("a directory"), "{err}");
        let fifo = dir.join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            let err = write(&fifo, b"x").expect_err("fifo").to_string();
            assert!(err.contains("not a regular file"), "{err}");
            assert!(!std::fs::metadata(&fifo).expect("fifo").is_file());
        }
        assert!(write(Path::new("-"), b"x").is_err());

        // A link: its target is written and it stays a link.
        let target = dir.join("target.npy");
        std::fs::write(&target, b"old").expect("target");
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let link = dir.join("link.npy");
        std::os::unix::fs::symlink("target.npy", &link).expect("link");
        write(&link, b"new").expect("through the link");
        assert!(std::fs::symlink_metadata(&link)
            .expect("meta")
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&target).expect("read"), b"new");
        let mode = std::fs::metadata(&target)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "permissions kept");
        // A dangling chain of links: the file its last link names is made.
        std::os::unix::fs::symlink("missing.npy", dir.join("l1.npy")).expect("l1");
        std::os::unix::fs::symlink("l1.npy", dir.join("l2.npy")).expect("l2");
        write(&dir.join("l2.npy"), b"chain").expect("through the chain");
        assert_eq!(
            std::fs::read(dir.join("missing.npy")).expect("made"),
            b"chain"
        );
        for l in ["l1.npy", "l2.npy"] {
            let m = std::fs::symlink_metadata(dir.join(l)).expect("meta");
            assert!(m.file_type().is_symlink(), "{l} stays a link");
        }
        // Two outputs through links to one file are the same output.
        let err = check_outputs(&[&dir.join("l2.npy"), &dir.join("missing.npy")], &[])
            .expect_err("one file")
            .to_string();
        assert!(err.contains("two outputs"), "{err}");

        // An output that is a file of an input directory, or the same as another output.
        let model = dir.join("model");
        std::fs::create_dir_all(&model).expect("model");
        std::fs::write(model.join("voice.safetensors"), b"v").expect("voice");
        let err = check_outputs(&[&model.join("voice.safetensors")], &[&model])
            .expect_err("input file")
            .to_string();
        assert!(err.contains("is the input"), "{err}");
        assert!(check_outputs(&[&model.join("new.wav")], &[&model]).is_ok());
        let a = dir.join("a.wav");
        let err = check_outputs(&[&a, &dir.join(".").join("a.wav")], &[])
            .expect_err("same outputs")
            .to_string();
        assert!(err.contains("two outputs"), "{err}");
        assert!(check_outputs(&[&a, &dir.join("b.npy")], &[]).is_ok());
        std::fs::remove_dir_all(&dir).ok();
    }
}
