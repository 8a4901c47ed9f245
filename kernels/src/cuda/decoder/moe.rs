//! Mixture-of-experts blocks of the [`Decoder`]: routing on the device, the chosen experts'
//! kernels (from the resident experts' address table, or handed over one by one), the mix; and
//! [`MoeStep`], the step driven block by block when the caller's caches hold the experts.

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

use super::{driver, grid1, AttShape, Decoder, MvShape, NormIn, MV_WARPS};
use crate::cuda::{DeviceMatrix, ExpertMatrices, FfnSpec};
use crate::KernelError;

impl Decoder {
    /// MoE block `i` with every expert resident: route, the chosen experts from the block's
    /// address table, the mix. No host involvement (so it can be captured into a graph).
    pub(super) fn resident_moe(
        &self,
        i: usize,
        router: &DeviceMatrix,
        k: usize,
        n_ff: usize,
        experts: &[ExpertMatrices],
    ) -> Result<(), KernelError> {
        let table = self.layers[i].expert_table.as_ref().map_or(0, |t| t.ptr);
        let types = experts
            .first()
            .map(ExpertMatrices::types)
            .unwrap_or_default();
        self.route(router, k)?;
        self.experts(types, table, [0; 3], 0, k, n_ff)?;
        self.combine(k)
    }

    /// The `k` expert ids `moe_route` chose, once the stream has produced them (waits for it).
    fn routing(&mut self, k: usize) -> Result<Vec<usize>, KernelError> {
        let host = self
            .route_host
            .as_mut()
            .ok_or_else(|| KernelError("no host buffer for the routing".into()))?;
        self.stream
            .memcpy_dtoh(&self.route.slice, host)
            .map_err(driver("routing download"))?;
        self.stream.synchronize().map_err(driver("synchronize"))?;
        let r = host.as_slice().map_err(driver("routing"))?;
        Ok(r[..k].iter().map(|&id| id as usize).collect())
    }

    /// Starts one token of a mixture-of-experts model at position `pos`; drive it with
    /// [`MoeStep::advance`] and [`MoeStep::expert`] to the end, then [`MoeStep::finish`].
    pub fn begin_moe(
        &mut self,
        token: u32,
        pos: usize,
        row: Option<&[f32]>,
    ) -> Result<MoeStep<'_>, KernelError> {
        self.upload_step(token, pos, row)?;
        self.embed()?;
        Ok(MoeStep {
            att: AttShape::for_keys(pos + 1),
            dec: self,
            next: 0,
            pending: None,
        })
    }

    /// The router's logits for `xn`, then `route` = its top `k` and their weights.
    pub(super) fn route(&self, router: &DeviceMatrix, k: usize) -> Result<(), KernelError> {
        self.matvec(
            router,
            self.xn.ptr,
            self.q8(),
            self.router.ptr,
            0,
            NormIn::NONE,
        )?;
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n, k) = (router.rows as i32, k as i32);
        launch!(
            self,
            "moe_route",
            cfg,
            &self.router.ptr,
            &n,
            &k,
            &self.route.ptr
        )
    }

    /// Experts of ranks `rank0..rank0 + n`: `ffn[rank] = swiglu(xn)`, its int8 copy, and
    /// `ys[rank] = down · ffn[rank]`. Weights from `table` (by the routed id), or `direct`
    /// (addresses of gate, up, down) when not all zero. `types`: gate's, up's and down's.
    pub(super) fn experts(
        &self,
        types: [i32; 3],
        table: u64,
        direct: [u64; 3],
        rank0: usize,
        n: usize,
        n_ff: usize,
    ) -> Result<(), KernelError> {
        let d = self.spec.n_embd;
        let direct = ExpertPtrs { w: direct };
        let (rank0_i, ff_i, d_i) = (rank0 as i32, n_ff as i32, d as i32);
        let [tg, tu, td] = types;
        let cfg = LaunchConfig {
            grid_dim: ((n_ff as u32).div_ceil(MV_WARPS), n as u32, 1),
            block_dim: (32, MV_WARPS, 1),
            shared_mem_bytes: 0,
        };
        let label = || format!("moe_swiglu {tg}/{tu} [{n_ff}, {d}] x{n}");
        launch!(@labelled self, "moe_swiglu", label, cfg, &self.xn.ptr, &self.xq.ptr,
            &self.xd.ptr, &self.xs.ptr, &d_i, &tg, &tu, &self.ffn.ptr, &ff_i, &table,
            &self.route.ptr, &rank0_i, &direct)?;
        // This launch's ranks of the hidden states and their int8 copies.
        let at = |base: u64, elem_bytes: usize, per: usize| {
            base + (rank0 * n_ff / per * elem_bytes) as u64
        };
        let fq = [
            at(self.fq.ptr, 1, 1),
            at(self.fd.ptr, 4, 32),
            at(self.fs.ptr, 4, 32),
        ];
        self.quantize(at(self.ffn.ptr, 4, 1), n * n_ff, fq)?;
        let shape = MvShape::pick(&[d]);
        let name = shape.kernel("moe_down");
        let mut cfg = shape.cfg(d);
        cfg.grid_dim.1 = n as u32;
        let label = || format!("{name} {td} [{d}, {n_ff}] x{n}");
        launch!(@labelled self, &name, label, cfg, &td, &self.ffn.ptr, &self.fq.ptr,
            &self.fd.ptr, &self.fs.ptr, &self.ys.ptr, &d_i, &ff_i, &table, &self.route.ptr,
            &rank0_i, &direct)
    }

    /// `x += Σ_r w[r] · ys[r]` over the `k` ranks, with the weights `moe_route` wrote.
    pub(super) fn combine(&self, k: usize) -> Result<(), KernelError> {
        let (k, n) = (k as i32, self.spec.n_embd as i32);
        launch!(
            self,
            "moe_combine",
            grid1(n as u32, 256),
            &self.x.ptr,
            &self.ys.ptr,
            &k,
            &n,
            &self.route.ptr
        )
    }
}

/// One token of a mixture-of-experts model in flight ([`Decoder::begin_moe`]): the caller
/// alternates [`advance`](Self::advance) (run to the next MoE block whose experts it keeps) and
/// [`expert`](Self::expert) (once per chosen expert), then calls [`finish`](Self::finish).
pub struct MoeStep<'a> {
    dec: &'a mut Decoder,
    att: AttShape,
    /// The next block to run.
    next: usize,
    /// The MoE block whose experts are being handed over.
    pending: Option<Pending>,
}

/// `struct ExpertPtrs` in decode.cu: gate, up and down addresses, all 0 for "use the table".
#[repr(C)]
struct ExpertPtrs {
    w: [u64; 3],
}

// SAFETY: plain `#[repr(C)]` integers, laid out as decode.cu's `struct ExpertPtrs` (3 pointers).
unsafe impl DeviceRepr for ExpertPtrs {}

struct Pending {
    layer: usize,
    n_ff: usize,
    /// The chosen experts by rank, and whether each has run.
    ids: Vec<usize>,
    ran: Vec<bool>,
}

impl MoeStep<'_> {
    /// Mixes the previous MoE block's experts in, then runs blocks (MoE blocks with resident
    /// experts included) up to the next one whose experts the caller keeps: returns that block's
    /// index and the experts chosen for it, by rank (most probable first), or `None` when every
    /// block has run.
    pub fn advance(&mut self) -> Result<Option<(usize, Vec<usize>)>, KernelError> {
        self.combine()?;
        while self.next < self.dec.layers.len() {
            let i = self.next;
            self.next += 1;
            let dec = &*self.dec;
            dec.attention(i, self.att)?;
            let host = match &dec.spec.layers[i].ffn {
                FfnSpec::Dense { gate, up, down } => {
                    dec.dense_ffn(i, gate, up, down)?;
                    None
                }
                FfnSpec::Moe {
                    router,
                    n_expert_used,
                    n_ff,
                    experts,
                } => match experts {
                    Some(experts) => {
                        dec.resident_moe(i, router, *n_expert_used, *n_ff, experts)?;
                        None
                    }
                    None => {
                        dec.route(router, *n_expert_used)?;
                        Some((*n_expert_used, *n_ff))
                    }
                },
            };
            if let Some((k, n_ff)) = host {
                let ids = self.dec.routing(k)?;
                self.pending = Some(Pending {
                    layer: i,
                    n_ff,
                    ids: ids.clone(),
                    ran: vec![false; k],
                });
                return Ok(Some((i, ids)));
            }
        }
        Ok(None)
    }

    /// Runs the expert of rank `rank` (its place among the ids [`advance`](Self::advance)
    /// returned) for the MoE block it stopped at. Its weights must stay in device memory until
    /// the stream has used them.
    pub fn expert(&mut self, rank: usize, m: &ExpertMatrices) -> Result<(), KernelError> {
        let dec = &*self.dec;
        let Some(p) = self.pending.as_mut() else {
            return Err(KernelError(
                "MoeStep::expert with no MoE block pending".into(),
            ));
        };
        let (d, ff, layer) = (dec.spec.n_embd, p.n_ff, p.layer);
        let fits = |m: &DeviceMatrix, rows: usize, cols: usize| m.rows == rows && m.cols == cols;
        if !(fits(&m.gate, ff, d) && fits(&m.up, ff, d) && fits(&m.down, d, ff)) {
            return Err(KernelError(format!(
                "blk.{layer}: expert of rank {rank} is gate [{}, {}] / up [{}, {}] / down [{}, \
                 {}], expected [{ff}, {d}] / [{ff}, {d}] / [{d}, {ff}]",
                m.gate.rows, m.gate.cols, m.up.rows, m.up.cols, m.down.rows, m.down.cols
            )));
        }
        match p.ran.get_mut(rank) {
            Some(ran @ false) => *ran = true,
            _ => {
                return Err(KernelError(format!(
                    "blk.{layer}: expert rank {rank} given twice or beyond the {} used",
                    p.ran.len()
                )))
            }
        }
        dec.experts(m.types(), 0, m.ptrs(), rank, 1, ff)
    }

    /// `x += Σ w[r] · ys[r]` for the pending MoE block, once all its experts have run.
    fn combine(&mut self) -> Result<(), KernelError> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        if p.ran.iter().any(|&r| !r) {
            return Err(KernelError(format!(
                "blk.{}: only {} of its {} experts ({:?}) ran",
                p.layer,
                p.ran.iter().filter(|&&r| r).count(),
                p.ran.len(),
                p.ids
            )));
        }
        self.dec.combine(p.ran.len())
    }

    /// The logits `[n_vocab]`, once [`advance`](Self::advance) has returned `None`.
    pub fn finish(self) -> Result<Vec<f32>, KernelError> {
        if self.pending.is_some() || self.next < self.dec.layers.len() {
            return Err(KernelError(format!(
                "MoeStep::finish at block {} of {}",
                self.next,
                self.dec.layers.len()
            )));
        }
        self.dec.head()?;
        self.dec.download_logits()
    }
}
