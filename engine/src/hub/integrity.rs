//! Checking downloaded bytes against the Hub's ETag. For LFS files (every checkpoint) the
//! ETag (`X-Linked-Etag`) is the file's sha256; for small files kept in git it is the git
//! blob id, sha1 of `"blob <size>\0"` and the bytes. `huggingface_hub` names blobs by the
//! same values.

use sha1::Sha1;
use sha2::{Digest, Sha256};

/// The running hash of a file being downloaded, chosen from its ETag.
pub(crate) enum Hasher {
    Sha256(Sha256),
    GitSha1(Sha1),
    /// An ETag of another form: only the size can be checked.
    None,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Hasher {
    /// A hasher for a file of `size` bytes whose ETag is `etag`.
    pub fn for_etag(etag: &str, size: u64) -> Self {
        if is_hex(etag, 64) {
            Self::Sha256(Sha256::new())
        } else if is_hex(etag, 40) {
            let mut h = Sha1::new();
            h.update(format!("blob {size}\0").as_bytes());
            Self::GitSha1(h)
        } else {
            Self::None
        }
    }

    /// Which hash the ETag is, for messages.
    pub fn algorithm(&self) -> &'static str {
        match self {
            Self::Sha256(_) => "sha256",
            Self::GitSha1(_) => "git blob sha1",
            Self::None => "none",
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Self::Sha256(h) => h.update(bytes),
            Self::GitSha1(h) => h.update(bytes),
            Self::None => {}
        }
    }

    /// The hex digest, or `None` when the ETag gave nothing to check.
    pub fn finish(self) -> Option<String> {
        let bytes: Vec<u8> = match self {
            Self::Sha256(h) => h.finalize().to_vec(),
            Self::GitSha1(h) => h.finalize().to_vec(),
            Self::None => return None,
        };
        Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(etag: &str, data: &[u8]) -> Option<String> {
        let mut h = Hasher::for_etag(etag, data.len() as u64);
        h.update(&data[..data.len() / 2]);
        h.update(&data[data.len() / 2..]);
        h.finish()
    }

    #[test]
    fn sha256_and_git_blob_ids() {
        let sha256_etag = "0".repeat(64);
        assert_eq!(
            digest(&sha256_etag, b"hello\n").as_deref(),
            Some("5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03")
        );
        // `git hash-object` of a file holding "hello\n".
        let git_etag = "0".repeat(40);
        assert_eq!(
            digest(&git_etag, b"hello\n").as_deref(),
            Some("ce013625030ba8dba906f756967f9e9ca394464a")
        );
        assert_eq!(digest("W/\"abc\"", b"x"), None);
    }
}
