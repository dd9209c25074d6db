//! A stand-in for the Hugging Face Hub on 127.0.0.1, for download tests without a network.
//!
//! It answers what a client of the Hub asks: `HEAD`/`GET /{owner}/{name}/resolve/{rev}/{file}`.
//! As the Hub does, small ("git") files answer with a relative `307` to
//! `/api/resolve-cache/...`, which serves them with `ETag` = their git blob id; LFS files
//! answer with a `302` to a CDN path (`/cdn/{sha256}`, on the same server) carrying
//! `X-Linked-Etag` (the sha256) and `X-Linked-Size`; every answer from `resolve` carries
//! `X-Repo-Commit`, and errors carry `X-Error-Code`. Bodies honour
//! `Range: bytes=N-`. Faults on request: close a transfer after N bytes, flip a byte,
//! ignore `Range`, refuse a repository with a status. Every request is logged.
//!
//! Shared by the engine's `hub_download` test and the binary's `models_cli` test.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use sha1::Sha1;
use sha2::{Digest, Sha256};

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

#[derive(Debug, Clone)]
pub struct FakeFile {
    pub name: String,
    pub bytes: Vec<u8>,
    /// Served through the CDN redirect with `X-Linked-Etag` (as LFS files are).
    pub lfs: bool,
}

impl FakeFile {
    /// Files ending in .safetensors or .model are LFS, as on the Hub.
    pub fn new(name: &str, bytes: Vec<u8>) -> Self {
        let lfs = name.ends_with(".safetensors") || name.ends_with(".model");
        Self {
            name: name.to_string(),
            bytes,
            lfs,
        }
    }

    pub fn sha256(&self) -> String {
        hex(&Sha256::digest(&self.bytes))
    }

    pub fn git_sha1(&self) -> String {
        let mut h = Sha1::new();
        h.update(format!("blob {}\0", self.bytes.len()).as_bytes());
        h.update(&self.bytes);
        hex(&h.finalize())
    }

    /// The ETag the Hub gives this file (its blob's name in the cache).
    pub fn etag(&self) -> String {
        if self.lfs {
            self.sha256()
        } else {
            self.git_sha1()
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct Repo {
    commit: String,
    files: Vec<FakeFile>,
    /// Answer every request for this repository with this status (401 gated, ...).
    refuse: Option<u16>,
}

#[derive(Default)]
struct State {
    repos: HashMap<String, Repo>,
    log: Vec<Request>,
    /// File name -> close the next body transfer of it after this many bytes.
    truncate_next: HashMap<String, usize>,
    corrupt: HashSet<String>,
    ignore_range: bool,
    /// Send bodies a byte at a time, this long apart.
    trickle: Option<std::time::Duration>,
    /// Give every file this ETag (as a server that is not the Hub might).
    etag: Option<String>,
}

pub struct FakeHub {
    pub url: String,
    state: Arc<Mutex<State>>,
}

impl FakeHub {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State::default()));
        let (st, base) = (state.clone(), url.clone());
        std::thread::Builder::new()
            .name("fake-hub".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let (st, base) = (st.clone(), base.clone());
                    let _ = std::thread::Builder::new()
                        .name("fake-hub-conn".into())
                        .spawn(move || handle(stream, &st, &base));
                }
            })
            .expect("spawn");
        Self { url, state }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().expect("state"))
    }

    pub fn add_repo(&self, id: &str, commit: &str, files: Vec<FakeFile>) {
        self.with(|s| {
            s.repos.insert(
                id.to_string(),
                Repo {
                    commit: commit.to_string(),
                    files,
                    refuse: None,
                },
            )
        });
    }

    pub fn refuse(&self, id: &str, status: u16) {
        self.with(|s| {
            if let Some(r) = s.repos.get_mut(id) {
                r.refuse = Some(status);
            }
        });
    }

    /// The next transfer of `file`'s bytes stops after `after_bytes` (the connection closes).
    pub fn truncate_next(&self, file: &str, after_bytes: usize) {
        self.with(|s| s.truncate_next.insert(file.to_string(), after_bytes));
    }

    /// Serve `file` with one byte changed (its ETag stays that of the true bytes).
    pub fn corrupt(&self, file: &str, on: bool) {
        self.with(|s| {
            if on {
                s.corrupt.insert(file.to_string());
            } else {
                s.corrupt.remove(file);
            }
        });
    }

    /// Send every body one byte at a time, `every` apart (None: at once).
    pub fn trickle(&self, every: Option<std::time::Duration>) {
        self.with(|s| s.trickle = every);
    }

    /// Give every file this ETag instead of its hash (None: the Hub's ETags).
    pub fn etag_override(&self, etag: Option<&str>) {
        self.with(|s| s.etag = etag.map(str::to_string));
    }

    /// Answer ranged requests with the whole file (200), as some servers do.
    pub fn ignore_range(&self, on: bool) {
        self.with(|s| s.ignore_range = on);
    }

    pub fn log(&self) -> Vec<Request> {
        self.with(|s| s.log.clone())
    }

    pub fn clear_log(&self) {
        self.with(|s| s.log.clear());
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Bytes of `body` actually sent before closing (fault injection).
    send_only: Option<usize>,
    /// Send the body a byte at a time, this long apart (fault injection).
    trickle: Option<std::time::Duration>,
}

impl Reply {
    fn new(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            send_only: None,
            trickle: None,
        }
    }

    fn header(mut self, k: &str, v: impl Into<String>) -> Self {
        self.headers.push((k.to_string(), v.into()));
        self
    }

    fn error(status: u16, code: &str) -> Self {
        Self::new(status)
            .header("X-Error-Code", code)
            .header("X-Error-Message", format!("fake hub: {code}"))
    }
}

fn handle(stream: TcpStream, state: &Mutex<State>, base: &str) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() || line.is_empty() {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = percent_decode(parts.next().unwrap_or_default());
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let request = Request {
        method: method.clone(),
        path: path.clone(),
        range: headers.get("range").cloned(),
        authorization: headers.get("authorization").cloned(),
    };
    let reply = {
        let mut st = state.lock().expect("state");
        st.log.push(request.clone());
        route(&mut st, &request, base)
    };
    send(stream, &method, reply);
}

fn route(st: &mut State, req: &Request, base: &str) -> Reply {
    if let Some(sha) = req.path.strip_prefix("/cdn/") {
        let found = st
            .repos
            .values()
            .flat_map(|r| r.files.iter())
            .find(|f| f.lfs && f.sha256() == sha)
            .cloned();
        return match found {
            Some(f) => body_reply(st, &f, req),
            None => Reply::new(404),
        };
    }
    // Where the Hub redirects git files: /api/resolve-cache/models/{owner}/{name}/{commit}/{file}.
    // Its answer carries the ETag but (here) no X-Repo-Commit: the client keeps the one the
    // redirect gave.
    if let Some(rest) = req.path.strip_prefix("/api/resolve-cache/models/") {
        let segs: Vec<&str> = rest.splitn(4, '/').collect();
        let file = (segs.len() == 4)
            .then(|| st.repos.get(&format!("{}/{}", segs[0], segs[1])))
            .flatten()
            .filter(|r| r.commit == segs[2])
            .and_then(|r| r.files.iter().find(|f| f.name == segs[3]).cloned());
        return match file {
            Some(f) => {
                let etag = st
                    .etag
                    .clone()
                    .unwrap_or_else(|| format!("\"{}\"", f.git_sha1()));
                body_reply(st, &f, req).header("ETag", etag)
            }
            None => Reply::error(404, "EntryNotFound"),
        };
    }
    // /{owner}/{name}/resolve/{rev}/{file...}
    let segs: Vec<&str> = req.path.trim_start_matches('/').splitn(5, '/').collect();
    if segs.len() != 5 || segs[2] != "resolve" {
        return Reply::error(404, "NotFound");
    }
    let id = format!("{}/{}", segs[0], segs[1]);
    let (rev, name) = (segs[3], segs[4]);
    let Some(repo) = st.repos.get(&id) else {
        // The Hub answers 401 for repositories it cannot show an anonymous client.
        return Reply::error(401, "RepoNotFound");
    };
    if let Some(status) = repo.refuse {
        return Reply::error(status, "GatedRepo");
    }
    if rev != "main" && rev != repo.commit {
        return Reply::error(404, "RevisionNotFound");
    }
    let commit = repo.commit.clone();
    let Some(file) = repo.files.iter().find(|f| f.name == name).cloned() else {
        return Reply::error(404, "EntryNotFound").header("X-Repo-Commit", commit);
    };
    if file.lfs {
        Reply::new(302)
            .header("Location", format!("{base}/cdn/{}", file.sha256()))
            .header("X-Repo-Commit", commit)
            .header(
                "X-Linked-Etag",
                st.etag
                    .clone()
                    .unwrap_or_else(|| format!("\"{}\"", file.sha256())),
            )
            .header("X-Linked-Size", file.bytes.len().to_string())
            .header("ETag", format!("\"{}\"", file.git_sha1()))
    } else {
        // Git files: a relative redirect, as the Hub answers with its resolve cache.
        Reply::new(307)
            .header(
                "Location",
                format!("/api/resolve-cache/models/{id}/{commit}/{}", file.name),
            )
            .header("X-Repo-Commit", commit)
    }
}

fn body_reply(st: &mut State, file: &FakeFile, req: &Request) -> Reply {
    let mut bytes = file.bytes.clone();
    if st.corrupt.contains(&file.name) {
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
    }
    let total = bytes.len();
    let start = req
        .range
        .as_deref()
        .filter(|_| !st.ignore_range)
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|n| n.parse::<usize>().ok());
    let mut reply = match start {
        Some(s) if s >= total => {
            return Reply::new(416).header("Content-Range", format!("bytes */{total}"));
        }
        Some(s) => {
            let mut r =
                Reply::new(206).header("Content-Range", format!("bytes {s}-{}/{total}", total - 1));
            r.body = bytes[s..].to_vec();
            r
        }
        None => {
            let mut r = Reply::new(200);
            r.body = bytes;
            r
        }
    };
    if req.method == "GET" {
        reply.send_only = st.truncate_next.remove(&file.name);
        reply.trickle = st.trickle;
    }
    reply.header("Accept-Ranges", "bytes")
}

fn send(mut stream: TcpStream, method: &str, reply: Reply) {
    let reason = match reply.status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        307 => "Temporary Redirect",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Status",
    };
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", reply.status);
    for (k, v) in &reply.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        reply.body.len()
    ));
    let _ = stream.write_all(head.as_bytes());
    if method != "HEAD" {
        let n = reply
            .send_only
            .unwrap_or(reply.body.len())
            .min(reply.body.len());
        match reply.trickle {
            Some(every) => {
                for b in &reply.body[..n] {
                    if stream.write_all(std::slice::from_ref(b)).is_err() {
                        return;
                    }
                    let _ = stream.flush();
                    std::thread::sleep(every);
                }
            }
            None => {
                let _ = stream.write_all(&reply.body[..n]);
            }
        }
    }
    let _ = stream.flush();
    let _ = stream.shutdown(Shutdown::Write);
}
