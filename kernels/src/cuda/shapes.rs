//! How the decoder's kernels are launched for a shape: the choices measured on an H200
//! (docs/cuda.md; `kernels/cuda/bench.cu` times the variants).

use candle_core::cuda_backend::cudarc::driver::LaunchConfig;

/// Warps per mat-vec block; `MV_WARPS` in decode.cu.
pub(super) const MV_WARPS: u32 = 4;

/// How a mat-vec launch maps rows to warps (kernels `<name>_<rows_per_group>_<k_split>` in
/// decode.cu): each group of `k_split` warps owns `rows_per_group` rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct MvShape {
    rows_per_group: u32,
    k_split: u32,
}

impl MvShape {
    /// Measured on an H200 (docs/cuda.md, kernels/cuda/bench.cu): two rows per warp share the
    /// activation loads once there are enough rows to keep the GPU full (≥ 4096), each row in
    /// one warp (a warp iteration covers 8 super-blocks: splitting 16 of them over two warps was
    /// slower for every such shape); fewer rows are single, split over two warps so that more
    /// warps keep loads in flight. A launch of several matrices (q, k, v) takes two rows only if
    /// each has an even count.
    pub fn pick(rows: &[usize]) -> MvShape {
        let total: usize = rows.iter().sum();
        let pairs = total >= 4096 && rows.iter().all(|r| r.is_multiple_of(2));
        MvShape {
            rows_per_group: if pairs { 2 } else { 1 },
            k_split: if pairs { 1 } else { 2 },
        }
    }

    pub fn kernel(self, base: &str) -> String {
        format!("{base}_{}_{}", self.rows_per_group, self.k_split)
    }

    /// The plain mat-vec for rows of the type `suffix` names (`MvShape::kernel` of "matvec",
    /// but row pairs have a kernel per format: `matvec_2_1_<suffix>`).
    pub fn matvec_kernel(self, suffix: &str) -> String {
        match (self.rows_per_group, self.k_split) {
            (2, 1) => format!("matvec_2_1_{suffix}"),
            _ => self.kernel("matvec"),
        }
    }

    pub fn cfg(self, rows: usize) -> LaunchConfig {
        let rows_per_block = MV_WARPS / self.k_split * self.rows_per_group;
        LaunchConfig {
            grid_dim: ((rows as u32).div_ceil(rows_per_block), 1, 1),
            block_dim: (32, MV_WARPS, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// How one step's attention is launched; the step's graph bakes it in, so the decoder keeps a
/// graph per shape and picks by position (measured on an H200: docs/cuda.md, bench.cu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct AttShape {
    /// `attention_<warps>_<keys per warp iteration>` in decode.cu.
    pub kernel: &'static str,
    pub warps: u32,
    /// Blocks per head launched; those a position does not need exit at once.
    pub n_split: u32,
    /// Keys per block before a head's keys are split over one more block.
    pub chunk_min: u32,
}

/// Blocks per head for long contexts.
pub(super) const ATT_LONG_SPLIT: u32 = 16;

impl AttShape {
    /// Up to 256 keys: one block of 32 warps per head, no merge. Up to 512: two such blocks and
    /// the merge (idle blocks are not free: few of them). Beyond: 16 blocks of 8 warps per head.
    /// Each warp takes four keys a run (their K and V rows loaded together), two for heads
    /// over 128 wide and one in 32-warp blocks (`_256` kernels: twice the registers a row).
    pub fn for_keys(n_kv: usize, head_dim: usize) -> AttShape {
        let wide = head_dim > 128;
        let (kernel, warps, n_split, chunk_min) = match (AttShape::regime(n_kv), wide) {
            (0, false) => ("attention_32_4", 32, 1, 256),
            (0, true) => ("attention_32_1_256", 32, 1, 256),
            (1, false) => ("attention_32_4", 32, 2, 256),
            (1, true) => ("attention_32_1_256", 32, 2, 256),
            (_, false) => ("attention_8_4", 8, ATT_LONG_SPLIT, 64),
            (_, true) => ("attention_8_2_256", 8, ATT_LONG_SPLIT, 64),
        };
        AttShape {
            kernel,
            warps,
            n_split,
            chunk_min,
        }
    }

    /// Index of the shape (and graph) for `n_kv` keys.
    pub fn regime(n_kv: usize) -> usize {
        match n_kv {
            0..=256 => 0,
            257..=512 => 1,
            _ => 2,
        }
    }
}
