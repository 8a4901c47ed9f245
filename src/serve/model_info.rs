//! What the server says about its one model: the names it answers to and the details the APIs
//! list (`/api/tags`, `/api/show`, `/v1/models`).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::loader::LoadedModel;
use crate::models::LanguageModel;

/// The loaded model, as the APIs describe it.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// The name listed (`--alias`, else the file name without `.gguf`).
    pub name: String,
    /// Every name a request may use, lower-cased (see [`ModelInfo::accepts`]).
    names: Vec<String>,
    pub path: String,
    pub size_bytes: u64,
    /// The file's modification time, seconds since the epoch.
    pub modified_unix: u64,
    /// A stable identifier of the file (a hash of path, size and time; not its SHA-256).
    pub digest: String,
    pub family: String,
    pub parameter_count: u64,
    pub quantization: String,
    pub n_ctx: usize,
    pub n_ctx_train: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_vocab: usize,
    pub general_name: String,
}

impl ModelInfo {
    /// Describes `m`, loaded from `reference` (the `-m` argument as typed), answering also to
    /// `aliases` (the first one becomes the listed name).
    pub fn new(m: &LoadedModel, reference: Option<&str>, aliases: &[String]) -> Self {
        let path = m.files.path();
        let stem = model_stem(path);
        let name = aliases.first().cloned().unwrap_or_else(|| stem.clone());
        let mut names: Vec<String> = aliases.to_vec();
        names.push(stem);
        names.extend(path.file_name().map(|f| f.to_string_lossy().to_string()));
        names.extend(reference.map(str::to_string));
        if !m.config.name.is_empty() {
            names.push(m.config.name.clone());
        }
        let mut names: Vec<String> = names.iter().map(|n| n.to_lowercase()).collect();
        names.sort();
        names.dedup();
        let size_bytes: u64 = m
            .files
            .paths
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|md| md.len())
            .sum();
        let modified_unix = std::fs::metadata(path)
            .and_then(|md| md.modified())
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        let parameter_count = m
            .files
            .tensors
            .iter()
            .map(|t| t.dims.iter().product::<u64>())
            .sum();
        let digest = {
            // FNV-1a over what identifies the file; cheap, unlike hashing gigabytes.
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            let key = format!("{}|{size_bytes}|{modified_unix}", path.display());
            for b in key.bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
            format!("{h:016x}")
        };
        let c = &m.config;
        ModelInfo {
            name,
            names,
            path: path.display().to_string(),
            size_bytes,
            modified_unix,
            digest,
            family: c.arch.gguf_name().to_string(),
            parameter_count,
            quantization: quantization(m),
            n_ctx: m.model.n_ctx(),
            n_ctx_train: c.n_ctx_train,
            n_embd: c.n_embd,
            n_layer: c.n_layer,
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            n_vocab: c.n_vocab,
            general_name: c.name.clone(),
        }
    }

    /// Whether a request naming `model` means this model: any of its names (the listed name,
    /// the file name with or without `.gguf`, the `-m` argument, the GGUF `general.name`, the
    /// aliases), case-insensitive, with or without a `:latest` tag; an empty name also does.
    pub fn accepts(&self, model: &str) -> bool {
        let m = model.trim().to_lowercase();
        let m = m.strip_suffix(":latest").unwrap_or(&m);
        m.is_empty() || self.names.iter().any(|n| n == m)
    }

    /// The accepted names, for error messages.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// "1.2B", "350.0M": the parameter count as Ollama prints it.
    pub fn parameter_size(&self) -> String {
        let n = self.parameter_count as f64;
        if n >= 1e9 {
            format!("{:.1}B", n / 1e9)
        } else if n >= 1e6 {
            format!("{:.1}M", n / 1e6)
        } else {
            format!("{:.1}K", n / 1e3)
        }
    }
}

/// The file name without `.gguf` and without a split suffix `-00001-of-00003`.
fn model_stem(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    // "-NNNNN-of-NNNNN" is 15 ASCII characters.
    let n = stem.len();
    if n > 15 && stem.is_char_boundary(n - 15) {
        let tail = &stem[n - 15..];
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if tail.is_ascii()
            && tail.starts_with('-')
            && &tail[6..10] == "-of-"
            && digits(&tail[1..6])
            && digits(&tail[10..])
        {
            return stem[..n - 15].to_string();
        }
    }
    stem
}

/// llama.cpp's name of the file type (`general.file_type`), else the type holding most bytes.
fn quantization(m: &LoadedModel) -> String {
    let names = [
        (0, "F32"),
        (1, "F16"),
        (2, "Q4_0"),
        (3, "Q4_1"),
        (7, "Q8_0"),
        (8, "Q5_0"),
        (9, "Q5_1"),
        (10, "Q2_K"),
        (11, "Q3_K_S"),
        (12, "Q3_K_M"),
        (13, "Q3_K_L"),
        (14, "Q4_K_S"),
        (15, "Q4_K_M"),
        (16, "Q5_K_S"),
        (17, "Q5_K_M"),
        (18, "Q6_K"),
        (32, "BF16"),
    ];
    if let Ok(Some(ft)) = m.files.metadata.usize_opt("general.file_type") {
        if let Some((_, n)) = names.iter().find(|(id, _)| *id == ft) {
            return n.to_string();
        }
    }
    let mut by_type: std::collections::BTreeMap<&str, u64> = Default::default();
    for t in &m.files.tensors {
        *by_type.entry(t.ty.name()).or_default() += t.n_bytes;
    }
    by_type
        .into_iter()
        .max_by_key(|(_, b)| *b)
        .map_or_else(|| "unknown".into(), |(n, _)| n.to_string())
}

/// Seconds since the epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// RFC 3339 UTC time with nanoseconds, as Ollama writes `created_at`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    format!(
        "{}.{:09}Z",
        crate::chat::strftime::format("%Y-%m-%dT%H:%M:%S", d.as_secs() as i64),
        d.subsec_nanos()
    )
}

#[cfg(test)]
mod tests {
    use super::model_stem;
    use std::path::Path;

    #[test]
    fn split_suffix_and_extension_are_dropped() {
        assert_eq!(
            model_stem(Path::new("/m/Llama-3-Q4_K_M-00001-of-00003.gguf")),
            "Llama-3-Q4_K_M"
        );
        assert_eq!(model_stem(Path::new("tiny.gguf")), "tiny");
        assert_eq!(
            model_stem(Path::new("a-00001-of-0000x.gguf")),
            "a-00001-of-0000x"
        );
    }
}
