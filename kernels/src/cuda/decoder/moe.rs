//! Mixture-of-experts blocks of the [`Decoder`]: routing on the device, the chosen experts'
//! kernels (from the block's address table), the mix; and [`Decoder::step_served`], the step of
//! a model whose experts live behind the caller's caches (answering the device's requests for
//! experts while the step runs).

use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::quantized::GgmlDType;

use super::norms::{
    fused_router, qin_fits, qin_smem_bytes, staged_smem_bytes, NORM_ROWS, NORM_WARPS,
};
use super::{driver, grid1, Decoder, MvShape, NormIn, MV_WARPS};
use crate::cuda::{type_id, DeviceMatrix, MAX_EXPERTS_USED};
use crate::KernelError;

/// The host's answer to one request of the device: put the chosen experts `ids` of MoE block
/// `layer` into device memory and their addresses into the block's table.
pub type Serve<'a> = &'a mut dyn FnMut(usize, &[usize]) -> Result<(), KernelError>;

/// How long the host waits for a step with neither a request nor its end (the device gives up
/// on an unanswered request after 60 s, so a step silent for longer is stuck).
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// Warps of `moe_router`'s one block (`ROUTER_WARPS` in decode.cu).
const ROUTER_WARPS: u32 = 32;

impl Decoder {
    /// MoE block `i`: route, the chosen experts from the block's address table (the device asks
    /// the host for missing ones when the table is served), the mix.
    pub(super) fn moe_block(
        &self,
        i: usize,
        router: &DeviceMatrix,
        k: usize,
        n_ff: usize,
    ) -> Result<(), KernelError> {
        let l = &self.layers[i];
        let mail = self
            .mail
            .as_ref()
            .filter(|_| l.served)
            .map_or(0, |m| m.device_ptr);
        self.route(i, router, k, mail)?;
        self.experts(i, l.expert_types, l.expert_table, k, n_ff)?;
        self.combine(i, k)
    }

    /// Block `i`'s routing: 16 floats (ids as floats, then weights) of `route`.
    fn route_at(&self, i: usize) -> u64 {
        self.route.ptr + (i * 2 * MAX_EXPERTS_USED * 4) as u64
    }

    /// Block `i`'s routing from `xn`: the router's logits, their top `k` and the weights;
    /// `mail` (0: none) is where the device asks for experts missing from the block's table.
    /// An F32 router takes `moe_router` (product and top-k in one block), others a mat-vec and
    /// `moe_route`.
    fn route(
        &self,
        i: usize,
        router: &DeviceMatrix,
        k: usize,
        mail: u64,
    ) -> Result<(), KernelError> {
        let (n, k, layer) = (router.rows as i32, k as i32, i as i32);
        let (route, table) = (self.route_at(i), self.layers[i].expert_table);
        let one_block = |warps: u32| LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (32, warps, 1),
            shared_mem_bytes: 0,
        };
        if self.fused_router && fused_router(router) {
            let d = router.cols as i32;
            return launch!(
                self,
                "moe_router",
                one_block(ROUTER_WARPS),
                &router.bytes.ptr,
                &n,
                &d,
                &self.xn.ptr,
                &k,
                &route,
                &table,
                &layer,
                &mail
            );
        }
        let logits = self.router.ptr;
        self.matvec(router, self.xn.ptr, self.q8(), logits, 0, NormIn::NONE)?;
        launch!(
            self,
            "moe_route",
            one_block(1),
            &logits,
            &n,
            &k,
            &route,
            &table,
            &layer,
            &mail
        )
    }

    /// Block `i`'s `k` experts: `ffn[rank] = swiglu(xn)`, its int8 copy, and
    /// `ys[rank] = down · ffn[rank]`, weights from `table` by the routed id. `types`: gate's,
    /// up's and down's.
    fn experts(
        &self,
        i: usize,
        types: [i32; 3],
        table: u64,
        k: usize,
        n_ff: usize,
    ) -> Result<(), KernelError> {
        let d = self.spec.n_embd;
        let (ff_i, d_i, route) = (n_ff as i32, d as i32, self.route_at(i));
        let [tg, tu, td] = types;
        let cfg = LaunchConfig {
            grid_dim: ((n_ff as u32).div_ceil(MV_WARPS), k as u32, 1),
            block_dim: (32, MV_WARPS, 1),
            shared_mem_bytes: 0,
        };
        let label = || format!("moe_swiglu {tg}/{tu} [{n_ff}, {d}] x{k}");
        launch!(@labelled self, "moe_swiglu", label, cfg, &self.xn.ptr, &self.xq.ptr,
            &self.xd.ptr, &self.xs.ptr, &d_i, &tg, &tu, &self.ffn.ptr, &ff_i, &table, &route)?;
        if let Some((name, shared)) = down_qin_kernel(td, n_ff, d, self.staged_smem_max) {
            let cfg = LaunchConfig {
                grid_dim: ((d / NORM_ROWS) as u32, k as u32, 1),
                block_dim: (32, NORM_WARPS, 1),
                shared_mem_bytes: shared as u32,
            };
            let label = || format!("{name} [{d}, {n_ff}] x{k}");
            return launch!(@labelled self, name, label, cfg, &self.ffn.ptr, &self.ys.ptr, &d_i,
                &ff_i, &table, &route);
        }
        let fq = [self.fq.ptr, self.fd.ptr, self.fs.ptr];
        self.quantize(self.ffn.ptr, k * n_ff, fq)?;
        let shape = MvShape::pick(&[d]);
        let name = shape.kernel("moe_down");
        let mut cfg = shape.cfg(d);
        cfg.grid_dim.1 = k as u32;
        let label = || format!("{name} {td} [{d}, {n_ff}] x{k}");
        launch!(@labelled self, &name, label, cfg, &td, &self.ffn.ptr, &self.fq.ptr,
            &self.fd.ptr, &self.fs.ptr, &self.ys.ptr, &d_i, &ff_i, &table, &route)
    }

    /// `x += Σ_r w[r] · ys[r]` over the `k` ranks, with the weights block `i`'s routing holds.
    fn combine(&self, i: usize, k: usize) -> Result<(), KernelError> {
        let (k, n) = (k as i32, self.spec.n_embd as i32);
        let route = self.route_at(i);
        launch!(
            self,
            "moe_combine",
            grid1(n as u32, 256),
            &self.x.ptr,
            &self.ys.ptr,
            &k,
            &n,
            &route
        )
    }

    /// Runs one token at position `pos` of a model whose MoE blocks (some or all) are served by
    /// the caller's caches, and returns the `[n_vocab]` logits. The step is launched whole; while
    /// it runs, each block whose routing picks an expert missing from its table stops on the
    /// device and `serve(block, chosen ids)` is called here to put them there. A failure of
    /// `serve` still lets the step finish (the experts it lacked are skipped) and is returned.
    pub fn step_served(
        &mut self,
        token: u32,
        pos: usize,
        row: Option<&[f32]>,
        serve: Serve<'_>,
    ) -> Result<&[f32], KernelError> {
        self.launch_step(token, pos, row, Some(&mut *serve))?;
        let served = self.answer_requests(serve);
        let logits = self.download_logits();
        served?;
        logits
    }

    /// Answers the device's requests until the stream has finished the work launched so far.
    pub(super) fn answer_requests(&self, serve: Serve<'_>) -> Result<(), KernelError> {
        let Some(mail) = &self.mail else {
            return Ok(());
        };
        let timeouts = mail.timeouts();
        let done = self
            .stream
            .record_event(None)
            .map_err(driver("step event"))?;
        let mut heard = Instant::now();
        let mut failure = None;
        loop {
            if let Some(r) = mail.request() {
                if failure.is_none() {
                    if let Err(e) = self
                        .check_request(r.layer, &r.ids)
                        .and_then(|()| serve(r.layer, &r.ids))
                    {
                        failure = Some(e);
                    }
                }
                mail.answer(r.seq);
                heard = Instant::now();
                continue;
            }
            if done.try_is_complete().map_err(driver("step"))? {
                break;
            }
            if heard.elapsed() > STEP_TIMEOUT {
                return Err(KernelError(format!(
                    "fused MoE step: no progress in {} s",
                    STEP_TIMEOUT.as_secs()
                )));
            }
            std::hint::spin_loop();
        }
        if let Some(e) = failure {
            return Err(e);
        }
        if mail.timeouts() != timeouts {
            return Err(KernelError(
                "fused MoE step: the device stopped waiting for experts the host did not \
                 supply within 60 s"
                    .into(),
            ));
        }
        Ok(())
    }

    /// A request names a served MoE block and distinct experts it has.
    fn check_request(&self, layer: usize, ids: &[usize]) -> Result<(), KernelError> {
        let ok = self.layers.get(layer).is_some_and(|l| l.served)
            && ids.iter().all(|&e| e < self.layers[layer].n_expert);
        if ok {
            return Ok(());
        }
        Err(KernelError(format!(
            "fused MoE step: the device asked for experts {ids:?} of block {layer}, which it \
             does not serve"
        )))
    }

    /// The chosen experts of every served MoE block at the last step, by block: `(block, ids)`.
    pub fn last_routing(&self) -> Result<Vec<(usize, Vec<usize>)>, KernelError> {
        let mut all = vec![0f32; self.layers.len() * 2 * MAX_EXPERTS_USED];
        self.stream
            .memcpy_dtoh(&self.route.slice, &mut all)
            .map_err(driver("routing download"))?;
        self.stream.synchronize().map_err(driver("synchronize"))?;
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            if l.served {
                let r = &all[i * 2 * MAX_EXPERTS_USED..][..l.n_expert_used];
                out.push((i, r.iter().map(|&id| id as usize).collect()));
            }
        }
        Ok(out)
    }
}

/// The kernel for experts' down rows of kernel type `td` (k-quants) that quantizes its rank's
/// hidden states into shared memory itself, so no `quantize_q8` runs before it, and the dynamic
/// shared memory it takes: `moe_down_st_<type>` (weights staged through shared memory too) where
/// that fits in `staged_max`, else `moe_down_qin_<type>`. None (quantize, then `moe_down_*`)
/// where the int8 copy does not fit a block's default shared memory or the rows are not whole
/// blocks of 32.
fn down_qin_kernel(
    td: i32,
    n_ff: usize,
    d: usize,
    staged_max: usize,
) -> Option<(&'static str, usize)> {
    if !d.is_multiple_of(NORM_ROWS) || !qin_fits(n_ff) {
        return None;
    }
    let (ty, qin, st) = [
        (GgmlDType::Q4K, "moe_down_qin_q4_k", "moe_down_st_q4_k"),
        (GgmlDType::Q5K, "moe_down_qin_q5_k", "moe_down_st_q5_k"),
        (GgmlDType::Q6K, "moe_down_qin_q6_k", "moe_down_st_q6_k"),
    ]
    .into_iter()
    .find(|&(ty, ..)| type_id(ty) == td)?;
    Some(
        match staged_smem_bytes(ty, n_ff).filter(|&b| b <= staged_max) {
            Some(bytes) => (st, bytes),
            None => (qin, qin_smem_bytes(n_ff)),
        },
    )
}
