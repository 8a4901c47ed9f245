//! Where a model comes from: a local path, the Hugging Face Hub (through its standard cache, which
//! also works offline), or the small model bundled with hypura.
//!
//! A Hub reference is `ORG/REPO:FILE.gguf` or `ORG/REPO:FILE.gguf@REVISION` (a branch, tag or
//! commit; `main` by default). It is looked up first in the Hub cache that the Python
//! `huggingface_hub` and Rust `hf-hub` libraries share (`models--ORG--REPO/refs/REVISION` names a
//! commit, `snapshots/COMMIT/FILE` is the file), so a model downloaded once — by hypura,
//! `huggingface-cli download` or anything else — is used with no network. Otherwise, unless
//! offline, it is downloaded into that cache with `hf-hub`. For a split model
//! (`NAME-00001-of-00003.gguf`) every part is resolved and the first part's path returned.
//!
//! Network failures end in an error, not a hang: `hf-hub`'s HTTP client (ureq 2) has a 30 s
//! connect timeout but no read timeout, and `hf-hub` does not let us set one, so the download runs
//! on a helper thread watched by the caller: no answer from the Hub within
//! [`HUB_CONNECT_TIMEOUT`], or no data for [`HUB_STALL_TIMEOUT`] during a download, gives up with
//! an error (the helper thread is left to finish or fail on its own; it writes only to the cache's
//! temporary file). Where the Hub's name does not resolve (no network), the error is immediate.
//!
//! Environment, as in `huggingface_hub`: `HF_HUB_CACHE`, `HF_HOME`, `XDG_CACHE_HOME` (where the
//! cache is), `HF_HUB_OFFLINE=1` (never touch the network), `HF_ENDPOINT` (a Hub mirror),
//! `HF_TOKEN` (gated or private repositories).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// The model `hypura run` uses when none is given: Llama 3.2 1B Instruct at Q4_K_M (~0.8 GB).
pub const DEFAULT_HUB_MODEL: &str =
    "bartowski/Llama-3.2-1B-Instruct-GGUF:Llama-3.2-1B-Instruct-Q4_K_M.gguf";

/// File name of the bundled model (random weights; see `models/README.md`).
pub const BUNDLED_MODEL_NAME: &str = "hypura-tiny-random-Q8_0.gguf";
static BUNDLED_MODEL: &[u8] = include_bytes!("../models/hypura-tiny-random-Q8_0.gguf");

/// How long to wait for the Hub's first answer before giving up.
pub const HUB_CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a download may go without receiving data before it is given up.
pub const HUB_STALL_TIMEOUT: Duration = Duration::from_secs(60);

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// A model argument: a path, or a Hub reference `ORG/REPO:FILE.gguf[@REVISION]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelRef {
    Path(PathBuf),
    Hub {
        repo: String,
        file: String,
        revision: String,
    },
}

impl ModelRef {
    /// An existing path wins; `ORG/REPO:FILE.gguf[@REVISION]` is a Hub reference; anything else
    /// is a path (which fails to resolve with "no such file"). A string that is clearly meant as
    /// a Hub reference but is malformed (`org/repo:`, `org/repo:x.gguf@`) is an error.
    pub fn parse(s: &str) -> Result<Self> {
        if Path::new(s).exists() {
            return Ok(ModelRef::Path(s.into()));
        }
        let Some((repo, rest)) = s.split_once(':') else {
            return Ok(ModelRef::Path(s.into()));
        };
        if !is_repo_id(repo) {
            return Ok(ModelRef::Path(s.into()));
        }
        let (file, revision) = match rest.rsplit_once('@') {
            Some((f, r)) => (f, r),
            None => (rest, "main"),
        };
        let bad_file = file.is_empty()
            || file.starts_with('/')
            || file.ends_with('/')
            || file
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..");
        let bad_rev = revision.is_empty()
            || revision.starts_with('/')
            || revision
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..");
        if bad_file || bad_rev {
            return Err(Error::ModelSource {
                reference: s.into(),
                reason: "a Hub reference is ORG/REPO:FILE.gguf, optionally followed by @REVISION \
                         (a branch, tag or commit)"
                    .into(),
            });
        }
        Ok(ModelRef::Hub {
            repo: repo.into(),
            file: file.into(),
            revision: revision.into(),
        })
    }
}

/// `ORG/REPO` with the characters the Hub allows in names.
fn is_repo_id(s: &str) -> bool {
    let ok = |p: &str| {
        !p.is_empty()
            && p != "."
            && p != ".."
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(s.split_once('/'), Some((org, name)) if ok(org) && ok(name))
}

impl std::fmt::Display for ModelRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelRef::Path(p) => write!(f, "{}", p.display()),
            ModelRef::Hub {
                repo,
                file,
                revision,
            } if revision == "main" => write!(f, "{repo}:{file}"),
            ModelRef::Hub {
                repo,
                file,
                revision,
            } => write!(f, "{repo}:{file}@{revision}"),
        }
    }
}

/// How to reach the Hub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubOptions {
    /// The Hub cache folder (`models--ORG--REPO/...` inside); `None` = [`default_cache_dir`].
    pub cache_dir: Option<PathBuf>,
    /// Never touch the network; only the cache. Default: `HF_HUB_OFFLINE` is 1/true/yes/on.
    pub offline: bool,
    /// Draw a download progress bar on stderr. Default: when stderr is a terminal.
    pub progress: bool,
}

impl Default for HubOptions {
    fn default() -> Self {
        let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
            matches!(
                v.trim().to_ascii_uppercase().as_str(),
                "1" | "TRUE" | "YES" | "ON"
            )
        });
        HubOptions {
            cache_dir: None,
            offline,
            progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        }
    }
}

impl HubOptions {
    /// The defaults, from the environment (same as [`Default`]).
    pub fn from_env() -> Self {
        Self::default()
    }

    /// The cache folder these options use.
    pub fn cache_path(&self) -> Result<PathBuf> {
        match &self.cache_dir {
            Some(d) => Ok(d.clone()),
            None => default_cache_dir().ok_or_else(|| Error::ModelSource {
                reference: "(Hub cache)".into(),
                reason: "cannot tell where the Hub cache is: no HOME; set HF_HUB_CACHE".into(),
            }),
        }
    }
}

/// The Hub cache folder as `huggingface_hub` finds it: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
pub fn default_cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = var("HF_HUB_CACHE") {
        return Some(d);
    }
    if let Some(d) = var("HF_HOME") {
        return Some(d.join("hub"));
    }
    if let Some(d) = var("XDG_CACHE_HOME").filter(|d| d.is_absolute()) {
        return Some(d.join("huggingface").join("hub"));
    }
    var("HOME").map(|h| h.join(".cache").join("huggingface").join("hub"))
}

/// The local path of a model (for a split set, of its first part). A Hub reference is taken from
/// the cache when there, else (unless offline) downloaded into it.
pub fn resolve(r: &ModelRef, opts: &HubOptions) -> Result<PathBuf> {
    match r {
        ModelRef::Path(p) => {
            if p.is_file() {
                Ok(p.clone())
            } else {
                Err(Error::ModelSource {
                    reference: p.display().to_string(),
                    reason: if p.exists() {
                        "not a file".into()
                    } else {
                        "no such file".into()
                    },
                })
            }
        }
        ModelRef::Hub {
            repo,
            file,
            revision,
        } => resolve_hub(repo, file, revision, opts).map_err(|miss| Error::ModelSource {
            reference: r.to_string(),
            reason: match miss {
                Miss::Offline {
                    missing,
                    n_parts,
                    cache,
                } => format!(
                    "{} in the Hub cache at {} and offline mode (HF_HUB_OFFLINE) is on; run once \
                     with network access to download it, or fetch it with `huggingface-cli \
                     download {repo} {}{}`, or pass a local path",
                    missing_parts(&missing, n_parts),
                    cache.display(),
                    missing.join(" "),
                    if revision == "main" {
                        String::new()
                    } else {
                        format!(" --revision {revision}")
                    }
                ),
                Miss::Download { part, cache, error } => format!(
                    "{part} is not in the Hub cache at {} and downloading it failed: {error} \
                     (set HF_HUB_OFFLINE=1 to use only the cache, or pass a local path)",
                    cache.display()
                ),
                Miss::Other(reason) => reason,
            },
        }),
    }
}

/// Why a Hub reference did not resolve.
enum Miss {
    /// Offline, and these parts are not cached.
    Offline {
        missing: Vec<String>,
        n_parts: usize,
        cache: PathBuf,
    },
    /// Not cached, and the download failed.
    Download {
        part: String,
        cache: PathBuf,
        error: String,
    },
    Other(String),
}

/// "x.gguf is not" / "2 of the 3 parts (a, b) are not".
fn missing_parts(missing: &[String], n_parts: usize) -> String {
    if n_parts > 1 {
        format!(
            "{} of the {n_parts} parts ({}) {} not",
            missing.len(),
            missing.join(", "),
            if missing.len() == 1 { "is" } else { "are" }
        )
    } else {
        format!("{} is not", missing.join(", "))
    }
}

fn resolve_hub(
    repo: &str,
    file: &str,
    revision: &str,
    opts: &HubOptions,
) -> std::result::Result<PathBuf, Miss> {
    let cache = opts.cache_path().map_err(|e| match e {
        Error::ModelSource { reason, .. } => Miss::Other(reason),
        other => Miss::Other(other.to_string()),
    })?;
    let parts = split_part_names(file);
    let mut paths = Vec::with_capacity(parts.len());
    let mut missing = Vec::new();
    for part in &parts {
        match cached_file(&cache, repo, revision, part) {
            Some(p) => paths.push(p),
            None => missing.push(part.clone()),
        }
    }
    if !missing.is_empty() && opts.offline {
        return Err(Miss::Offline {
            missing,
            n_parts: parts.len(),
            cache,
        });
    }
    for part in &missing {
        let p = download(
            DownloadRequest {
                endpoint: std::env::var("HF_ENDPOINT")
                    .ok()
                    .filter(|e| !e.is_empty())
                    .unwrap_or_else(|| DEFAULT_ENDPOINT.into()),
                cache: cache.clone(),
                repo: repo.into(),
                file: part.clone(),
                revision: revision.into(),
                progress: opts.progress,
            },
            HUB_CONNECT_TIMEOUT,
            HUB_STALL_TIMEOUT,
        )
        .map_err(|error| Miss::Download {
            part: part.clone(),
            cache: cache.clone(),
            error,
        })?;
        paths.push(p);
    }
    // Cached parts first, then downloaded ones: put them back in part order.
    paths.sort_by_key(|p| {
        parts
            .iter()
            .position(|n| p.ends_with(n))
            .unwrap_or(usize::MAX)
    });
    if paths
        .iter()
        .any(|p| p.parent() != paths.first().and_then(|f| f.parent()))
    {
        return Err(Miss::Other(format!(
            "the parts of this split model are in different snapshots of the cache (the \
             repository changed between downloads): {}; delete them and try again",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    paths
        .into_iter()
        .next()
        .ok_or_else(|| Miss::Other("no file to resolve".into()))
}

/// `x-00001-of-00003.gguf` → all three part names; any other name → itself.
fn split_part_names(file: &str) -> Vec<String> {
    let parsed = file.strip_suffix(".gguf").and_then(|stem| {
        let (rest, count) = stem.rsplit_once("-of-")?;
        let (prefix, no) = rest.rsplit_once('-')?;
        let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(no) || !all_digits(count) {
            return None;
        }
        Some((
            prefix,
            no.parse::<usize>().ok()?,
            count.parse::<usize>().ok()?,
            count.len(),
        ))
    });
    match parsed {
        Some((prefix, 1, count, width)) if (2..=9999).contains(&count) => (1..=count)
            .map(|i| format!("{prefix}-{i:0width$}-of-{count:0width$}.gguf"))
            .collect(),
        _ => vec![file.to_string()],
    }
}

/// `FILE` of `REPO` at `REVISION` in the Hub cache at `cache`, if there: `refs/REVISION` names the
/// commit (a revision that is itself a commit hash needs no ref), `snapshots/COMMIT/FILE` is the
/// file (usually a link into `blobs/`; a dangling link counts as absent).
pub fn cached_file(cache: &Path, repo: &str, revision: &str, file: &str) -> Option<PathBuf> {
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let commit = match std::fs::read_to_string(repo_dir.join("refs").join(revision)) {
        Ok(c) => c.trim().to_string(),
        Err(_) if revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit()) => {
            revision.to_string()
        }
        Err(_) => return None,
    };
    if commit.is_empty() || commit.contains(['/', '\\']) || commit.starts_with('.') {
        return None;
    }
    let p = repo_dir.join("snapshots").join(commit).join(file);
    p.is_file().then_some(p)
}

/// One file to download into the cache.
struct DownloadRequest {
    endpoint: String,
    cache: PathBuf,
    repo: String,
    file: String,
    revision: String,
    progress: bool,
}

enum Event {
    /// The Hub answered, or data arrived.
    Alive,
    Done(std::result::Result<PathBuf, String>),
}

/// hf-hub's progress hook: draws the bar and tells the watching thread that data flows.
struct Watch {
    tx: mpsc::Sender<Event>,
    bar: Option<indicatif::ProgressBar>,
    last_ping: Instant,
}

impl Watch {
    fn ping(&mut self, force: bool) {
        if force || self.last_ping.elapsed() >= Duration::from_millis(500) {
            self.last_ping = Instant::now();
            let _ = self.tx.send(Event::Alive);
        }
    }
}

impl hf_hub::api::Progress for Watch {
    fn init(&mut self, size: usize, filename: &str) {
        if let Some(bar) = &self.bar {
            bar.set_length(size as u64);
            bar.set_position(0);
            bar.set_message(filename.to_string());
        }
        self.ping(true);
    }
    fn update(&mut self, size: usize) {
        if let Some(bar) = &self.bar {
            bar.inc(size as u64);
        }
        self.ping(false);
    }
    fn finish(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// Downloads one file into the cache with hf-hub on a helper thread, giving up when the Hub does
/// not answer within `connect_timeout` or data stops for `stall_timeout`.
fn download(
    req: DownloadRequest,
    connect_timeout: Duration,
    stall_timeout: Duration,
) -> std::result::Result<PathBuf, String> {
    let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(Cache::new(req.cache.clone()))
        .with_endpoint(req.endpoint.clone())
        .with_progress(false)
        .with_retries(0)
        .with_user_agent("hypura", env!("CARGO_PKG_VERSION"));
    if let Some(token) = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
    {
        builder = builder.with_token(Some(token.trim().to_string()));
    }
    let api = builder
        .build()
        .map_err(|e| format!("cannot set up the Hub client: {e}"))?;
    let bar = req.progress.then(|| {
        let bar = indicatif::ProgressBar::new(0);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    });
    let (tx, rx) = mpsc::channel();
    let watch = Watch {
        tx: tx.clone(),
        bar: bar.clone(),
        last_ping: Instant::now(),
    };
    let repo = Repo::with_revision(req.repo.clone(), RepoType::Model, req.revision.clone());
    let file = req.file.clone();
    std::thread::Builder::new()
        .name("hypura-hub-download".into())
        .spawn(move || {
            let r = api
                .repo(repo)
                .download_with_progress(&file, watch)
                .map_err(|e| e.to_string());
            let _ = tx.send(Event::Done(r));
        })
        .map_err(|e| format!("cannot start the download thread: {e}"))?;
    let give_up = |why: String| {
        if let Some(bar) = &bar {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        Err(why)
    };
    let mut answered = false;
    loop {
        let timeout = if answered {
            stall_timeout
        } else {
            connect_timeout
        };
        match rx.recv_timeout(timeout) {
            Ok(Event::Alive) => answered = true,
            Ok(Event::Done(r)) => {
                if r.is_err() {
                    if let Some(bar) = &bar {
                        bar.abandon();
                    }
                }
                return r;
            }
            Err(mpsc::RecvTimeoutError::Timeout) if answered => {
                return give_up(format!(
                    "the download stalled (no data for {} s)",
                    stall_timeout.as_secs()
                ))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return give_up(format!(
                    "no answer from {} within {} s (no network?)",
                    req.endpoint,
                    connect_timeout.as_secs()
                ))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return give_up("the download thread ended without a result".into())
            }
        }
    }
}

/// The bundled model (random weights), written once to a cache folder and reused: the path of a
/// file with exactly the bundled bytes. Tries `$XDG_CACHE_HOME/hypura`, `~/.cache/hypura`, then
/// the system temporary folder; the file appears atomically (temporary name, then rename).
pub fn bundled_model_path() -> Result<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let mut dirs = Vec::new();
    if let Some(d) = var("XDG_CACHE_HOME").filter(|d| d.is_absolute()) {
        dirs.push(d.join("hypura"));
    }
    if let Some(h) = var("HOME") {
        dirs.push(h.join(".cache").join("hypura"));
    }
    dirs.push(std::env::temp_dir().join("hypura"));
    let mut first_err = None;
    for dir in dirs {
        match write_bundled(&dir) {
            Ok(p) => return Ok(p),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    Err(first_err.unwrap_or_else(|| Error::ModelSource {
        reference: BUNDLED_MODEL_NAME.into(),
        reason: "no folder to write the bundled model to".into(),
    }))
}

fn write_bundled(dir: &Path) -> Result<PathBuf> {
    let path = dir.join(BUNDLED_MODEL_NAME);
    let same = std::fs::metadata(&path).is_ok_and(|m| m.len() == BUNDLED_MODEL.len() as u64)
        && std::fs::read(&path).is_ok_and(|b| b == BUNDLED_MODEL);
    if same {
        return Ok(path);
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, 0, e))?;
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{BUNDLED_MODEL_NAME}.{}.{n}.tmp",
        std::process::id()
    ));
    let result = std::fs::write(&tmp, BUNDLED_MODEL)
        .map_err(|e| Error::io("write", &tmp, 0, e))
        .and_then(|()| std::fs::rename(&tmp, &path).map_err(|e| Error::io("rename", &tmp, 0, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| path)
}

/// The model to use when the user names none: [`DEFAULT_HUB_MODEL`] when it is cached or can be
/// downloaded, else the bundled model. Returns the path and a sentence saying which and why.
pub fn default_model(opts: &HubOptions) -> Result<(PathBuf, String)> {
    let Some((repo, file)) = DEFAULT_HUB_MODEL.split_once(':') else {
        return Err(Error::InvalidRequest("bad DEFAULT_HUB_MODEL".into()));
    };
    let why = match resolve_hub(repo, file, "main", opts) {
        Ok(p) => {
            let msg = format!(
                "using the default model {DEFAULT_HUB_MODEL} ({})",
                p.display()
            );
            return Ok((p, msg));
        }
        Err(Miss::Offline { cache, .. }) => format!(
            "is not in the Hub cache at {} and offline mode (HF_HUB_OFFLINE) is on",
            cache.display()
        ),
        Err(Miss::Download { cache, error, .. }) => format!(
            "is not in the Hub cache at {} and could not be downloaded: {error}",
            cache.display()
        ),
        Err(Miss::Other(reason)) => format!("could not be used: {reason}"),
    };
    let p = bundled_model_path()?;
    Ok((
        p,
        format!(
            "the default model {DEFAULT_HUB_MODEL} {why}; using the bundled model \
             {BUNDLED_MODEL_NAME} instead (random weights: its output is gibberish)"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(repo: &str, file: &str, revision: &str) -> ModelRef {
        ModelRef::Hub {
            repo: repo.into(),
            file: file.into(),
            revision: revision.into(),
        }
    }

    #[test]
    fn parses_references() {
        let p = |s: &str| ModelRef::parse(s).unwrap();
        assert_eq!(
            p("org/repo:file.gguf"),
            hub("org/repo", "file.gguf", "main")
        );
        assert_eq!(p("org/repo:f.gguf@v2"), hub("org/repo", "f.gguf", "v2"));
        assert_eq!(
            p("Org-1/my.repo_x:Q4_K_M/m-00001-of-00002.gguf@refs/pr/3"),
            hub(
                "Org-1/my.repo_x",
                "Q4_K_M/m-00001-of-00002.gguf",
                "refs/pr/3"
            )
        );
        for path in [
            "some/local/file.gguf",
            "model.gguf",
            "/abs/org/repo:file.gguf",
            "./org/repo:file.gguf",
            "C:/models/x.gguf",
            "a/b/c:file.gguf",
            "",
        ] {
            assert_eq!(p(path), ModelRef::Path(path.into()), "{path}");
        }
        for bad in [
            "org/repo:",
            "org/repo:x.gguf@",
            "org/repo:../x.gguf",
            "org/repo:a//b.gguf",
        ] {
            let e = ModelRef::parse(bad).unwrap_err().to_string();
            assert!(e.contains("ORG/REPO:FILE.gguf"), "{bad}: {e}");
        }
        // An existing path wins even if it looks like a reference.
        let dir = std::env::temp_dir().join(format!("hypura-hub-parse-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("org")).unwrap();
        let odd = dir.join("org/repo:file.gguf");
        std::fs::write(&odd, b"x").unwrap();
        let s = odd.to_str().unwrap();
        assert_eq!(p(s), ModelRef::Path(s.into()));
        let _ = std::fs::remove_dir_all(&dir);
        // Display round-trips.
        for s in ["org/repo:f.gguf", "org/repo:f.gguf@v2"] {
            assert_eq!(p(s).to_string(), s);
        }
    }

    #[test]
    fn split_names() {
        assert_eq!(
            split_part_names("m-00001-of-00003.gguf"),
            [
                "m-00001-of-00003.gguf",
                "m-00002-of-00003.gguf",
                "m-00003-of-00003.gguf"
            ]
        );
        assert_eq!(
            split_part_names("d/m-00002-of-00003.gguf"),
            ["d/m-00002-of-00003.gguf"]
        );
        assert_eq!(split_part_names("m.gguf"), ["m.gguf"]);
        assert_eq!(split_part_names("m-x-of-2.gguf"), ["m-x-of-2.gguf"]);
        assert_eq!(split_part_names("m-1-of-+2.gguf"), ["m-1-of-+2.gguf"]);
    }

    #[test]
    fn commit_revisions_need_no_ref() {
        let root = std::env::temp_dir().join(format!("hypura-hub-commit-{}", std::process::id()));
        let commit = "89abcdef0123456789abcdef0123456789abcdef";
        let snap = root.join("models--o--r/snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("f.gguf"), b"x").unwrap();
        assert_eq!(
            cached_file(&root, "o/r", commit, "f.gguf"),
            Some(snap.join("f.gguf"))
        );
        assert_eq!(cached_file(&root, "o/r", "main", "f.gguf"), None);
        // A ref with a trailing newline (hand-written) still works.
        std::fs::create_dir_all(root.join("models--o--r/refs")).unwrap();
        std::fs::write(root.join("models--o--r/refs/main"), format!("{commit}\n")).unwrap();
        assert_eq!(
            cached_file(&root, "o/r", "main", "f.gguf"),
            Some(snap.join("f.gguf"))
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    /// A server that accepts connections and never answers: the watchdog gives up on time.
    #[test]
    fn a_silent_server_times_out() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let held = std::thread::spawn(move || {
            let conns: Vec<_> = listener.incoming().take(1).collect();
            std::thread::sleep(Duration::from_secs(10));
            drop(conns);
        });
        let root = std::env::temp_dir().join(format!("hypura-hub-silent-{}", std::process::id()));
        let start = Instant::now();
        let e = download(
            DownloadRequest {
                endpoint: format!("http://{addr}"),
                cache: root.clone(),
                repo: "o/r".into(),
                file: "f.gguf".into(),
                revision: "main".into(),
                progress: false,
            },
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
        .unwrap_err();
        let took = start.elapsed();
        assert!(e.contains("no answer") && e.contains("within 1 s"), "{e}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        drop(held);
        let _ = std::fs::remove_dir_all(&root);
    }

    /// A refused connection is an immediate, clear error.
    #[test]
    fn a_closed_port_fails_at_once() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let root = std::env::temp_dir().join(format!("hypura-hub-closed-{}", std::process::id()));
        let start = Instant::now();
        let e = download(
            DownloadRequest {
                endpoint: format!("http://127.0.0.1:{port}"),
                cache: root.clone(),
                repo: "o/r".into(),
                file: "f.gguf".into(),
                revision: "main".into(),
                progress: false,
            },
            Duration::from_secs(20),
            Duration::from_secs(20),
        )
        .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5), "{e}");
        assert!(!e.is_empty());
        let _ = std::fs::remove_dir_all(&root);
    }
}
