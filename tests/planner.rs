//! The planner as a pure function over hand-written inventories and machines.

use hypura::gguf::{Arch, ModelConfig, RopeStyle, TensorEntry, TensorType};
use hypura::plan::{
    expert_bytes, plan, Budgets, ExpertOptions, Mode, Override, PlanInput, RamCompute, Rates,
    TierKind,
};

const MIB: u64 = 1 << 20;

fn config(n_layer: usize) -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        name: "hand-written".into(),
        n_vocab: 32000,
        n_embd: 2048,
        n_layer,
        n_ff: 5632,
        n_head: 32,
        n_head_kv: 4,
        head_dim: 64,
        n_ctx_train: 4096,
        rms_eps: 1e-5,
        rope_style: RopeStyle::Interleaved,
        rope_dim: 64,
        rope_freq_base: 10000.0,
        rope_freq_scale: 1.0,
        n_expert: 0,
        n_expert_used: 0,
    }
}

/// A llama-shaped tensor table laid out like a GGUF file (embeddings, then layer by layer).
fn inventory(cfg: &ModelConfig, ty: TensorType) -> Vec<TensorEntry> {
    let (d, ff, v) = (cfg.n_embd as u64, cfg.n_ff as u64, cfg.n_vocab as u64);
    let kv = (cfg.n_head_kv * cfg.head_dim) as u64;
    let mut out = Vec::new();
    let mut off = 4096u64;
    let mut add = |name: String, dims: Vec<u64>, ty: TensorType| {
        let n: u64 = dims.iter().product();
        let n_bytes = n / ty.block_elems() as u64 * ty.block_bytes() as u64;
        out.push(TensorEntry {
            name,
            ty,
            dims,
            file: 0,
            offset: off,
            n_bytes,
        });
        off += n_bytes.div_ceil(32) * 32;
    };
    add("token_embd.weight".into(), vec![d, v], ty);
    for i in 0..cfg.n_layer {
        add(
            format!("blk.{i}.attn_norm.weight"),
            vec![d],
            TensorType::F32,
        );
        add(format!("blk.{i}.attn_q.weight"), vec![d, d], ty);
        add(format!("blk.{i}.attn_k.weight"), vec![d, kv], ty);
        add(format!("blk.{i}.attn_v.weight"), vec![d, kv], ty);
        add(format!("blk.{i}.attn_output.weight"), vec![d, d], ty);
        add(format!("blk.{i}.ffn_norm.weight"), vec![d], TensorType::F32);
        add(format!("blk.{i}.ffn_gate.weight"), vec![d, ff], ty);
        add(format!("blk.{i}.ffn_up.weight"), vec![d, ff], ty);
        add(format!("blk.{i}.ffn_down.weight"), vec![ff, d], ty);
    }
    add("output_norm.weight".into(), vec![d], TensorType::F32);
    add("output.weight".into(), vec![d, v], ty);
    out
}

const RATES: Rates = Rates {
    mem_read_bps: 20e9,
    disk_read_bps: 1.5e9,
    device_read_bps: 3e12,
    upload_bps: 50e9,
};

fn input<'a>(
    t: &'a [TensorEntry],
    cfg: &'a ModelConfig,
    ram: u64,
    overrides: &'a [Override],
) -> PlanInput<'a> {
    PlanInput {
        tensors: t,
        config: cfg,
        n_ctx: 512,
        budgets: Budgets {
            ram_bytes: ram,
            device_bytes: None,
        },
        rates: RATES,
        overrides,
        lookahead: None,
        experts: ExpertOptions::default(),
        ram_compute: None,
        routing: None,
    }
}

/// Expert-streaming's tiers: experts on NVMe (through the cache), the embedding mapped in RAM,
/// everything else on the device.
fn assert_experts_stream(p: &hypura::plan::Plan, t: &[TensorEntry]) {
    for x in t {
        let want = if x.name.contains("_exps.") {
            TierKind::Nvme
        } else if x.name.starts_with("token_embd") {
            TierKind::Ram
        } else {
            TierKind::Device
        };
        assert_eq!(p.placement.tier(&x.name), want, "{}", x.name);
    }
}

#[test]
fn a_model_that_fits_is_full_resident() {
    let cfg = config(16);
    let t = inventory(&cfg, TensorType::Q8_0);
    let total: u64 = t.iter().map(|x| x.n_bytes).sum();
    let p = plan(&input(&t, &cfg, 16 << 30, &[])).unwrap();
    assert_eq!(p.mode, Mode::FullResident);
    assert!(t
        .iter()
        .all(|x| p.placement.tier(&x.name) == TierKind::Device));
    assert_eq!(p.bytes_per_token.nvme, 0);
    assert!(p.ram_needed_bytes > total && p.ram_needed_bytes <= 16 << 30);
    // Predicted speed: every weight byte except the unused embedding rows, at memory bandwidth.
    let per_token = (total - t[0].n_bytes + t[0].n_bytes / 32000) as f64;
    assert!((p.predicted_tok_s - RATES.mem_read_bps / per_token).abs() / p.predicted_tok_s < 0.01);
}

#[test]
fn a_tight_budget_streams_the_ffn_and_keeps_what_fits() {
    let cfg = config(16);
    let t = inventory(&cfg, TensorType::Q8_0);
    let total: u64 = t.iter().map(|x| x.n_bytes).sum();
    let budget = total * 3 / 4;
    let p = plan(&input(&t, &cfg, budget, &[])).unwrap();
    assert_eq!(p.mode, Mode::FfnStreaming);
    assert!(
        p.ram_needed_bytes <= budget,
        "{} > {budget}",
        p.ram_needed_bytes
    );
    assert_eq!(p.placement.tier("token_embd.weight"), TierKind::Ram);
    for x in &t {
        let tier = p.placement.tier(&x.name);
        if x.name.contains("attn") || x.name.contains("norm") || x.name == "output.weight" {
            assert_eq!(tier, TierKind::Device, "{}", x.name);
        }
    }
    let streamed: Vec<usize> = (0..16)
        .filter(|l| p.placement.tier(&format!("blk.{l}.ffn_up.weight")) == TierKind::Nvme)
        .collect();
    assert!(
        !streamed.is_empty() && streamed.len() < 16,
        "some FFN layers stream, some stay: {streamed:?}"
    );
    // One read per streamed layer (gate, up, down lie together), each read once per token.
    assert_eq!(p.placement.groups.len(), streamed.len());
    let ffn_layer = t
        .iter()
        .filter(|x| x.name.starts_with("blk.0.ffn_") && !x.name.contains("norm"))
        .map(|x| x.n_bytes)
        .sum::<u64>();
    assert!(p.bytes_per_token.nvme >= ffn_layer * streamed.len() as u64);
    assert!(p.pool_slots >= 2 && p.placement.lookahead >= 1);
    // I/O-bound: the prediction is the disk bound.
    let bound = RATES.disk_read_bps / p.bytes_per_token.nvme as f64;
    assert!(
        (p.predicted_tok_s - bound).abs() / bound < 0.01,
        "{} vs {bound}",
        p.predicted_tok_s
    );
    // A larger budget keeps more layers resident.
    let p2 = plan(&input(&t, &cfg, budget + 4 * ffn_layer, &[])).unwrap();
    assert!(p2.bytes_per_token.nvme < p.bytes_per_token.nvme);
}

#[test]
fn a_budget_too_small_is_refused_with_the_smallest_that_works() {
    let cfg = config(8);
    let t = inventory(&cfg, TensorType::Q4_K);
    let err = plan(&input(&t, &cfg, 64 * MIB, &[]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("too small") && err.contains("needs at least"),
        "{err}"
    );
    // The number it names works.
    let needed = err
        .split("needs at least ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    let unit = err
        .split("needs at least ")
        .nth(1)
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .trim_end_matches(|c: char| !c.is_alphabetic());
    let bytes = hypura::plan::parse_bytes(&format!("{needed}{unit}")).unwrap();
    let p = plan(&input(&t, &cfg, bytes + MIB, &[])).unwrap();
    assert_eq!(p.mode, Mode::FfnStreaming);
}

#[test]
fn overrides_come_first_and_are_reported() {
    let cfg = config(4);
    let t = inventory(&cfg, TensorType::Q8_0);
    let o = [
        Override::parse(r"blk\.[01]\.ffn_.*=nvme").unwrap(),
        Override::parse("output.weight=ram").unwrap(),
    ];
    let p = plan(&input(&t, &cfg, 64 << 30, &o)).unwrap();
    assert_eq!(p.placement.tier("blk.0.ffn_gate.weight"), TierKind::Nvme);
    assert_eq!(p.placement.tier("blk.1.ffn_norm.weight"), TierKind::Nvme);
    assert_eq!(p.placement.tier("blk.2.ffn_gate.weight"), TierKind::Device);
    assert_eq!(p.placement.tier("output.weight"), TierKind::Ram);
    assert!(
        p.decisions[0].contains("blk") && p.decisions[0].contains("nvme"),
        "{:?}",
        p.decisions
    );
    assert!(Override::parse("x=floppy").is_err());
    assert!(Override::parse("(=ram").is_err());
}

#[test]
fn sizes_parse() {
    use hypura::plan::parse_bytes;
    assert_eq!(parse_bytes("3GiB").unwrap(), 3 << 30);
    assert_eq!(parse_bytes("512 MiB").unwrap(), 512 << 20);
    assert_eq!(parse_bytes("2G").unwrap(), 2 << 30);
    assert_eq!(parse_bytes("1.5GB").unwrap(), 1_500_000_000);
    assert!(parse_bytes("lots").is_err() && parse_bytes("3 parsecs").is_err());
}

#[test]
fn when_the_ffn_alone_is_not_enough_whole_layers_stream() {
    let cfg = config(16);
    let t = inventory(&cfg, TensorType::Q8_0);
    // Find the FFN-only minimum, then ask for less.
    let err = plan(&input(&t, &cfg, 1, &[])).unwrap_err().to_string();
    assert!(err.contains("needs at least"), "{err}");
    let total: u64 = t.iter().map(|x| x.n_bytes).sum();
    let mut budget = total / 2;
    let mut saw_layers = false;
    while budget > 64 * MIB {
        match plan(&input(&t, &cfg, budget, &[])) {
            Ok(p) => {
                assert!(p.ram_needed_bytes <= budget);
                if p.placement.tier("blk.3.attn_q.weight") == TierKind::Nvme {
                    saw_layers = true;
                    assert!(
                        p.decisions.iter().any(|d| d.contains("attention")),
                        "{:?}",
                        p.decisions
                    );
                    assert_eq!(
                        p.placement.tier("blk.3.attn_norm.weight"),
                        TierKind::Device,
                        "norms stay"
                    );
                }
            }
            Err(e) => assert!(e.to_string().contains("needs at least")),
        }
        budget -= 16 * MIB;
    }
    assert!(saw_layers, "some budget should need whole-layer streaming");
}

/// A Mixtral-shaped table: the dense FFN of each layer replaced by a router and merged experts.
fn moe_inventory(cfg: &ModelConfig, ty: TensorType) -> Vec<TensorEntry> {
    let (d, ff, n) = (cfg.n_embd as u64, cfg.n_ff as u64, cfg.n_expert as u64);
    let mut out = Vec::new();
    let mut off = 4096u64;
    for t in inventory(cfg, ty) {
        if t.name.contains(".ffn_gate.")
            || t.name.contains(".ffn_up.")
            || t.name.contains(".ffn_down.")
        {
            continue;
        }
        let layer_norm = t.name.ends_with("ffn_norm.weight");
        let name = t.name.clone();
        let mut push = |name: String, dims: Vec<u64>, ty: TensorType| {
            let n_el: u64 = dims.iter().product();
            let n_bytes = n_el / ty.block_elems() as u64 * ty.block_bytes() as u64;
            out.push(TensorEntry {
                name,
                ty,
                dims,
                file: 0,
                offset: off,
                n_bytes,
            });
            off += n_bytes.div_ceil(32) * 32;
        };
        push(name.clone(), t.dims.clone(), t.ty);
        if layer_norm {
            let i = hypura::plan::layer_of(&name).unwrap();
            push(
                format!("blk.{i}.ffn_gate_inp.weight"),
                vec![d, n],
                TensorType::F32,
            );
            push(format!("blk.{i}.ffn_gate_exps.weight"), vec![d, ff, n], ty);
            push(format!("blk.{i}.ffn_up_exps.weight"), vec![d, ff, n], ty);
            push(format!("blk.{i}.ffn_down_exps.weight"), vec![ff, d, n], ty);
        }
    }
    out
}

fn moe_config() -> ModelConfig {
    ModelConfig {
        n_expert: 8,
        n_expert_used: 2,
        ..config(8)
    }
}

#[test]
fn a_moe_that_does_not_fit_streams_its_experts_through_a_cache() {
    let cfg = moe_config();
    let t = moe_inventory(&cfg, TensorType::Q4_K);
    let total: u64 = t.iter().map(|x| x.n_bytes).sum();
    let unit = expert_bytes(&t, cfg.n_expert);
    assert_eq!(
        unit,
        3 * 2048 * 5632 / 256 * 144,
        "one Q4_K expert: gate + up + down"
    );
    let budget = total / 3;
    let p = plan(&input(&t, &cfg, budget, &[])).unwrap();
    assert_eq!(p.mode, Mode::ExpertStreaming);
    assert_experts_stream(&p, &t);
    // Experts never go through stream groups: the cache reads them.
    assert!(p.placement.groups.is_empty());
    let c = p.placement.expert_cache;
    assert!(c.slots >= cfg.n_expert_used && c.slots < 8 * 8, "{c:?}");
    assert!(p.ram_needed_bytes <= budget);
    // One more slot would not have fit.
    assert!(p.ram_needed_bytes + p.expert_slot_bytes > budget);
    // Uniform routing: a used expert is cached with probability slots / 64.
    let miss = 1.0 - c.slots as f64 / 64.0;
    let want = 8.0 * 2.0 * unit as f64 * miss;
    assert!((p.bytes_per_token.nvme as f64 - want).abs() <= 1.0 + want * 1e-9);
    assert!(p.predicted_tok_s > 0.0);
}

#[test]
fn a_moe_budget_below_two_experts_is_refused_with_the_minimum() {
    let cfg = moe_config();
    let t = moe_inventory(&cfg, TensorType::Q4_K);
    let base = plan(&input(&t, &cfg, 64 << 30, &[])).unwrap();
    assert_eq!(base.mode, Mode::FullResident);
    let err = plan(&input(&t, &cfg, 200 * MIB, &[]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("too small for this MoE model"), "{err}");
    assert!(err.contains("cache of 2 experts"), "{err}");
    // The minimum it names works.
    let min = err.split("needs at least ").nth(1).unwrap();
    let min =
        hypura::plan::parse_bytes(min.split(' ').take(2).collect::<String>().as_str()).unwrap();
    let p = plan(&input(&t, &cfg, min + MIB, &[])).unwrap();
    assert_eq!(p.mode, Mode::ExpertStreaming);
    assert_eq!(p.placement.expert_cache.slots, 2);
}

#[test]
fn expert_cache_options_are_honoured() {
    let cfg = moe_config();
    let t = moe_inventory(&cfg, TensorType::Q4_K);
    let total: u64 = t.iter().map(|x| x.n_bytes).sum();
    let mut i = input(&t, &cfg, total / 2, &[]);
    i.experts = ExpertOptions {
        slots: Some(3),
        policy: Some(hypura::storage::EvictionPolicy::Lru),
        no_prefetch: true,
    };
    let p = plan(&i).unwrap();
    let c = p.placement.expert_cache;
    assert_eq!(
        (c.slots, c.policy, c.prefetch),
        (3, hypura::storage::EvictionPolicy::Lru, false)
    );
    i.experts.slots = Some(10_000);
    let err = plan(&i).unwrap_err().to_string();
    assert!(err.contains("--expert-cache"), "{err}");
}

fn gpu_input<'a>(
    t: &'a [TensorEntry],
    cfg: &'a ModelConfig,
    ram: u64,
    device: u64,
) -> PlanInput<'a> {
    let mut i = input(t, cfg, ram, &[]);
    i.budgets.device_bytes = Some(device);
    i
}

#[test]
fn a_model_that_fits_the_gpu_is_full_resident_on_it() {
    let cfg = config(16);
    let t = inventory(&cfg, TensorType::Q8_0);
    let total: u64 = t.iter().map(|x| x.n_bytes).sum();
    // Half the model's size in RAM: on a GPU plan the weights live in device memory.
    let p = plan(&gpu_input(&t, &cfg, total / 2, 16 << 30)).unwrap();
    assert_eq!(p.mode, Mode::FullResident);
    assert!(t
        .iter()
        .all(|x| p.placement.tier(&x.name) == TierKind::Device));
    assert!(p.device_needed_bytes > total && p.device_needed_bytes <= 16 << 30);
    assert!(p.ram_needed_bytes <= total / 2);
    // Every weight byte but the unused embedding rows, at device bandwidth.
    let per_token = (total - t[0].n_bytes + t[0].n_bytes / 32000) as f64;
    let want = RATES.device_read_bps / per_token;
    assert!(
        (p.predicted_tok_s - want).abs() / want < 0.01,
        "{} vs {want}",
        p.predicted_tok_s
    );
}

#[test]
fn a_small_gpu_holds_the_first_layers_and_the_rest_go_to_ram_then_disk() {
    let cfg = config(16);
    let t = inventory(&cfg, TensorType::Q8_0);
    let total: u64 = t.iter().map(|x| x.n_bytes).sum();
    // The device also keeps upload slots for three off-device layers, and RAM the stream pool.
    let (device, ram) = (total * 3 / 4, total * 3 / 4);
    let p = plan(&gpu_input(&t, &cfg, ram, device)).unwrap();
    assert_eq!(p.mode, Mode::LayerOffload);
    assert!(
        p.device_needed_bytes <= device,
        "{} > {device}",
        p.device_needed_bytes
    );
    assert!(p.ram_needed_bytes <= ram, "{} > {ram}", p.ram_needed_bytes);
    assert_eq!(p.placement.tier("token_embd.weight"), TierKind::Ram);
    assert_eq!(p.placement.tier("output.weight"), TierKind::Device);
    // Whole layers, in order: device, then RAM, then disk.
    let tiers: Vec<TierKind> = (0..16)
        .map(|l| {
            let tier = p.placement.tier(&format!("blk.{l}.attn_q.weight"));
            assert_eq!(
                tier,
                p.placement.tier(&format!("blk.{l}.ffn_down.weight")),
                "layer {l}"
            );
            tier
        })
        .collect();
    let rank = |k: &TierKind| match k {
        TierKind::Device => 0,
        TierKind::Ram => 1,
        TierKind::Nvme => 2,
    };
    assert!(
        tiers.windows(2).all(|w| rank(&w[0]) <= rank(&w[1])),
        "{tiers:?}"
    );
    for k in [TierKind::Device, TierKind::Ram, TierKind::Nvme] {
        assert!(tiers.contains(&k), "no layer on {k:?}: {tiers:?}");
    }
    assert!(p.bytes_per_token.nvme > 0 && p.bytes_per_token.ram > 0);
}

/// RAM-tier layers on a GPU are multiplied where their bytes move faster: uploaded when the bus
/// outpaces host memory, on the host when host memory is faster; `--ram-compute` overrides.
#[test]
fn ram_tier_layers_are_computed_where_the_rates_say_and_the_plan_says_so() {
    let cfg = config(16);
    let t = inventory(&cfg, TensorType::Q8_0);
    let total: u64 = t.iter().map(|x| x.n_bytes).sum();
    // Room in RAM for every layer the device cannot hold: nothing streams from disk, so the
    // prediction is the bus or host memory, not the disk.
    let (device, ram) = (total * 3 / 4, total * 2);
    let decided = |p: &hypura::plan::Plan| {
        p.decisions
            .iter()
            .find(|d| d.starts_with("RAM-tier layers are"))
            .cloned()
            .unwrap_or_default()
    };
    // RATES: the bus (50 GB/s) outpaces host memory (20 GB/s).
    let p = plan(&gpu_input(&t, &cfg, ram, device)).unwrap();
    assert!(p.bytes_per_token.ram > 0 && p.bytes_per_token.nvme == 0);
    assert_eq!(p.placement.ram_compute, RamCompute::Upload);
    assert!(decided(&p).contains("uploaded"), "{}", decided(&p));

    let mut fast_host = gpu_input(&t, &cfg, ram, device);
    fast_host.rates.mem_read_bps = 80e9;
    let host = plan(&fast_host).unwrap();
    assert_eq!(host.placement.ram_compute, RamCompute::Host);
    assert!(decided(&host).contains("on the host"), "{}", decided(&host));
    // The same tiers either way; only the RAM bytes' rate changes, so the prediction improves.
    assert_eq!(host.placement.tiers, p.placement.tiers);
    assert!(host.predicted_tok_s > p.predicted_tok_s);

    fast_host.ram_compute = Some(RamCompute::Upload);
    let forced = plan(&fast_host).unwrap();
    assert_eq!(forced.placement.ram_compute, RamCompute::Upload);
    assert!(decided(&forced).contains("--ram-compute"));

    // Nothing in RAM: nothing to decide.
    let fits = plan(&gpu_input(&t, &cfg, total, total * 2)).unwrap();
    assert_eq!(fits.placement.ram_compute, RamCompute::Upload);
    assert!(decided(&fits).is_empty());
}

#[test]
fn a_device_budget_below_the_kv_cache_is_refused_with_the_minimum() {
    let cfg = config(16);
    let t = inventory(&cfg, TensorType::Q8_0);
    let err = plan(&gpu_input(&t, &cfg, 16 << 30, 8 * MIB))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("device budget of 8.0 MiB is too small"),
        "{err}"
    );
    assert!(err.contains("need at least"), "{err}");
}

/// The seed's scenario: Llama-3-70B-shaped Q4_K weights (~40 GiB) with a 22 GiB GPU and 8 GiB of RAM.
#[test]
fn a_70b_on_a_22_gib_gpu_with_8_gib_of_ram_splits_by_layer() {
    let cfg = ModelConfig {
        n_vocab: 128256,
        n_embd: 8192,
        n_layer: 80,
        n_ff: 28672,
        n_head: 64,
        n_head_kv: 8,
        head_dim: 128,
        rope_dim: 128,
        ..config(80)
    };
    let t = inventory(&cfg, TensorType::Q4_K);
    let total: u64 = t.iter().map(|x| x.n_bytes).sum();
    let (device, ram) = (22u64 << 30, 8u64 << 30);
    let p = plan(&gpu_input(&t, &cfg, ram, device)).unwrap();
    assert_eq!(p.mode, Mode::LayerOffload);
    assert!(p.device_needed_bytes <= device && p.ram_needed_bytes <= ram);
    let count = |k: TierKind| {
        (0..80)
            .filter(|l| p.placement.tier(&format!("blk.{l}.ffn_up.weight")) == k)
            .count()
    };
    let (d, r, n) = (
        count(TierKind::Device),
        count(TierKind::Ram),
        count(TierKind::Nvme),
    );
    eprintln!(
        "70B ({:.1} GiB): {d} layers on the GPU, {r} in RAM, {n} streamed; device {:.1} GiB, RAM {:.1} GiB; {}",
        total as f64 / (1u64 << 30) as f64,
        p.device_needed_bytes as f64 / (1u64 << 30) as f64,
        p.ram_needed_bytes as f64 / (1u64 << 30) as f64,
        p.decisions.join("; ")
    );
    assert_eq!(d + r + n, 80);
    // Greedy and full: one more layer would overflow the GPU, and one more the RAM.
    let layer: u64 = t
        .iter()
        .filter(|x| x.name.starts_with("blk.0.") && x.dims.len() > 1)
        .map(|x| x.n_bytes)
        .sum();
    assert!(d > 0 && r > 0 && n > 0, "{d} / {r} / {n}");
    assert!(
        p.device_needed_bytes + layer > device,
        "room for another GPU layer"
    );
    assert!(
        p.ram_needed_bytes + layer > ram,
        "room for another RAM layer"
    );
    assert_eq!(
        p.bytes_per_token.nvme,
        p.placement.groups.iter().map(|g| g.len as u64).sum::<u64>()
    );
}

/// The seed's MoE scenario on a GPU: a Mixtral-8x7B-shaped model (Q5_K experts, ~30 GiB) with a
/// 22 GiB device budget and 8 GiB of RAM: non-expert weights on the device, experts through a
/// device cache that takes the rest of the device budget and a host cache that takes the RAM.
#[test]
fn a_mixtral_on_a_22_gib_gpu_streams_experts_through_device_and_host_caches() {
    let cfg = ModelConfig {
        n_embd: 4096,
        n_layer: 32,
        n_ff: 14336,
        n_head: 32,
        n_head_kv: 8,
        head_dim: 128,
        rope_dim: 128,
        n_expert: 8,
        n_expert_used: 2,
        ..config(32)
    };
    let t = moe_inventory(&cfg, TensorType::Q5_K);
    let total: u64 = t.iter().map(|x| x.n_bytes).sum();
    assert!(total > 28 << 30, "{total}");
    let (device, ram) = (22u64 << 30, 8u64 << 30);
    let p = plan(&gpu_input(&t, &cfg, ram, device)).unwrap();
    assert_eq!(p.mode, Mode::ExpertStreaming);
    assert_experts_stream(&p, &t);
    let c = p.placement.expert_cache;
    let unit = expert_bytes(&t, cfg.n_expert);
    eprintln!(
        "Mixtral ({:.1} GiB): device cache {} + host cache {} of 256 experts × {:.0} MiB; device {:.2} GiB, RAM {:.2} GiB; {}",
        total as f64 / (1u64 << 30) as f64,
        c.device_slots,
        c.slots,
        unit as f64 / (1u64 << 20) as f64,
        p.device_needed_bytes as f64 / (1u64 << 30) as f64,
        p.ram_needed_bytes as f64 / (1u64 << 30) as f64,
        p.decisions.join("; ")
    );
    assert!(p.device_needed_bytes <= device && p.ram_needed_bytes <= ram);
    // Both caches take what their budget leaves: one more slot would not fit either.
    assert!(
        p.device_needed_bytes + unit > device,
        "room for another device slot"
    );
    assert!(
        p.ram_needed_bytes + p.expert_slot_bytes > ram,
        "room for another host slot"
    );
    assert!(c.device_slots > 100 && c.slots > 30, "{c:?}");
    // Uniform routing: a used expert is on the device with probability device_slots / 256, so
    // per token 64 × (1 − that) experts cross the bus.
    let used = 32.0 * 2.0 * unit as f64;
    let want_upload = used * (1.0 - c.device_slots as f64 / 256.0);
    assert!((p.bytes_per_token.ram as f64 - want_upload).abs() / want_upload < 0.01);
    // The routing earlier runs saw, when given, sets the predicted hit rates: skewed routing
    // (Zipf-like, 1 / (e + 1)^1.5 per layer) keeps more uses on the device than uniform.
    let zipf: Vec<f64> = (0..8).map(|e| 1.0 / ((e + 1) as f64).powf(1.5)).collect();
    let skewed: Vec<Vec<f64>> = vec![zipf; 32];
    let mut i = gpu_input(&t, &cfg, ram, device);
    i.routing = Some(&skewed);
    let s = plan(&i).unwrap();
    // The routing changes predictions, not placements.
    assert_eq!(
        (s.device_needed_bytes, s.ram_needed_bytes),
        (p.device_needed_bytes, p.ram_needed_bytes)
    );
    let cs = s.placement.expert_cache;
    assert_eq!((cs.slots, cs.device_slots), (c.slots, c.device_slots));
    assert!(t
        .iter()
        .all(|x| s.placement.tier(&x.name) == p.placement.tier(&x.name)));
    // The device keeps each layer's most used experts: device_slots / 32 per layer (LFU).
    let per_layer = c.device_slots / 32;
    let sum: f64 = (0..8).map(|e| 1.0 / ((e + 1) as f64).powf(1.5)).sum();
    let top: f64 = (0..per_layer)
        .map(|e| 1.0 / ((e + 1) as f64).powf(1.5))
        .sum();
    let extra = (c.device_slots % 32) as f64 / 32.0 / ((per_layer + 1) as f64).powf(1.5);
    let want_skewed = used * (1.0 - (top + extra) / sum);
    assert!(
        (s.bytes_per_token.ram as f64 - want_skewed).abs() / want_skewed < 0.01,
        "{} vs {want_skewed}",
        s.bytes_per_token.ram
    );
    assert!(s.bytes_per_token.ram < p.bytes_per_token.ram / 2);
    assert!(s.predicted_tok_s > p.predicted_tok_s);
    assert!(s
        .decisions
        .iter()
        .any(|d| d.contains("routing earlier runs observed")));
    // Uniform shares given explicitly predict what no routing does.
    let flat = vec![vec![0.125; 8]; 32];
    i.routing = Some(&flat);
    let u = plan(&i).unwrap();
    assert_eq!(u.bytes_per_token, p.bytes_per_token);
    // Too small a device for two experts next to the resident weights: refused, with the minimum.
    let err = plan(&gpu_input(&t, &cfg, ram, 1 << 30))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("device budget of 1.00 GiB is too small"),
        "{err}"
    );
}
