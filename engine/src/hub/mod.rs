//! Model presets and their downloads from the Hugging Face Hub.
//!
//! A [`Preset`] (from the embedded `models/presets.json`) names a Hub repository, a
//! revision and the files that make a runnable model. [`Hub`] finds them in the usual
//! Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`; shared with Python's `huggingface_hub` and `hf-hub`),
//! reports what is there ([`Hub::status`], no network), and fetches what is not
//! ([`Hub::pull`]): resumable (HTTP `Range` from a `.part` file), checked (size and the
//! Hub's ETag: sha256 for LFS files), cancellable ([`CancelToken`]), with progress
//! callbacks. The result is a snapshot directory laid out like the repository, which
//! [`crate::models::kyutai_config::ModelDir::open`] reads.
//!
//! Threads: every call runs on the caller's thread and may block (disk, network); a
//! window runs [`Hub::pull`] on a worker thread and cancels it from the UI thread.

mod cache;
mod http;
mod integrity;
mod presets;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use presets::{parse_registry, preset, presets, FileRole, Preset, PresetFile, PresetMode};

use cache::{FileRecord, RepoCache, RevisionRecord};
use http::{Client, Remote, Target};
use integrity::Hasher;

use crate::{Error, Result};

/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Where the cache is and how to reach the Hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubConfig {
    /// The hub cache folder (holding `models--owner--name/`).
    pub cache_dir: PathBuf,
    /// `HF_ENDPOINT`, else [`DEFAULT_ENDPOINT`].
    pub endpoint: String,
    /// `HF_TOKEN`, else the token file `huggingface-cli login` writes.
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE`: never touch the network.
    pub offline: bool,
    /// Limits for one connection attempt and for a read that receives nothing.
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
}

impl HubConfig {
    /// The settings `huggingface_hub` reads: `HF_HUB_CACHE`, `HF_HOME`,
    /// `XDG_CACHE_HOME`, `HF_ENDPOINT`, `HF_TOKEN`, `HF_TOKEN_PATH`, `HF_HUB_OFFLINE`.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    /// [`Self::from_env`] with the variables read through `var` (for tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let home = || {
            var("HOME")
                .or_else(|| var("USERPROFILE"))
                .map(PathBuf::from)
        };
        let hf_home = match var("HF_HOME") {
            Some(h) => PathBuf::from(h),
            None => match var("XDG_CACHE_HOME") {
                Some(x) => PathBuf::from(x).join("huggingface"),
                None => home()
                    .ok_or_else(|| {
                        Error::InvalidInput(
                            "cannot find the Hugging Face cache: set HF_HOME (or HOME)".into(),
                        )
                    })?
                    .join(".cache")
                    .join("huggingface"),
            },
        };
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = var("HF_TOKEN")
            .or_else(|| {
                let path = var("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| hf_home.join("token"));
                let text = std::fs::read_to_string(path).ok()?;
                Some(text.trim().to_string()).filter(|t| !t.is_empty())
            })
            .map(|t| t.trim().to_string());
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
        });
        Ok(Self {
            cache_dir,
            endpoint: var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            token,
            offline,
            connect_timeout: Duration::from_secs(15),
            read_timeout: Duration::from_secs(60),
        })
    }

    /// A cache folder and an endpoint, no token, default timeouts (tests, mirrors).
    pub fn new(cache_dir: impl Into<PathBuf>, endpoint: impl Into<String>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            endpoint: endpoint.into(),
            token: None,
            offline: false,
            connect_timeout: Duration::from_secs(15),
            read_timeout: Duration::from_secs(60),
        }
    }
}

/// Where one file of a preset stands locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileState {
    /// In the snapshot directory, ready to load.
    Present {
        path: PathBuf,
    },
    /// Partly downloaded (or downloaded and not yet linked): `bytes_done` of the file.
    Partial {
        bytes_done: u64,
    },
    Missing,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStatus {
    pub name: String,
    /// The Hub's size when a pull has seen it, else the registry's.
    pub size_bytes: u64,
    pub size_is_estimate: bool,
    pub state: FileState,
}

impl FileStatus {
    /// Bytes still to download for this file.
    pub fn bytes_to_fetch(&self) -> u64 {
        match self.state {
            FileState::Present { .. } => 0,
            FileState::Partial { bytes_done } => self.size_bytes.saturating_sub(bytes_done),
            FileState::Missing => self.size_bytes,
        }
    }
}

/// What a preset has on disk, found without the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresetStatus {
    pub preset: String,
    pub files: Vec<FileStatus>,
    /// Bytes still to download.
    pub bytes_to_fetch: u64,
    /// Whether `bytes_to_fetch` rests on an estimated registry size.
    pub bytes_to_fetch_is_estimate: bool,
    /// The snapshot directory when every file is present (for `ModelDir::open`).
    pub local_dir: Option<PathBuf>,
}

impl PresetStatus {
    pub fn is_complete(&self) -> bool {
        self.local_dir.is_some()
    }

    /// Bytes already on disk.
    pub fn bytes_present(&self) -> u64 {
        self.files
            .iter()
            .map(|f| f.size_bytes - f.bytes_to_fetch())
            .sum()
    }
}

/// Cancels a pull from another thread; the partial file stays for the next pull.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone)]
pub struct PullOptions {
    pub cancel: CancelToken,
    /// How many times a broken transfer is resumed within one pull (0: the next pull
    /// resumes it).
    pub retries: u32,
    /// Wait before the first retry; doubled after each, up to 30 s.
    pub retry_delay: Duration,
    /// Least time between two `Downloading` progress reports.
    pub progress_interval: Duration,
    /// The progress deadline: a transfer that brings fewer than `stall_min_bytes` in any
    /// `stall_window` is an error (the connection's read timeout alone lets a server that
    /// trickles a byte at a time hold a pull for ever).
    pub stall_window: Duration,
    pub stall_min_bytes: u64,
}

impl Default for PullOptions {
    fn default() -> Self {
        Self {
            cancel: CancelToken::new(),
            retries: 3,
            retry_delay: Duration::from_secs(2),
            progress_interval: Duration::from_millis(100),
            stall_window: Duration::from_secs(60),
            stall_min_bytes: 64 << 10,
        }
    }
}

/// What a pull is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullPhase {
    /// Asking the Hub for a file's commit, size and hash.
    Resolving,
    /// Hashing the part already on disk before resuming after it.
    Checking,
    Downloading,
    /// A transfer broke; resuming after a pause.
    Retrying {
        attempt: u32,
        reason: String,
    },
    /// This file is complete and verified.
    FileDone,
    /// Every file is present: `local_dir` is ready.
    Done,
}

/// One progress report: this file's bytes and the whole preset's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullProgress {
    pub phase: PullPhase,
    pub file: String,
    /// 0-based index of `file` among the preset's files.
    pub file_index: usize,
    pub file_count: usize,
    pub file_bytes_done: u64,
    pub file_bytes_total: u64,
    /// Over the whole preset, files already present included.
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// Sizes for people: decimal units, as the Hub shows them ("2.4 GB").
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if value < 10.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.0} {}", UNITS[unit])
    }
}

/// The Hub and the local cache.
#[derive(Debug, Clone)]
pub struct Hub {
    config: HubConfig,
    client: Client,
}

/// A pull running on its own thread (`parley-pull`), for a window: poll
/// [`PullHandle::latest`] each frame, [`PullHandle::cancel`] from a button, and collect the
/// outcome with [`PullHandle::join`] once [`PullHandle::is_finished`].
#[derive(Debug)]
pub struct PullHandle {
    cancel: CancelToken,
    progress: crossbeam_channel::Receiver<PullProgress>,
    thread: std::thread::JoinHandle<Result<PathBuf>>,
}

impl PullHandle {
    /// The most recent progress report since the last call, if any (older ones are
    /// skipped; reports are dropped rather than block the download when nobody reads).
    pub fn latest(&self) -> Option<PullProgress> {
        self.progress.try_iter().last()
    }

    /// Asks the pull to stop; it ends with [`Error::Cancelled`], keeping the partial file.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the pull and returns its outcome: the model directory, or the error.
    pub fn join(self) -> Result<PathBuf> {
        self.thread.join().unwrap_or_else(|_| {
            Err(Error::Download {
                file: String::new(),
                reason: "the download thread panicked".into(),
            })
        })
    }
}

/// Bytes read per `read` from the network.
const CHUNK_BYTES: usize = 1 << 18;

impl Hub {
    pub fn new(config: HubConfig) -> Result<Self> {
        let client = Client::new(
            &config.endpoint,
            config.token.clone(),
            &config.cache_dir,
            config.connect_timeout,
            config.read_timeout,
        )?;
        Ok(Self { config, client })
    }

    /// [`HubConfig::from_env`].
    pub fn from_env() -> Result<Self> {
        Self::new(HubConfig::from_env()?)
    }

    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    fn repo_cache(&self, preset: &Preset) -> RepoCache {
        RepoCache::new(&self.config.cache_dir, &preset.repo, &preset.revision)
    }

    /// Which files are present, partial or missing, and how much is left to fetch. Reads
    /// the cache only.
    pub fn status(&self, preset: &Preset) -> PresetStatus {
        let cache = self.repo_cache(preset);
        let record = cache.record();
        let files: Vec<FileStatus> = preset
            .files
            .iter()
            .map(|f| {
                let known = record.files.get(&f.name);
                let (size_bytes, size_is_estimate) = match known {
                    Some(r) => (r.size, false),
                    None => (f.size_bytes, f.size_is_estimate),
                };
                let state = if let Some(path) = cache.snapshot_file(&f.name) {
                    let on_disk = std::fs::metadata(&path).map_or(size_bytes, |m| m.len());
                    return FileStatus {
                        name: f.name.clone(),
                        size_bytes: on_disk,
                        size_is_estimate: false,
                        state: FileState::Present { path },
                    };
                } else if let Some(r) = known {
                    if cache.blob(&r.etag).is_file() {
                        FileState::Partial { bytes_done: r.size }
                    } else {
                        match std::fs::metadata(cache.partial(&r.etag)) {
                            Ok(m) => FileState::Partial {
                                bytes_done: m.len().min(r.size),
                            },
                            Err(_) => FileState::Missing,
                        }
                    }
                } else {
                    FileState::Missing
                };
                FileStatus {
                    name: f.name.clone(),
                    size_bytes,
                    size_is_estimate,
                    state,
                }
            })
            .collect();
        let complete = files
            .iter()
            .all(|f| matches!(f.state, FileState::Present { .. }));
        PresetStatus {
            preset: preset.name.clone(),
            bytes_to_fetch: files.iter().map(FileStatus::bytes_to_fetch).sum(),
            bytes_to_fetch_is_estimate: files
                .iter()
                .any(|f| f.size_is_estimate && f.bytes_to_fetch() > 0),
            local_dir: complete
                .then(|| cache.local_commit().map(|c| cache.snapshot_dir(&c)))
                .flatten(),
            files,
        }
    }

    /// The preset's snapshot directory if every file is present; otherwise an error that
    /// says what is missing and how much a pull would fetch.
    pub fn local_dir(&self, preset: &Preset) -> Result<PathBuf> {
        let status = self.status(preset);
        if let Some(dir) = status.local_dir {
            return Ok(dir);
        }
        let missing: Vec<&str> = status
            .files
            .iter()
            .filter(|f| !matches!(f.state, FileState::Present { .. }))
            .map(|f| f.name.as_str())
            .collect();
        Err(Error::NotDownloaded {
            preset: preset.name.clone(),
            missing: missing.join(", "),
            bytes_to_fetch: status.bytes_to_fetch,
        })
    }

    /// Downloads whatever the preset lacks and returns its snapshot directory. Nothing
    /// touches the network when every file is already present. Blocks; reports progress
    /// through `on_progress` (on this thread); stops with [`Error::Cancelled`] when
    /// `options.cancel` fires, keeping the partial file for the next pull.
    pub fn pull(
        &self,
        preset: &Preset,
        options: &PullOptions,
        on_progress: &mut dyn FnMut(&PullProgress),
    ) -> Result<PathBuf> {
        let status = self.status(preset);
        let file_count = preset.files.len();
        if let Some(dir) = status.local_dir.clone() {
            let total = status.bytes_present();
            on_progress(&PullProgress {
                phase: PullPhase::Done,
                file: String::new(),
                file_index: file_count,
                file_count,
                file_bytes_done: 0,
                file_bytes_total: 0,
                bytes_done: total,
                bytes_total: total,
            });
            return Ok(dir);
        }
        let cache = self.repo_cache(preset);
        if self.config.offline {
            let first = status
                .files
                .iter()
                .find(|f| !matches!(f.state, FileState::Present { .. }))
                .map_or("", |f| f.name.as_str());
            return Err(Error::HubUnreachable {
                repo: preset.repo.clone(),
                file: first.to_string(),
                endpoint: self.config.endpoint.clone(),
                reason: "HF_HUB_OFFLINE is set".into(),
            });
        }

        // 1. Ask for every file's metadata first: real sizes for the totals and the disk
        // check, and one commit for all (the first answer pins the branch).
        let mut remotes: Vec<Remote> = Vec::with_capacity(file_count);
        let mut record = RevisionRecord::default();
        let mut revision = preset.revision.clone();
        for (i, f) in preset.files.iter().enumerate() {
            check_cancel(&options.cancel, preset, &f.name)?;
            on_progress(&PullProgress {
                phase: PullPhase::Resolving,
                file: f.name.clone(),
                file_index: i,
                file_count,
                file_bytes_done: 0,
                file_bytes_total: f.size_bytes,
                bytes_done: 0,
                bytes_total: status.bytes_to_fetch + status.bytes_present(),
            });
            let target = Target {
                repo: &preset.repo,
                file: &f.name,
            };
            let remote = self.client.metadata(target, &revision)?;
            revision = remote.commit.clone();
            record.commit = remote.commit.clone();
            record.files.insert(
                f.name.clone(),
                FileRecord {
                    etag: remote.etag.clone(),
                    size: remote.size,
                },
            );
            remotes.push(remote);
        }
        cache.save_record(&record)?;
        let commit = record.commit.clone();
        // The ref first (as huggingface_hub does): files finished by a pull that fails
        // later are then found by `status`.
        cache.write_ref(&commit)?;

        // 2. Room on disk for what is left.
        let blobs = cache.blobs_dir();
        std::fs::create_dir_all(&blobs).map_err(|e| Error::io(&blobs, e))?;
        let done_of = |r: &Remote| -> u64 {
            if cache.blob(&r.etag).is_file() {
                r.size
            } else {
                std::fs::metadata(cache.partial(&r.etag)).map_or(0, |m| m.len().min(r.size))
            }
        };
        let bytes_total: u64 = remotes.iter().map(|r| r.size).sum();
        let mut bytes_done: u64 = remotes.iter().map(done_of).sum();
        let needed = bytes_total.saturating_sub(bytes_done);
        if let Ok(available) = fs4::available_space(&blobs) {
            if available < needed {
                return Err(Error::NoSpace {
                    path: blobs,
                    needed,
                    available,
                });
            }
        }

        // 3. Each file: link it if its blob is here, else download it.
        for (i, (f, remote)) in preset.files.iter().zip(&remotes).enumerate() {
            let mut report = PullProgress {
                phase: PullPhase::Downloading,
                file: f.name.clone(),
                file_index: i,
                file_count,
                file_bytes_done: 0,
                file_bytes_total: remote.size,
                bytes_done,
                bytes_total,
            };
            // Counted again below, as the file's own progress.
            bytes_done = bytes_done.saturating_sub(done_of(remote));
            let blob = cache.blob(&remote.etag);
            let have_blob = std::fs::metadata(&blob).is_ok_and(|m| m.len() == remote.size);
            if !have_blob {
                let url = self.client.url(&preset.repo, &commit, &f.name);
                let target = Target {
                    repo: &preset.repo,
                    file: &f.name,
                };
                self.download_file(&cache, target, &url, remote, options, &mut |p| {
                    report.phase = p.0;
                    report.file_bytes_done = p.1;
                    report.bytes_done = bytes_done + p.1;
                    on_progress(&report);
                })?;
            }
            bytes_done += remote.size;
            cache.link(&commit, &f.name, &remote.etag)?;
            report.phase = PullPhase::FileDone;
            report.file_bytes_done = remote.size;
            report.bytes_done = bytes_done;
            on_progress(&report);
        }
        let dir = cache.snapshot_dir(&commit);
        on_progress(&PullProgress {
            phase: PullPhase::Done,
            file: String::new(),
            file_index: file_count,
            file_count,
            file_bytes_done: 0,
            file_bytes_total: 0,
            bytes_done: bytes_total,
            bytes_total,
        });
        Ok(dir)
    }

    /// [`Self::pull`] on a new thread; see [`PullHandle`].
    pub fn spawn_pull(&self, preset: &Preset, options: PullOptions) -> Result<PullHandle> {
        let (tx, rx) = crossbeam_channel::bounded(64);
        let (hub, preset, cancel) = (self.clone(), preset.clone(), options.cancel.clone());
        let thread = std::thread::Builder::new()
            .name("parley-pull".into())
            .spawn(move || {
                hub.pull(&preset, &options, &mut |p| {
                    let _ = tx.try_send(p.clone());
                })
            })
            .map_err(|e| Error::Download {
                file: String::new(),
                reason: format!("cannot start the download thread: {e}"),
            })?;
        Ok(PullHandle {
            cancel,
            progress: rx,
            thread,
        })
    }

    /// One file into `blobs/<etag>`: resumed from `blobs/<etag>.part`, retried on broken
    /// transfers, checked against the size and ETag. Holds `blobs/<etag>.lock` so two
    /// processes never write the same part file.
    fn download_file(
        &self,
        cache: &RepoCache,
        target: Target<'_>,
        url: &str,
        remote: &Remote,
        options: &PullOptions,
        report: &mut dyn FnMut((PullPhase, u64)),
    ) -> Result<()> {
        let lock_path = cache.lock_file(&remote.etag);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, e))?;
        if fs4::FileExt::try_lock(&lock).is_err() {
            return Err(Error::Download {
                file: target.label(),
                reason: format!(
                    "another process is downloading it ({} is locked)",
                    lock_path.display()
                ),
            });
        }
        let mut attempt = 0;
        let result = loop {
            match self.transfer(cache, target, url, remote, options, report) {
                Err(e) if attempt < options.retries && is_transient(&e) => {
                    attempt += 1;
                    report((
                        PullPhase::Retrying {
                            attempt,
                            reason: e.to_string(),
                        },
                        part_len(cache, remote),
                    ));
                    let delay = options
                        .retry_delay
                        .saturating_mul(1 << (attempt - 1).min(4))
                        .min(Duration::from_secs(30));
                    sleep_unless_cancelled(delay, &options.cancel);
                }
                other => break other,
            }
        };
        // The lock file stays (as hf-hub leaves it); the lock goes with the handle.
        drop(lock);
        result
    }

    /// One attempt: open from the part file's end, stream, verify, move into place.
    fn transfer(
        &self,
        cache: &RepoCache,
        target: Target<'_>,
        url: &str,
        remote: &Remote,
        options: &PullOptions,
        report: &mut dyn FnMut((PullPhase, u64)),
    ) -> Result<()> {
        let part = cache.partial(&remote.etag);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&part)
            .map_err(|e| Error::io(&part, e))?;
        let mut have = file.metadata().map_err(|e| Error::io(&part, e))?.len();
        if have > remote.size {
            // Not a prefix of this file: start again.
            file.set_len(0).map_err(|e| Error::io(&part, e))?;
            have = 0;
        }

        // Hash what is already there, so the new bytes only need hashing once.
        let new_hasher = || {
            Hasher::for_etag(&remote.etag, remote.size).map_err(|reason| Error::Download {
                file: target.label(),
                reason,
            })
        };
        let mut hasher = new_hasher()?;
        if have > 0 {
            report((PullPhase::Checking, have));
            file.seek(SeekFrom::Start(0))
                .map_err(|e| Error::io(&part, e))?;
            let mut buf = vec![0u8; CHUNK_BYTES];
            let mut left = have;
            while left > 0 {
                check_cancel_file(&options.cancel, target)?;
                let want = (left as usize).min(buf.len());
                file.read_exact(&mut buf[..want])
                    .map_err(|e| Error::io(&part, e))?;
                hasher.update(&buf[..want]);
                left -= want as u64;
            }
        }

        let mut done = have;
        if have < remote.size {
            let body = self.client.open(target, url, have, remote.size)?;
            if body.start != have {
                // The server sent the whole file: start the part file over.
                file.set_len(0).map_err(|e| Error::io(&part, e))?;
                hasher = new_hasher()?;
                done = 0;
            }
            file.seek(SeekFrom::Start(done))
                .map_err(|e| Error::io(&part, e))?;
            let mut reader = body.reader;
            let mut buf = vec![0u8; CHUNK_BYTES];
            let mut last_report = Instant::now();
            // The progress deadline's window: when it began, and `done` then.
            let mut window = (Instant::now(), done);
            report((PullPhase::Downloading, done));
            while done < remote.size {
                check_cancel_file(&options.cancel, target)?;
                if window.0.elapsed() >= options.stall_window {
                    if done - window.1 < options.stall_min_bytes {
                        file.flush().map_err(|e| Error::io(&part, e))?;
                        return Err(Error::Download {
                            file: target.label(),
                            reason: format!(
                                "the server sent {} in the last {} s ({} at least expected) after {} of {}: too slow to finish; pull again to resume",
                                format_bytes(done - window.1),
                                options.stall_window.as_secs_f64(),
                                format_bytes(options.stall_min_bytes),
                                format_bytes(done),
                                format_bytes(remote.size)
                            ),
                        });
                    }
                    window = (Instant::now(), done);
                }
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        file.flush().map_err(|e| Error::io(&part, e))?;
                        return Err(Error::Download {
                            file: target.label(),
                            reason: format!(
                                "the transfer broke after {} of {}: {e}; pull again to resume",
                                format_bytes(done),
                                format_bytes(remote.size)
                            ),
                        });
                    }
                };
                let n = n.min((remote.size - done) as usize);
                file.write_all(&buf[..n]).map_err(|e| Error::io(&part, e))?;
                hasher.update(&buf[..n]);
                done += n as u64;
                if last_report.elapsed() >= options.progress_interval {
                    report((PullPhase::Downloading, done));
                    last_report = Instant::now();
                }
            }
            report((PullPhase::Downloading, done));
        }
        file.sync_all().map_err(|e| Error::io(&part, e))?;
        drop(file);
        if done != remote.size {
            return Err(Error::Download {
                file: target.label(),
                reason: format!(
                    "the connection closed after {} of {}; pull again to resume",
                    format_bytes(done),
                    format_bytes(remote.size)
                ),
            });
        }
        let algorithm = hasher.algorithm();
        let found = hasher.finish();
        if !found.eq_ignore_ascii_case(&remote.etag) {
            let _ = std::fs::remove_file(&part);
            return Err(Error::CorruptDownload {
                file: target.label(),
                algorithm: algorithm.to_string(),
                expected: remote.etag.clone(),
                found,
            });
        }
        let blob = cache.blob(&remote.etag);
        std::fs::rename(&part, &blob).map_err(|e| Error::io(&blob, e))
    }
}

fn part_len(cache: &RepoCache, remote: &Remote) -> u64 {
    std::fs::metadata(cache.partial(&remote.etag)).map_or(0, |m| m.len())
}

/// Worth resuming within the same pull: a broken or failed transfer, a server error.
fn is_transient(e: &Error) -> bool {
    match e {
        Error::Download { .. } | Error::HubUnreachable { .. } => true,
        Error::HubHttp { status, .. } => *status >= 500 || *status == 429,
        _ => false,
    }
}

fn sleep_unless_cancelled(total: Duration, cancel: &CancelToken) {
    let until = Instant::now() + total;
    while !cancel.is_cancelled() {
        let now = Instant::now();
        if now >= until {
            return;
        }
        std::thread::sleep((until - now).min(Duration::from_millis(50)));
    }
}

fn check_cancel(cancel: &CancelToken, preset: &Preset, file: &str) -> Result<()> {
    if cancel.is_cancelled() {
        Err(Error::Cancelled {
            file: format!("{}/{file}", preset.repo),
        })
    } else {
        Ok(())
    }
}

fn check_cancel_file(cancel: &CancelToken, target: Target<'_>) -> Result<()> {
    if cancel.is_cancelled() {
        Err(Error::Cancelled {
            file: target.label(),
        })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_follows_the_huggingface_variables() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(name, _)| *name == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let c = HubConfig::from_vars(vars(&[("HOME", "/home/u")])).expect("home");
        assert_eq!(c.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert_eq!(c.endpoint, DEFAULT_ENDPOINT);
        assert!(!c.offline && c.token.is_none());

        let c = HubConfig::from_vars(vars(&[
            ("HOME", "/home/u"),
            ("XDG_CACHE_HOME", "/x"),
            ("HF_ENDPOINT", "http://mirror:8080"),
            ("HF_TOKEN", " hf_abc \n"),
            ("HF_HUB_OFFLINE", "1"),
        ]))
        .expect("xdg");
        assert_eq!(c.cache_dir, PathBuf::from("/x/huggingface/hub"));
        assert_eq!(c.endpoint, "http://mirror:8080");
        assert_eq!(c.token.as_deref(), Some("hf_abc"));
        assert!(c.offline);

        let c =
            HubConfig::from_vars(vars(&[("HF_HOME", "/h"), ("HOME", "/home/u")])).expect("hf_home");
        assert_eq!(c.cache_dir, PathBuf::from("/h/hub"));
        let c = HubConfig::from_vars(vars(&[("HF_HOME", "/h"), ("HF_HUB_CACHE", "/c")]))
            .expect("hub cache");
        assert_eq!(c.cache_dir, PathBuf::from("/c"));
        let err = HubConfig::from_vars(|_| None).expect_err("no home");
        assert!(err.to_string().contains("HF_HOME"), "{err}");
    }

    #[test]
    fn token_file_is_read_from_hf_home() {
        let dir = std::env::temp_dir().join(format!("parley-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("token"), "hf_file_token\n").expect("write");
        let home = dir.to_string_lossy().to_string();
        let c =
            HubConfig::from_vars(move |k| (k == "HF_HOME").then(|| home.clone())).expect("config");
        assert_eq!(c.token.as_deref(), Some("hf_file_token"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bytes_for_people() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(999), "999 B");
        assert_eq!(format_bytes(120_378), "120 kB");
        assert_eq!(format_bytes(2_363_288_793), "2.4 GB");
        assert_eq!(format_bytes(15_760_000_000), "16 GB");
    }

    #[test]
    fn status_of_an_empty_cache_uses_registry_sizes() {
        let dir = std::env::temp_dir().join(format!("parley-empty-{}", std::process::id()));
        let hub = Hub::new(HubConfig::new(&dir, "http://127.0.0.1:1")).expect("hub");
        // Its LM's size is computed, not published: an estimate.
        let p = preset("stt-1b-en_fr-pytorch").expect("preset");
        let s = hub.status(p);
        assert!(!s.is_complete());
        assert_eq!(s.bytes_to_fetch, p.total_bytes());
        assert!(s.bytes_to_fetch_is_estimate);
        assert!(s.files.iter().all(|f| f.state == FileState::Missing));
        let err = hub.local_dir(p).expect_err("not downloaded").to_string();
        assert!(err.contains("pull it (2.4 GB)"), "{err}");
        assert!(
            err.contains("parley models pull stt-1b-en_fr-pytorch"),
            "{err}"
        );
        // The listen preset's sizes are all published.
        let s = hub.status(preset("stt-1b-en_fr").expect("preset"));
        assert!(!s.bytes_to_fetch_is_estimate);
    }
}
