//! Checking downloaded bytes against the Hub's ETag. For LFS files (every checkpoint) the
//! ETag (`X-Linked-Etag`) is the file's sha256; for small files kept in git it is the git
//! blob id, sha1 of `"blob <size>\0"` and the bytes. `huggingface_hub` names blobs by the
//! same values.

use sha1::Sha1;
use sha2::{Digest, Sha256};

/// The running hash of a file being downloaded, chosen from its ETag. Every file is
/// checked: an ETag of another form is refused before anything is downloaded
/// ([`check_etag`]), since the size alone would let any bytes of the right length in.
pub(crate) enum Hasher {
    Sha256(Sha256),
    GitSha1(Sha1),
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `Ok` when `etag` (unquoted) is a hash Parley can check the bytes against; otherwise what
/// was wrong, naming what the server sent.
pub(crate) fn check_etag(etag: &str) -> Result<(), String> {
    if is_hex(etag, 64) || is_hex(etag, 40) {
        Ok(())
    } else {
        let shown: String = etag.chars().take(80).collect();
        Err(format!(
            "the server's ETag `{}`{} is neither a sha256 (64 hex digits, as the Hub gives LFS files) nor a git blob id (40 hex digits): the file's bytes could not be verified, so nothing was downloaded",
            shown.escape_debug(),
            if etag.chars().count() > 80 { "..." } else { "" }
        ))
    }
}

impl Hasher {
    /// A hasher for a file of `size` bytes whose ETag is `etag`, or what is wrong with it.
    pub fn for_etag(etag: &str, size: u64) -> Result<Self, String> {
        check_etag(etag)?;
        if etag.len() == 64 {
            Ok(Self::Sha256(Sha256::new()))
        } else {
            let mut h = Sha1::new();
            h.update(format!("blob {size}\0").as_bytes());
            Ok(Self::GitSha1(h))
        }
    }

    /// Which hash the ETag is, for messages.
    pub fn algorithm(&self) -> &'static str {
        match self {
            Self::Sha256(_) => "sha256",
            Self::GitSha1(_) => "git blob sha1",
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Self::Sha256(h) => h.update(bytes),
            Self::GitSha1(h) => h.update(bytes),
        }
    }

    /// The hex digest.
    pub fn finish(self) -> String {
        let bytes: Vec<u8> = match self {
            Self::Sha256(h) => h.finalize().to_vec(),
            Self::GitSha1(h) => h.finalize().to_vec(),
        };
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(etag: &str, data: &[u8]) -> Option<String> {
        let mut h = Hasher::for_etag(etag, data.len() as u64).ok()?;
        h.update(&data[..data.len() / 2]);
        h.update(&data[data.len() / 2..]);
        Some(h.finish())
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
        assert_eq!(digest(&"g".repeat(64), b"x"), None);
        assert_eq!(digest(&"0".repeat(63), b"x"), None);
        let err = check_etag("\"1a2b-5f3c\"").expect_err("not a hash");
        assert!(
            err.contains("`\\\"1a2b-5f3c\\\"`") && err.contains("verified"),
            "{err}"
        );
    }
}
