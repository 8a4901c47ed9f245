//! `hypura inspect`: what a GGUF file holds — architecture, hyper-parameters, tensors by role and
//! type — and where hypura would place them on this machine. Reads only the header.

use std::collections::BTreeMap;

use anyhow::Result;
use clap::Args;
use hypura::gguf::{read_header, ModelConfig, ModelFiles};
use hypura::loader::{default_n_ctx, plan_model_unmeasured};
use hypura::optimize::{ExpertLayout, ORDER_KEY};
use hypura::plan::layer_of;

use crate::common::{human_bytes, ModelArgs};
use crate::plan_cmds::{plan_json, print_plan};

#[derive(Args, Debug)]
#[command(after_help = "\
Reads the GGUF header only (no tensor data, no disk measurement): the file, the architecture and
its hyper-parameters, the tokenizer, the tensors grouped by role and type, and the placement plan
hypura would use here (the same as `hypura plan`; --ram-budget and the other placement options
apply). Speeds in the plan use the cached machine profile, or assumed rates before
`hypura profile` has run.")]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// The roles tensors are grouped by, in display order.
const ROLES: [&str; 8] = [
    "embedding",
    "attention",
    "norms",
    "ffn",
    "experts",
    "router",
    "output",
    "other",
];

/// The role of a tensor, from its name.
pub fn role(name: &str) -> &'static str {
    if name.starts_with("token_embd") {
        "embedding"
    } else if name.contains("norm") {
        "norms"
    } else if name.starts_with("output.") {
        "output"
    } else if name.contains(".ffn_gate_inp") {
        "router"
    } else if name.contains("_exps.") {
        "experts"
    } else if name.contains(".attn_") {
        "attention"
    } else if name.contains(".ffn_") {
        "ffn"
    } else {
        "other"
    }
}

pub fn inspect(a: InspectArgs) -> Result<()> {
    let path = a.model.resolve(false)?;
    let files = ModelFiles::open(&path)?;
    let header = read_header(&path)?;
    let file_bytes: u64 = files
        .paths
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum();
    let md = &files.metadata;
    let config = files.config();
    // (role, type) → (tensors, bytes)
    let mut groups: BTreeMap<(usize, String), (usize, u64)> = BTreeMap::new();
    for t in &files.tensors {
        let r = ROLES.iter().position(|&x| x == role(&t.name)).unwrap_or(7);
        let g = groups.entry((r, t.ty.name().to_string())).or_default();
        g.0 += 1;
        g.1 += t.n_bytes;
    }
    let tok_model = md.str_opt("tokenizer.ggml.model").ok().flatten();
    let n_tokens = md.str_array("tokenizer.ggml.tokens").map(|t| t.len()).ok();
    let optimized = md.has(ORDER_KEY);
    let expert_reads = config
        .as_ref()
        .ok()
        .and_then(|c| expert_read_info(&files, c));
    let plan = match &config {
        Ok(cfg) => {
            let n_ctx = a.model.ctx_size.unwrap_or_else(|| default_n_ctx(cfg));
            let device = hypura::backend::best_device()?;
            let tiers = a.model.tiers.options()?;
            Some((
                n_ctx,
                plan_model_unmeasured(&files, cfg, n_ctx, &tiers, &device),
            ))
        }
        Err(_) => None,
    };
    if a.json {
        let tensors: Vec<_> = groups
            .iter()
            .map(|((r, ty), (n, b))| serde_json::json!({"role": ROLES[*r], "type": ty, "tensors": n, "bytes": b}))
            .collect();
        let metadata: BTreeMap<&String, String> =
            md.entries.iter().map(|(k, v)| (k, v.summary())).collect();
        let plan = plan.as_ref().map(|(n_ctx, p)| match p {
            Ok((p, profile)) => plan_json(&path, &files, p, *n_ctx, profile.is_some()),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        });
        let j = serde_json::json!({
            "model": path,
            "file": {
                "parts": files.paths, "bytes": file_bytes, "gguf_version": header.version,
                "alignment": header.alignment, "data_offset": header.data_offset,
                "tensor_count": files.tensors.len(), "metadata_count": md.entries.len(),
                "tensor_bytes": files.tensor_bytes(),
            },
            "architecture": md.str_opt("general.architecture").ok().flatten(),
            "config": config.as_ref().ok(),
            "unsupported": config.as_ref().err().map(|e| e.to_string()),
            "tokenizer": { "model": tok_model, "tokens": n_tokens },
            "optimized": optimized,
            "expert_reads": expert_reads.map(|(bytes, merge)| serde_json::json!({
                "slice_bytes": bytes, "adjacent_experts_merge": merge })),
            "tensors_by_role": tensors,
            "metadata": metadata,
            "plan": plan,
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    println!("| file | |");
    println!("| --- | --- |");
    println!("| path | {} |", path.display());
    if files.paths.len() > 1 {
        println!("| split parts | {} |", files.paths.len());
    }
    println!(
        "| size | {} ({file_bytes} bytes) |",
        human_bytes(file_bytes)
    );
    println!(
        "| GGUF | version {}, alignment {}, data at {}, {} tensors, {} metadata keys |",
        header.version,
        header.alignment,
        header.data_offset,
        files.tensors.len(),
        md.entries.len()
    );
    if let Some(name) = md.str_opt("general.name").ok().flatten() {
        println!("| name | {name} |");
    }
    match &config {
        Ok(c) => print_config(c),
        Err(e) => println!("| architecture | not runnable by hypura: {e} |"),
    }
    println!(
        "| tokenizer | {} ({} tokens) |",
        tok_model.unwrap_or("none"),
        n_tokens.map_or("?".into(), |n| n.to_string())
    );
    if let Some((bytes, merge)) = expert_reads {
        println!(
            "| expert reads | slices of {} / {} / {} (gate / up / down); adjacent experts {} |",
            human_bytes(bytes[0]),
            human_bytes(bytes[1]),
            human_bytes(bytes[2]),
            if merge {
                "merge into one read per tensor"
            } else {
                "are read separately (slices not block-aligned: `hypura optimize` aligns them)"
            }
        );
    }
    if optimized {
        println!("| expert order | rewritten by `hypura optimize` ({ORDER_KEY}) |");
    }
    println!();
    println!("| role | type | tensors | bytes |");
    println!("| --- | --- | ---: | ---: |");
    for ((r, ty), (n, b)) in &groups {
        println!("| {} | {ty} | {n} | {} |", ROLES[*r], human_bytes(*b));
    }
    println!(
        "| total | | {} | {} |",
        files.tensors.len(),
        human_bytes(files.tensor_bytes())
    );
    if let Some((n_ctx, p)) = plan {
        println!();
        match p {
            Ok((p, profile)) => print_plan(&files, &p, n_ctx, profile.is_some()),
            Err(e) => println!("placement plan: {e}"),
        }
    }
    Ok(())
}

fn print_config(c: &ModelConfig) {
    println!(
        "| architecture | {}{} |",
        c.arch.gguf_name(),
        if c.is_moe() {
            format!(
                " (mixture of experts: {} experts, {} per token)",
                c.n_expert, c.n_expert_used
            )
        } else {
            String::new()
        }
    );
    println!(
        "| dimensions | {} layers, embedding {}, feed-forward {}, vocabulary {} |",
        c.n_layer, c.n_embd, c.n_ff, c.n_vocab
    );
    println!(
        "| attention | {} heads, {} KV heads, head dim {} |",
        c.n_head, c.n_head_kv, c.head_dim
    );
    println!(
        "| RoPE | {:?}, {} dims, θ {}, scale {} |",
        c.rope_style, c.rope_dim, c.rope_freq_base, c.rope_freq_scale
    );
    println!(
        "| context / RMS eps | {} tokens trained / {} |",
        c.n_ctx_train, c.rms_eps
    );
}

/// For a MoE file: the bytes of one expert's gate, up and down slices (first MoE layer), and
/// whether two adjacent experts of a tensor are fetched in one read.
fn expert_read_info(files: &ModelFiles, cfg: &ModelConfig) -> Option<([u64; 3], bool)> {
    if !cfg.is_moe() {
        return None;
    }
    let l = files
        .tensors
        .iter()
        .find(|t| t.name.contains("_exps."))
        .and_then(|t| layer_of(&t.name))?;
    let get = |p: &str| files.tensor(&format!("blk.{l}.ffn_{p}_exps.weight"));
    let [g, u, d] = [get("gate")?, get("up")?, get("down")?];
    let n = cfg.n_expert as u64;
    let layout = ExpertLayout {
        file: [g.file, u.file, d.file],
        offset: [g.offset, u.offset, d.offset],
        stride: [g.n_bytes / n, u.n_bytes / n, d.n_bytes / n],
    };
    Some((
        layout.stride,
        cfg.n_expert > 1 && layout.reads(&[0, 1]) == 3,
    ))
}
