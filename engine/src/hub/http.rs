//! Talking to the Hub: a file's metadata (HEAD) and its bytes (GET, from an offset).
//!
//! URLs come from `hf-hub` (`ApiRepo::url`: `{endpoint}/{repo}/resolve/{revision}/{file}`);
//! the requests are made here with `ureq` (the client `hf-hub`'s blocking API uses). Why
//! not `hf-hub`'s own `download_with_progress`: it cannot be cancelled mid-file, sets no
//! read timeout (a stalled connection hangs for ever), appends whatever a resumed request
//! returns without checking for `206 Partial Content` (a server that ignores `Range`
//! would corrupt the file), never checks the bytes against the ETag, keeps the ETag and
//! size to itself (so a partial download cannot be reported), and panics on some
//! malformed answers. Its on-disk conventions are kept (blob and `.part` names, refs,
//! snapshots), so it and Parley resume each other's downloads.

use std::io::Read;
use std::time::Duration;

use crate::{Error, Result};

/// What the Hub says about a file at a revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Remote {
    /// The commit the revision resolved to (`X-Repo-Commit`).
    pub commit: String,
    /// `X-Linked-Etag` (LFS: the sha256) or `ETag` (git: the blob id), unquoted.
    pub etag: String,
    /// `X-Linked-Size` or `Content-Length`.
    pub size: u64,
}

/// A response body positioned at byte `start` of the file.
pub(crate) struct Body {
    /// Where the body begins: the offset asked for when the server honoured `Range`, 0
    /// when it sent the whole file.
    pub start: u64,
    pub reader: Box<dyn Read + Send + Sync + 'static>,
}

/// Where a request was going, for messages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target<'a> {
    pub repo: &'a str,
    pub file: &'a str,
}

impl Target<'_> {
    pub fn label(&self) -> String {
        format!("{}/{}", self.repo, self.file)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Client {
    endpoint: String,
    token: Option<String>,
    /// No redirects: metadata is read from the Hub's own answer (its redirect to the CDN
    /// carries `X-Linked-Etag` and `X-Linked-Size`).
    head: ureq::Agent,
    /// Follows redirects (to the CDN); `ureq` drops `Authorization` on redirects.
    get: ureq::Agent,
    api: hf_hub::api::sync::Api,
}

const USER_AGENT: &str = concat!("parley/", env!("CARGO_PKG_VERSION"), "; hf-hub/0.4");

impl Client {
    pub fn new(
        endpoint: &str,
        token: Option<String>,
        cache_dir: &std::path::Path,
        connect_timeout: Duration,
        read_timeout: Duration,
    ) -> Result<Self> {
        let endpoint = endpoint.trim_end_matches('/').to_string();
        let api =
            hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(cache_dir.to_path_buf()))
                .with_endpoint(endpoint.clone())
                .with_token(token.clone())
                .with_progress(false)
                .build()
                .map_err(|e| Error::Download {
                    file: endpoint.clone(),
                    reason: format!("cannot set up the HTTP client: {e}"),
                })?;
        // HTTP(S)_PROXY applies, except to a mirror on this machine.
        let use_proxy = !is_loopback(&endpoint);
        let builder = || {
            ureq::AgentBuilder::new()
                .try_proxy_from_env(use_proxy)
                .user_agent(USER_AGENT)
                .timeout_connect(connect_timeout)
                .timeout_read(read_timeout)
                .timeout_write(read_timeout)
        };
        Ok(Self {
            endpoint,
            token,
            head: builder().redirects(0).build(),
            get: builder().redirects(8).build(),
            api,
        })
    }

    /// The file's download URL at `revision`.
    pub fn url(&self, repo: &str, revision: &str, file: &str) -> String {
        self.api
            .repo(hf_hub::Repo::with_revision(
                repo.to_string(),
                hf_hub::RepoType::Model,
                revision.to_string(),
            ))
            .url(file)
    }

    fn request(&self, agent: &ureq::Agent, method: &str, url: &str) -> ureq::Request {
        let mut req = agent
            .request(method, url)
            // Sizes and hashes are of the stored bytes: no transparent gzip.
            .set("Accept-Encoding", "identity");
        if let Some(token) = &self.token {
            req = req.set("Authorization", &format!("Bearer {token}"));
        }
        req
    }

    /// HEAD the file, following the Hub's relative redirects (renamed repositories,
    /// `resolve-cache`) but not the absolute one to the CDN, whose answer lacks the
    /// Hub's headers.
    pub fn metadata(&self, target: Target<'_>, revision: &str) -> Result<Remote> {
        let mut url = self.url(target.repo, revision, target.file);
        // The commit as the first answer of the chain gave it, should a later one lack it.
        let mut commit_seen: Option<String> = None;
        for _ in 0..8 {
            let resp = self
                .request(&self.head, "HEAD", &url)
                .call()
                .map_err(|e| self.error(target, &url, e))?;
            if commit_seen.is_none() {
                commit_seen = resp
                    .header("X-Repo-Commit")
                    .map(|c| c.trim().to_string())
                    .filter(|c| !c.is_empty());
            }
            let location = resp.header("Location").map(str::to_string);
            if (300..400).contains(&resp.status()) {
                if let Some(loc) = location.filter(|l| l.starts_with('/')) {
                    url = format!("{}{loc}", origin(&url));
                    continue;
                }
            }
            let fallback = commit_seen.as_deref().unwrap_or(revision);
            return remote_from(|name| resp.header(name), fallback).map_err(|reason| {
                Error::Download {
                    file: target.label(),
                    reason: format!("{url}: {reason}"),
                }
            });
        }
        Err(Error::Download {
            file: target.label(),
            reason: format!("{url}: too many redirects"),
        })
    }

    /// GETs the file from byte `start` (the whole file when 0), checking that the answer
    /// is what was asked for: `206` from `start` of a `size`-byte file, or `200` with the
    /// whole file.
    pub fn open(&self, target: Target<'_>, url: &str, start: u64, size: u64) -> Result<Body> {
        let mut req = self.request(&self.get, "GET", url);
        if start > 0 {
            req = req.set("Range", &format!("bytes={start}-"));
        }
        let resp = req.call().map_err(|e| self.error(target, url, e))?;
        let bad = |reason: String| Error::Download {
            file: target.label(),
            reason: format!("{url}: {reason}"),
        };
        let length = resp
            .header("Content-Length")
            .and_then(|v| v.trim().parse::<u64>().ok());
        match resp.status() {
            206 => {
                let range = resp.header("Content-Range").unwrap_or_default().to_string();
                let (from, total) = parse_content_range(&range)
                    .ok_or_else(|| bad(format!("206 with a bad Content-Range `{range}`")))?;
                if from != start {
                    return Err(bad(format!(
                        "asked for bytes from {start}, the server sent from {from}"
                    )));
                }
                if total != size {
                    return Err(bad(format!(
                        "the file is {total} bytes now, {size} when the download started: it changed on the Hub; pull again"
                    )));
                }
                if length.is_some_and(|n| n != size - start) {
                    return Err(bad(format!(
                        "Content-Length {length:?} does not match the {} bytes left",
                        size - start
                    )));
                }
                Ok(Body {
                    start,
                    reader: resp.into_reader(),
                })
            }
            200 => {
                if length.is_some_and(|n| n != size) {
                    return Err(bad(format!(
                        "Content-Length {length:?} does not match the Hub's size {size}"
                    )));
                }
                Ok(Body {
                    start: 0,
                    reader: resp.into_reader(),
                })
            }
            other => Err(bad(format!("unexpected HTTP {other}"))),
        }
    }

    /// Turns a `ureq` error into the engine's: unreachable, an HTTP status, or a failed
    /// transfer.
    pub fn error(&self, target: Target<'_>, url: &str, e: ureq::Error) -> Error {
        match e {
            ureq::Error::Status(status, resp) => {
                let code = resp.header("X-Error-Code").unwrap_or_default().to_string();
                let message = resp
                    .header("X-Error-Message")
                    .unwrap_or_default()
                    .to_string();
                Error::HubHttp {
                    repo: target.repo.to_string(),
                    file: target.file.to_string(),
                    url: url.to_string(),
                    status,
                    reason: explain_status(status, &code, &message),
                }
            }
            ureq::Error::Transport(t) => match t.kind() {
                ureq::ErrorKind::Dns
                | ureq::ErrorKind::ConnectionFailed
                | ureq::ErrorKind::ProxyConnect => Error::HubUnreachable {
                    repo: target.repo.to_string(),
                    file: target.file.to_string(),
                    endpoint: self.endpoint.clone(),
                    reason: t.to_string(),
                },
                _ => Error::Download {
                    file: target.label(),
                    reason: format!("{url}: {t}"),
                },
            },
        }
    }
}

/// Whether the URL's host is this machine.
fn is_loopback(url: &str) -> bool {
    let host = origin(url)
        .split("://")
        .nth(1)
        .unwrap_or_default()
        .rsplit('@')
        .next()
        .unwrap_or_default();
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.split(':').next().unwrap_or_default(),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `scheme://host[:port]` of an absolute URL.
fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => &url[..after_scheme + i],
        None => url,
    }
}

fn unquote(etag: &str) -> String {
    etag.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

/// The metadata in a HEAD answer, whose headers `header` gives; `fallback` is the commit to
/// use when the answer names none (a commit-hash revision, or one an earlier answer of the
/// redirect chain gave).
fn remote_from<'a>(
    header: impl Fn(&str) -> Option<&'a str>,
    fallback: &str,
) -> std::result::Result<Remote, String> {
    let number = |name: &str| header(name).and_then(|v| v.trim().parse::<u64>().ok());
    let etag = header("X-Linked-Etag")
        .or_else(|| header("ETag"))
        .map(unquote)
        .ok_or("the Hub's answer has no ETag")?;
    // Also what keeps a hostile ETag (`../x`) out of the blob's path.
    super::integrity::check_etag(&etag)?;
    let size = number("X-Linked-Size")
        .or_else(|| number("Content-Length"))
        .ok_or("the Hub's answer has no size (X-Linked-Size or Content-Length)")?;
    let commit = match header("X-Repo-Commit") {
        Some(c) if !c.trim().is_empty() => c.trim().to_string(),
        _ if super::cache::is_commit_hash(fallback) => fallback.to_string(),
        _ => return Err("the Hub's answer has no X-Repo-Commit".into()),
    };
    if !super::cache::is_commit_hash(&commit) {
        return Err(format!(
            "the Hub's X-Repo-Commit `{}` is not a commit hash (40 hex digits)",
            commit.chars().take(80).collect::<String>().escape_debug()
        ));
    }
    Ok(Remote { commit, etag, size })
}

/// `bytes 10-99/100` -> (10, 100).
fn parse_content_range(v: &str) -> Option<(u64, u64)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (from, _to) = range.split_once('-')?;
    Some((from.trim().parse().ok()?, total.trim().parse().ok()?))
}

fn explain_status(status: u16, code: &str, message: &str) -> String {
    let what = match (status, code) {
        (404, "RepoNotFound") => "no such repository (or it is private: set HF_TOKEN)".into(),
        (404, "RevisionNotFound") => "no such revision in the repository".into(),
        (404, "EntryNotFound") => "no such file in the repository at this revision".into(),
        (404, _) => "not found (no such repository, revision or file)".into(),
        (401, _) => "authentication required: the repository is private or gated, or does not \
            exist; log in with `huggingface-cli login` or set HF_TOKEN"
            .into(),
        (403, _) => "access denied: the repository is gated; accept its conditions on the Hub \
            with your account and set HF_TOKEN"
            .into(),
        (429, _) => "rate limited by the Hub; wait and pull again".into(),
        (s, _) if s >= 500 => "the Hub had a server error; pull again later".into(),
        (s, _) => format!("HTTP {s}"),
    };
    if message.is_empty() {
        what
    } else {
        format!("{what} ({message})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(
            origin("http://127.0.0.1:8080/a/b?c"),
            "http://127.0.0.1:8080"
        );
        assert_eq!(origin("https://huggingface.co"), "https://huggingface.co");
        assert!(is_loopback("http://127.0.0.1:8080"));
        assert!(is_loopback("http://localhost/x"));
        assert!(is_loopback("http://[::1]:9"));
        assert!(!is_loopback("https://huggingface.co"));
        assert!(!is_loopback("http://10.0.0.1:80"));
        assert_eq!(parse_content_range("bytes 10-99/100"), Some((10, 100)));
        assert_eq!(parse_content_range("bytes */100"), None);
        assert_eq!(unquote("W/\"abc\""), "abc");
        assert_eq!(unquote("\"abc\""), "abc");
        assert!(explain_status(404, "EntryNotFound", "").contains("no such file"));
        assert!(explain_status(401, "", "").contains("HF_TOKEN"));
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        fn header_value() -> impl Strategy<Value = Option<String>> {
            prop_oneof![
                Just(None),
                Just(Some("\"".to_string() + &"ab".repeat(32) + "\"")),
                Just(Some("W/\"".to_string() + &"0".repeat(40) + "\"")),
                Just(Some("0123456789abcdef0123456789abcdef01234567".to_string())),
                Just(Some("../../x".to_string())),
                Just(Some("18446744073709551616".to_string())),
                Just(Some(" 42 ".to_string())),
                Just(Some("-1".to_string())),
                "[ -~]{0,70}".prop_map(Some),
                "[0-9a-f]{38,66}".prop_map(Some),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: if std::env::var_os("PROPTEST_CASES").is_some() { ProptestConfig::default().cases } else { 512 },
                failure_persistence: None,
                ..ProptestConfig::default()
            })]

            /// Whatever a server answers, the metadata is refused or holds a checkable
            /// hash, a size and a commit hash, none of which can leave the cache's folders.
            #[test]
            fn hub_answers_are_checked(
                headers in prop::collection::vec(header_value(), 5),
                fallback in prop_oneof![Just(String::new()), Just("main".to_string()), "[0-9a-f]{40}"],
                range in "[ -~]{0,40}",
            ) {
                let names = ["X-Linked-Etag", "ETag", "X-Linked-Size", "Content-Length", "X-Repo-Commit"];
                let get = |name: &str| {
                    names
                        .iter()
                        .position(|n| *n == name)
                        .and_then(|i| headers[i].as_deref())
                };
                if let Ok(r) = remote_from(get, &fallback) {
                    prop_assert!(super::super::super::integrity::check_etag(&r.etag).is_ok());
                    prop_assert!(super::super::super::cache::is_commit_hash(&r.commit));
                    prop_assert!(!r.etag.contains('/') && !r.commit.contains('/'));
                }
                let _ = parse_content_range(&range);
            }
        }
    }
}
