//! The Hugging Face cache layout, shared with `huggingface_hub` (Python) and `hf-hub`
//! (Rust), so a model pulled by one is found by the others:
//!
//! ```text
//! <cache>/models--owner--name/
//!     blobs/<etag>                  file contents, named by the Hub's ETag (sha256 for LFS files)
//!     blobs/<etag>.part             a download in progress (hf-hub's name), resumed with HTTP Range
//!     refs/<revision>               the commit a branch or tag pointed at
//!     snapshots/<commit>/<file>     relative symlinks into blobs/: a directory laid out like the repo
//!     .parley-downloads.json        Parley's record of each file's ETag and size per revision
//! ```
//!
//! The record lets [`super::Hub::status`] find a partial download without the network:
//! its blob name is the ETag, which only the Hub knows.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Suffix of a download in progress, as hf-hub names it (so either can resume the other's).
const PART_SUFFIX: &str = "part";
const RECORD_NAME: &str = ".parley-downloads.json";

/// What the Hub said about one file at one revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FileRecord {
    pub etag: String,
    pub size: u64,
}

/// Per revision: the commit it resolved to and its files' records.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct RevisionRecord {
    pub commit: String,
    pub files: BTreeMap<String, FileRecord>,
}

/// One repository's folder in the cache.
#[derive(Debug, Clone)]
pub(crate) struct RepoCache {
    cache: hf_hub::Cache,
    repo: hf_hub::Repo,
    dir: PathBuf,
}

/// Whether `s` is a full commit hash (then it needs no ref).
pub(crate) fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl RepoCache {
    pub fn new(cache_dir: &Path, repo_id: &str, revision: &str) -> Self {
        let cache = hf_hub::Cache::new(cache_dir.to_path_buf());
        let repo = hf_hub::Repo::with_revision(
            repo_id.to_string(),
            hf_hub::RepoType::Model,
            revision.to_string(),
        );
        let dir = cache_dir.join(repo.folder_name());
        Self { cache, repo, dir }
    }

    #[cfg(test)]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn blobs_dir(&self) -> PathBuf {
        self.dir.join("blobs")
    }

    pub fn blob(&self, etag: &str) -> PathBuf {
        self.blobs_dir().join(etag)
    }

    pub fn partial(&self, etag: &str) -> PathBuf {
        self.blobs_dir().join(format!("{etag}.{PART_SUFFIX}"))
    }

    pub fn lock_file(&self, etag: &str) -> PathBuf {
        self.blobs_dir().join(format!("{etag}.lock"))
    }

    pub fn snapshot_dir(&self, commit: &str) -> PathBuf {
        self.dir.join("snapshots").join(commit)
    }

    /// The commit this revision points at locally: the revision itself when it is a
    /// commit hash, else what `refs/<revision>` says; `None` before any download.
    pub fn local_commit(&self) -> Option<String> {
        let revision = self.repo.revision();
        if is_commit_hash(revision) {
            return Some(revision.to_string());
        }
        let text = std::fs::read_to_string(self.dir.join("refs").join(revision)).ok()?;
        // Only a commit hash becomes a path component (not `../..` from an edited ref).
        let commit = text.trim();
        is_commit_hash(commit).then(|| commit.to_string())
    }

    /// The snapshot's copy of `file` when present (a symlink resolving to a file, or a
    /// file), as `hf-hub`'s cache lookup finds it.
    pub fn snapshot_file(&self, file: &str) -> Option<PathBuf> {
        let path = match self.cache.repo(self.repo.clone()).get(file) {
            Some(p) => p,
            // A commit-hash revision has no ref to follow.
            None => self.snapshot_dir(&self.local_commit()?).join(file),
        };
        path.is_file().then_some(path)
    }

    /// Points `refs/<revision>` at `commit` (not for commit-hash revisions, as Python's
    /// `huggingface_hub` does).
    pub fn write_ref(&self, commit: &str) -> Result<()> {
        if self.repo.revision() == commit {
            return Ok(());
        }
        let path = self.dir.join("refs").join(self.repo.revision());
        self.cache
            .repo(self.repo.clone())
            .create_ref(commit)
            .map_err(|e| Error::io(path, e))
    }

    /// Makes `snapshots/<commit>/<file>` a relative symlink to `blobs/<etag>` (replacing
    /// a stale one); where symlinks are not available, a hard link or a copy.
    pub fn link(&self, commit: &str, file: &str, etag: &str) -> Result<PathBuf> {
        let pointer = self.snapshot_dir(commit).join(file);
        let parent = pointer.parent().unwrap_or(&self.dir).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        if std::fs::symlink_metadata(&pointer).is_ok() {
            if pointer.is_file() && same_target(&pointer, &self.blob(etag)) {
                return Ok(pointer);
            }
            std::fs::remove_file(&pointer).map_err(|e| Error::io(&pointer, e))?;
        }
        // snapshots/<commit>/<a>/<b> -> ../../../blobs/<etag>
        let depth = file.split('/').count() + 1;
        let target = PathBuf::from("../".repeat(depth)).join("blobs").join(etag);
        make_link(&target, &self.blob(etag), &pointer).map_err(|e| Error::io(&pointer, e))?;
        Ok(pointer)
    }

    fn record_path(&self) -> PathBuf {
        self.dir.join(RECORD_NAME)
    }

    /// Parley's record for this revision (empty when none or unreadable: it is a hint).
    pub fn record(&self) -> RevisionRecord {
        let mut record = self
            .all_records()
            .remove(self.repo.revision())
            .unwrap_or_default();
        // An entry whose ETag is not a hash (an edited file) would name a path: dropped,
        // so the file is looked up on the Hub again.
        record
            .files
            .retain(|_, f| super::integrity::check_etag(&f.etag).is_ok());
        record
    }

    fn all_records(&self) -> BTreeMap<String, RevisionRecord> {
        std::fs::read_to_string(self.record_path())
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default()
    }

    /// Stores the record for this revision, atomically (write then rename).
    pub fn save_record(&self, record: &RevisionRecord) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let mut all = self.all_records();
        all.insert(self.repo.revision().to_string(), record.clone());
        let path = self.record_path();
        let tmp = self
            .dir
            .join(format!("{RECORD_NAME}.{}.tmp", std::process::id()));
        let text = serde_json::to_string_pretty(&all).map_err(|e| Error::config(&path, e))?;
        std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
    }
}

fn same_target(pointer: &Path, blob: &Path) -> bool {
    match (pointer.canonicalize(), blob.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(unix)]
fn make_link(relative_target: &Path, _blob: &Path, pointer: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(relative_target, pointer)
}

#[cfg(not(unix))]
fn make_link(relative_target: &Path, blob: &Path, pointer: &Path) -> std::io::Result<()> {
    // Windows without developer mode cannot make symlinks: a hard link keeps one copy on
    // disk; a copy is the last resort (other filesystems).
    #[cfg(windows)]
    if std::os::windows::fs::symlink_file(relative_target, pointer).is_ok() {
        return Ok(());
    }
    let _ = relative_target;
    std::fs::hard_link(blob, pointer).or_else(|_| std::fs::copy(blob, pointer).map(|_| ()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("parley-cache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn layout_matches_the_hugging_face_cache() {
        let root = tmp("layout");
        let cache = RepoCache::new(&root, "kyutai/stt-1b-en_fr", "main");
        assert_eq!(cache.dir(), root.join("models--kyutai--stt-1b-en_fr"));
        assert_eq!(
            cache.partial("abc"),
            root.join("models--kyutai--stt-1b-en_fr/blobs/abc.part")
        );
        assert_eq!(cache.local_commit(), None);
        let commit = "0123456789abcdef0123456789abcdef01234567";
        cache.write_ref(commit).expect("ref");
        assert_eq!(cache.local_commit().as_deref(), Some(commit));
        cache.write_ref("../../../etc").expect("ref");
        assert_eq!(
            cache.local_commit(),
            None,
            "a ref that is not a commit hash"
        );
        cache.write_ref(commit).expect("ref");

        std::fs::create_dir_all(cache.blobs_dir()).expect("blobs");
        std::fs::write(cache.blob("e1"), b"hello").expect("blob");
        let p = cache.link(commit, "sub/dir/f.bin", "e1").expect("link");
        assert_eq!(std::fs::read(&p).expect("read"), b"hello");
        assert_eq!(cache.snapshot_file("sub/dir/f.bin"), Some(p.clone()));
        // Relinking to another blob replaces the pointer.
        std::fs::write(cache.blob("e2"), b"world").expect("blob");
        cache.link(commit, "sub/dir/f.bin", "e2").expect("relink");
        assert_eq!(std::fs::read(&p).expect("read"), b"world");
        // A pointer whose blob is gone is not a present file.
        std::fs::remove_file(cache.blob("e2")).expect("rm");
        assert_eq!(cache.snapshot_file("sub/dir/f.bin"), None);

        // A commit-hash revision needs no ref.
        let pinned = RepoCache::new(&root, "kyutai/stt-1b-en_fr", commit);
        assert_eq!(pinned.local_commit().as_deref(), Some(commit));
        std::fs::write(cache.blob("e3"), b"x").expect("blob");
        cache.link(commit, "g", "e3").expect("link");
        assert!(pinned.snapshot_file("g").is_some());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn records_are_kept_per_revision() {
        let root = tmp("record");
        let main = RepoCache::new(&root, "a/b", "main");
        let other = RepoCache::new(&root, "a/b", "v2");
        assert!(main.record().files.is_empty());
        let mut rec = RevisionRecord {
            commit: "c1".into(),
            ..Default::default()
        };
        rec.files.insert(
            "model.safetensors".into(),
            FileRecord {
                etag: "e".repeat(64),
                size: 7,
            },
        );
        // An entry edited to name a path is not taken.
        rec.files.insert(
            "config.json".into(),
            FileRecord {
                etag: "../../escape".into(),
                size: 3,
            },
        );
        main.save_record(&rec).expect("save");
        assert!(!main.record().files.contains_key("config.json"));
        other
            .save_record(&RevisionRecord {
                commit: "c2".into(),
                ..Default::default()
            })
            .expect("save");
        assert_eq!(main.record().commit, "c1");
        assert_eq!(main.record().files["model.safetensors"].size, 7);
        assert_eq!(other.record().commit, "c2");
        let _ = std::fs::remove_dir_all(&root);
    }
}
