//! Greedy chains: decode steps that pick their own next token on the device.
//!
//! A greedy step ends with `argmax_next` (decode.cu), which writes the logits' argmax into the
//! step's `[token, pos]` with the position advanced. So the next step can be launched before the
//! host has seen this one's token: the GPU goes from step to step without waiting on the host's
//! round trip (the logits' download, the argmax, the next upload and launch: ~75 µs a token on
//! an H200 8B, against a 1.75 ms step). The host reads each token (4 bytes) as it lands and says
//! whether generation goes on; the step launched ahead of a token that ends it is wasted work
//! (its k and v lie past the cache's length, where nothing reads them).

use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::cuda_backend::cudarc::driver::{CudaEvent, LaunchConfig, PushKernelArg};

use super::{driver, AttShape, Decoder};
use crate::KernelError;

/// Which of the decoder's graphs a step over `n_kv` keys replays: one per attention regime, for
/// steps ending in the logits and for greedy steps ending in `argmax_next`.
pub(super) fn graph_index(n_kv: usize, greedy: bool) -> usize {
    AttShape::regime(n_kv) + if greedy { 3 } else { 0 }
}

/// `argmax_next`'s block size (decode.cu's ARGMAX_THREADS).
const ARGMAX_THREADS: u32 = 1024;

impl Decoder {
    /// Whether [`greedy_chain`](Self::greedy_chain) can run: the embedding table is on the device
    /// (a host table needs each token's row uploaded by the host) and no MoE block waits for the
    /// host to serve its experts.
    pub fn can_chain(&self) -> bool {
        self.spec.embed.is_some() && !self.spec.needs_host()
    }

    /// Feeds `token` at `pos`, then each token the logits' argmax picks after it, while `accept`
    /// says so; returns how many tokens were fed (≥ 1: the cache then holds them at `pos ..
    /// pos + fed`). `accept` is called with every picked token in order (the same token the
    /// host's argmax of [`step`](Self::step)'s logits gives); false ends the chain without feeding
    /// it. At most `max_steps` tokens are fed (`token` included), and none at or past `n_ctx`: a
    /// chain asked to feed one more is an error.
    pub fn greedy_chain(
        &mut self,
        token: u32,
        pos: usize,
        max_steps: usize,
        accept: &mut dyn FnMut(u32) -> bool,
    ) -> Result<usize, KernelError> {
        if !self.can_chain() || max_steps == 0 {
            return Err(KernelError(
                "greedy chain: needs the embedding table on the device, no experts served by \
                 the host, and at least one step"
                    .into(),
            ));
        }
        let ctx = self.stream.context().clone();
        let flags = Some(CUevent_flags::CU_EVENT_DISABLE_TIMING);
        let events = [
            ctx.new_event(flags).map_err(driver("event"))?,
            ctx.new_event(flags).map_err(driver("event"))?,
        ];
        self.upload_step(token, pos, None)?;
        self.launch_greedy(pos, &events)?;
        let mut fed = 1;
        let outcome = loop {
            // The step of the token just picked goes out before the host looks at that token.
            let p = pos + fed;
            let ahead = fed < max_steps && p < self.spec.n_ctx;
            if ahead {
                if let Err(e) = self.launch_greedy(p, &events) {
                    break Err(e);
                }
            }
            let slot = (p - 1) & 1;
            if let Err(e) = events[slot].synchronize() {
                break Err(driver("greedy chain wait")(e));
            }
            let id = self.ids_host.get()[slot];
            if !accept(id) {
                break Ok(fed);
            }
            if !ahead {
                break Err(KernelError(format!(
                    "greedy chain: asked to feed token {id} past {max_steps} steps or the \
                     context ({} tokens)",
                    self.spec.n_ctx
                )));
            }
            fed += 1;
        };
        // The step launched ahead of the last token, if any, finishes before the caller goes on.
        self.stream.synchronize().map_err(driver("synchronize"))?;
        outcome
    }

    /// Launches the greedy step at `pos` (its token already in `step` on the device), then the
    /// download of the token it picks into slot `pos & 1`, and records that slot's event.
    fn launch_greedy(&mut self, pos: usize, events: &[CudaEvent; 2]) -> Result<(), KernelError> {
        let n_kv = pos + 1;
        let g = graph_index(n_kv, true);
        if self.use_graph && self.graphs[g].is_none() {
            // Captured with nothing else in flight (at most once per attention regime).
            self.stream.synchronize().map_err(driver("synchronize"))?;
            self.capture(n_kv, true);
        }
        match &self.graphs[g] {
            Some(graph) => graph.0.launch().map_err(driver("graph launch"))?,
            None => {
                self.record(n_kv, None)?;
                self.argmax_next()?;
            }
        }
        let slot = pos & 1;
        self.ids_host
            .copy_in(&self.stream, self.step.ptr, slot, 1)?;
        events[slot]
            .record(&self.stream)
            .map_err(driver("event record"))
    }

    /// `step` = [argmax of the logits, position + 1]: the next greedy step's input.
    pub(super) fn argmax_next(&self) -> Result<(), KernelError> {
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (ARGMAX_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let n = self.spec.n_vocab as i32;
        launch!(
            self,
            "argmax_next",
            cfg,
            &self.logits.ptr,
            &n,
            &self.step.ptr
        )
    }
}
