//! The step's kernels, one launch each: their grids and arguments (the step's sequence is in
//! decoder.rs, the folded norms in norms.rs, the MoE kernels in moe.rs).

use candle_core::cuda_backend::cudarc::driver::sys;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, DriverError, LaunchConfig, PushKernelArg,
};

use super::{driver, Decoder, Layer, MvShape, NormIn, MV_WARPS};
use crate::cuda::{DeviceMatrix, LayerSpec};
use crate::KernelError;

impl Decoder {
    /// `x` = the token's embedding row (from the host when the table is there: already
    /// uploaded).
    pub(super) fn embed(&self) -> Result<(), KernelError> {
        let s = &self.spec;
        let Some(embed) = &s.embed else {
            return Ok(());
        };
        let d = s.n_embd as i32;
        launch!(
            self,
            &format!("embed_{}", embed.kernel_suffix()),
            grid1(s.n_embd as u32, 256),
            &embed.bytes.ptr,
            &self.step.ptr,
            &self.x.ptr,
            &d
        )
    }

    /// The main int8 activation buffers (`xq`, `xd`, `xs`).
    pub(super) fn q8(&self) -> [u64; 3] {
        [self.xq.ptr, self.xd.ptr, self.xs.ptr]
    }

    /// `out = rms_norm(x) * w`, also into the int8 buffers. One block; a float4 per thread
    /// where `n_embd` is a multiple of 128 (`rms_norm4`, half the time of `rms_norm`).
    pub(super) fn rms_norm(&self, x: u64, w: u64, out: u64) -> Result<(), KernelError> {
        let n = self.spec.n_embd;
        let (name, threads) = if n.is_multiple_of(128) {
            ("rms_norm4", (n / 4).min(1024))
        } else {
            ("rms_norm", 1024)
        };
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (eps, n) = (self.spec.rms_eps, n as i32);
        let (q, d, qs) = (self.xq.ptr, self.xd.ptr, self.xs.ptr);
        launch!(self, name, cfg, &x, &w, &out, &n, &eps, &q, &d, &qs)
    }

    /// q, k and v from `xn` in one launch (each with its bias, if any); from the folded
    /// norm's int8 copy when `folded`.
    pub(super) fn qkv(&self, l: &Layer, spec: &LayerSpec, folded: bool) -> Result<(), KernelError> {
        let (q, k, v) = (&spec.q, &spec.k, &spec.v);
        let bias = |i: usize| l.biases[i].as_ref().map_or(0u64, |b| b.ptr);
        let (bq, bk, bv) = (bias(0), bias(1), bias(2));
        let (tq, tk, tv) = (q.type_id(), k.type_id(), v.type_id());
        let (rq, rk, rv) = (q.rows as i32, k.rows as i32, v.rows as i32);
        let cols = q.cols as i32;
        let shape = MvShape::pick(&[q.rows, k.rows, v.rows]);
        let name = shape.kernel("matvec_qkv");
        let label = || {
            format!(
                "{name} {:?}/{:?}/{:?} [{}, {cols}]",
                q.ty,
                k.ty,
                v.ty,
                rq + rk + rv
            )
        };
        let [xq, xd, xs] = self.q8_in(folded);
        let nin = self.norm_in(folded);
        launch!(@labelled self, &name, label, shape.cfg(q.rows + k.rows + v.rows), &self.xn.ptr,
            &xq, &xd, &xs, &cols,
            &q.bytes.ptr, &tq, &self.q.ptr, &bq, &rq,
            &k.bytes.ptr, &tk, &self.k.ptr, &bk, &rk,
            &v.bytes.ptr, &tv, &self.v.ptr, &bv, &rv, &nin)
    }

    /// `ffn = silu(gate · xn) * (up · xn)` in one launch; from the folded norm's int8 copy
    /// when `folded`.
    pub(super) fn swiglu(
        &self,
        g: &DeviceMatrix,
        u: &DeviceMatrix,
        folded: bool,
    ) -> Result<(), KernelError> {
        let (tg, tu) = (g.type_id(), u.type_id());
        let (rows, cols) = (g.rows as i32, g.cols as i32);
        let label = || format!("matvec_swiglu {:?}/{:?} [{rows}, {cols}]", g.ty, u.ty);
        let cfg = LaunchConfig {
            grid_dim: ((g.rows as u32).div_ceil(MV_WARPS), 1, 1),
            block_dim: (32, MV_WARPS, 1),
            shared_mem_bytes: 0,
        };
        let [xq, xd, xs] = self.q8_in(folded);
        let nin = self.norm_in(folded);
        launch!(@labelled self, "matvec_swiglu", label, cfg, &self.xn.ptr, &xq, &xd, &xs, &cols,
            &g.bytes.ptr, &tg, &u.bytes.ptr, &tu, &self.ffn.ptr, &rows, &nin)
    }

    /// `y = m · x (+ res)`, scaled as `nin` says (a folded norm's consumer; [`NormIn::NONE`]
    /// otherwise); `res` is 0 for none and may equal `y`. k-quant rows read `x` from the int8
    /// buffers `q8` (`[q, d, s]`), which must hold it.
    pub(super) fn matvec(
        &self,
        m: &DeviceMatrix,
        x: u64,
        q8: [u64; 3],
        y: u64,
        res: u64,
        nin: NormIn,
    ) -> Result<(), KernelError> {
        let (rows, cols, ty) = (m.rows as i32, m.cols as i32, m.type_id());
        let shape = MvShape::pick(&[m.rows]);
        let name = shape.matvec_kernel(m.kernel_suffix());
        let label = || {
            if name.ends_with(m.kernel_suffix()) {
                format!("{name} [{rows}, {cols}]") // the type is in the kernel's name
            } else {
                format!("{name} {:?} [{rows}, {cols}]", m.ty)
            }
        };
        let [xq, xd, xs] = q8;
        let bias = 0u64; // the kernel's bias: q/k/v take theirs in matvec_qkv
        launch!(@labelled self, &name, label, shape.cfg(m.rows), &m.bytes.ptr, &ty, &x, &xq,
            &xd, &xs, &y, &rows, &cols, &bias, &res, &nin)
    }

    /// `src [n]` → the int8 activation buffers `q8` (`[q, d, s]`) the next mat-vecs read.
    pub(super) fn quantize(&self, src: u64, n: usize, q8: [u64; 3]) -> Result<(), KernelError> {
        let cfg = LaunchConfig {
            grid_dim: ((n as u32).div_ceil(256), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let n = n as i32;
        let [q, d, s] = q8;
        launch!(self, "quantize_q8", cfg, &src, &q, &d, &s, &n)
    }

    /// Launches `func` on the stream as a programmatic dependent launch (decode.cu's
    /// `pdl_entry`: it may start before the previous kernel ends, and waits for it first).
    ///
    /// # Safety
    /// `params` must point at `func`'s arguments, in order and of its parameter types, each
    /// valid for the kernel as in [`launch!`].
    pub(super) unsafe fn launch_dependent(
        &self,
        func: &CudaFunction,
        cfg: LaunchConfig,
        params: &mut [*mut std::ffi::c_void],
    ) -> Result<(), DriverError> {
        let mut attr: sys::CUlaunchAttribute = std::mem::zeroed();
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        self.stream.context().bind_to_thread()?;
        sys::cuLaunchKernelEx(
            &config,
            func.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
        .result()
    }

    pub(super) fn func(&self, name: &str) -> Result<&CudaFunction, KernelError> {
        self.funcs
            .get(name)
            .ok_or_else(|| KernelError(format!("no kernel {name}")))
    }
}

pub(super) fn grid1(n: u32, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(block).clamp(1, 1024), 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}
