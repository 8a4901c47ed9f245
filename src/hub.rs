//! Where a model comes from: a local path, the Hugging Face Hub (through its standard cache, which
//! also works offline), or the small model bundled with hypura.

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// The model `hypura run` uses when none is given: Llama 3.2 1B Instruct at Q4_K_M (~0.8 GB).
pub const DEFAULT_HUB_MODEL: &str =
    "bartowski/Llama-3.2-1B-Instruct-GGUF:Llama-3.2-1B-Instruct-Q4_K_M.gguf";

/// File name of the bundled model (random weights; see `models/README.md`).
pub const BUNDLED_MODEL_NAME: &str = "hypura-tiny-random-Q8_0.gguf";
static BUNDLED_MODEL: &[u8] = include_bytes!("../models/hypura-tiny-random-Q8_0.gguf");

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
    /// An existing path wins; `a/b:c.gguf` is a Hub reference; anything else is a path.
    pub fn parse(s: &str) -> Result<Self> {
        if Path::new(s).exists() {
            return Ok(ModelRef::Path(s.into()));
        }
        if let Some((repo, rest)) = s.split_once(':') {
            let (file, revision) = rest.split_once('@').unwrap_or((rest, "main"));
            let valid_repo = repo.split('/').count() == 2 && repo.split('/').all(|p| !p.is_empty());
            if valid_repo && !file.is_empty() && !revision.is_empty() {
                return Ok(ModelRef::Hub {
                    repo: repo.into(),
                    file: file.into(),
                    revision: revision.into(),
                });
            }
            if repo.contains('/') && !repo.starts_with('/') && !repo.starts_with('.') {
                return Err(Error::ModelSource {
                    reference: s.into(),
                    reason: "a Hub reference looks like ORG/REPO:FILE.gguf (optionally @REVISION)"
                        .into(),
                });
            }
        }
        Ok(ModelRef::Path(s.into()))
    }
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
#[derive(Clone, Debug)]
pub struct HubOptions {
    /// The Hub cache folder (`models--ORG--REPO/...` inside).
    pub cache_dir: PathBuf,
    /// Never touch the network; only the cache.
    pub offline: bool,
    /// Draw a download progress bar.
    pub progress: bool,
}

impl HubOptions {
    /// `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`; offline when
    /// `HF_HUB_OFFLINE=1`.
    pub fn from_env() -> Self {
        let cache_dir = std::env::var_os("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| Cache::from_env().path().clone());
        let offline = std::env::var("HF_HUB_OFFLINE")
            .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"));
        HubOptions {
            cache_dir,
            offline,
            progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        }
    }
}

/// The local path of the model (for a split set, of its first part), downloading what is missing
/// from the Hub unless offline.
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
        } => {
            let files = split_part_names(file);
            let mut first = None;
            for f in &files {
                let p = fetch(repo, f, revision, opts).map_err(|reason| Error::ModelSource {
                    reference: r.to_string(),
                    reason,
                })?;
                first.get_or_insert(p);
            }
            Ok(first.unwrap_or_default())
        }
    }
}

/// `x-00001-of-00003.gguf` → all three part names; any other name → itself.
fn split_part_names(file: &str) -> Vec<String> {
    let parsed = file.strip_suffix(".gguf").and_then(|stem| {
        let (rest, count) = stem.rsplit_once("-of-")?;
        let (prefix, no) = rest.rsplit_once('-')?;
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

/// One file: from the cache, or downloaded into it.
fn fetch(
    repo: &str,
    file: &str,
    revision: &str,
    opts: &HubOptions,
) -> std::result::Result<PathBuf, String> {
    let hub_repo = Repo::with_revision(repo.into(), RepoType::Model, revision.into());
    let cache = Cache::new(opts.cache_dir.clone());
    if let Some(p) = cache.repo(hub_repo.clone()).get(file) {
        return Ok(p);
    }
    if opts.offline {
        return Err(format!(
            "{file} is not in the Hub cache at {} and HF_HUB_OFFLINE is set; download it once online, \
             or pass a local path",
            opts.cache_dir.display()
        ));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache)
        .with_progress(opts.progress)
        .with_retries(0)
        .build()
        .map_err(|e| format!("cannot set up the Hub client: {e}"))?;
    api.repo(hub_repo)
        .get(file)
        .map_err(|e| format!("download of {file} failed: {e}"))
}

/// The bundled model (random weights), written once to the user cache dir and reused.
pub fn bundled_model_path() -> Result<PathBuf> {
    let dir = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("hypura");
    let path = dir.join(BUNDLED_MODEL_NAME);
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == BUNDLED_MODEL.len() as u64) {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("create directory", &dir, 0, e))?;
    let tmp = dir.join(format!("{BUNDLED_MODEL_NAME}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, BUNDLED_MODEL).map_err(|e| Error::io("write", &tmp, 0, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io("rename", &tmp, 0, e))?;
    Ok(path)
}

/// The model to use when the user names none: [`DEFAULT_HUB_MODEL`] when it is cached or can be
/// downloaded, else the bundled model. Returns the path and a sentence saying which and why.
pub fn default_model(opts: &HubOptions) -> Result<(PathBuf, String)> {
    let r = ModelRef::parse(DEFAULT_HUB_MODEL)?;
    match resolve(&r, opts) {
        Ok(p) => Ok((p, format!("using the default model {DEFAULT_HUB_MODEL}"))),
        Err(e) => {
            let p = bundled_model_path()?;
            Ok((
                p,
                format!(
                    "the default model could not be had ({e}); using the bundled model {BUNDLED_MODEL_NAME} \
                     (random weights: its output is gibberish)"
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references() {
        assert_eq!(
            ModelRef::parse("org/repo:file.gguf").unwrap(),
            ModelRef::Hub {
                repo: "org/repo".into(),
                file: "file.gguf".into(),
                revision: "main".into()
            }
        );
        assert_eq!(
            ModelRef::parse("org/repo:f.gguf@v2").unwrap(),
            ModelRef::Hub {
                repo: "org/repo".into(),
                file: "f.gguf".into(),
                revision: "v2".into()
            }
        );
        assert_eq!(
            ModelRef::parse("some/local/file.gguf").unwrap(),
            ModelRef::Path("some/local/file.gguf".into())
        );
        assert!(ModelRef::parse("org/repo:").is_err());
        assert_eq!(split_part_names("m-00001-of-00003.gguf").len(), 3);
        assert_eq!(
            split_part_names("m-00002-of-00003.gguf"),
            vec!["m-00002-of-00003.gguf"]
        );
    }
}
