//! [`Weight`]: a model's view of one weight tensor, whatever tier holds its bytes.

use std::borrow::Cow;
use std::ops::{Deref, Range};
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Shape, Tensor};
use memmap2::Mmap;

use super::experts::ExpertData;
use super::stream::{Slab, Streamer};
use crate::error::{Error, Result};
use crate::gguf::TensorType;

/// Most bytes of a weight copied at once for a batch product on a temporary copy (8 MiB).
static TRANSIENT_CHUNK_BYTES: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(8 << 20);

/// Changes the transient chunk size (tests use tiny chunks to exercise the chunking).
pub fn set_transient_chunk_bytes(n: usize) {
    TRANSIENT_CHUNK_BYTES.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
}

/// One weight tensor. Models call [`matmul_t`](Self::matmul_t), [`rows`](Self::rows) or
/// [`dense`](Self::dense); where the bytes come from is decided by the placement plan.
#[derive(Clone)]
pub struct Weight {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    ty: TensorType,
    shape: Shape,
    tier: Tier,
    /// The compute device: where products and [`Weight::dense`] results live. Off-device tiers
    /// on a GPU are copied to it per use.
    device: Device,
    /// Multi-row products repack a temporary copy instead of keeping candle's repacked copy
    /// beside the weight (which costs ~1× the weight's bytes).
    transient_repack: bool,
    batch: BatchMath,
}

/// How a GPU multiplies a batch of activation rows by a quantized weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchMath {
    /// The weight dequantized whole to F32, then cuBLAS (TF32 tensor cores by default): the
    /// closest to llama.cpp's CPU results; the dequantization costs the most when few rows
    /// use the weight.
    Float,
    /// candle's MMQ kernels over the blocks in place (activations quantized to Q8_1, as
    /// llama.cpp's CUDA prompt path does): for MoE experts, each of which sees a few of a
    /// batch's tokens. On the CPU and Metal, the same as `Float`.
    Int8,
}

/// Where a weight's bytes are.
pub(crate) enum Tier {
    /// Owned on the compute device (GPU memory, or RAM on a CPU build). `q` is kept for quantized
    /// weights on the CPU, where single-row products run on hypura's own kernels.
    Device {
        mm: QMatMul,
        q: Option<Arc<QTensor>>,
    },
    /// A zero-copy view of the memory-mapped file (CPU): the page cache holds the bytes.
    Mapped { map: Arc<Mmap>, range: Range<usize> },
    /// One slice of an expert held in the expert cache (pinned while this weight lives).
    Cached { data: Arc<ExpertData>, which: usize },
    /// Read from disk into a pool buffer when needed: bytes `range` of stream group `group`.
    Streamed {
        streamer: Arc<Streamer>,
        group: usize,
        range: Range<usize>,
    },
    /// GPU builds: kept in RAM or on NVMe (`home`) and uploaded to a device slot ahead of use.
    #[cfg(feature = "cuda")]
    Uploaded {
        uploader: Arc<super::Uploader>,
        group: usize,
        item: usize,
        home: crate::plan::TierKind,
    },
}

/// A weight's bytes for the duration of one use.
enum Bytes<'a> {
    Borrowed(&'a [u8]),
    Cow(Cow<'a, [u8]>),
    Slab(Arc<Slab>, Range<usize>),
}

impl Deref for Bytes<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Borrowed(b) => b,
            Bytes::Cow(c) => c,
            Bytes::Slab(s, r) => &s[r.clone()],
        }
    }
}

impl Weight {
    pub(crate) fn new(
        name: &str,
        ty: TensorType,
        shape: Shape,
        tier: Tier,
        device: &Device,
    ) -> Self {
        Weight {
            inner: Arc::new(Inner {
                name: name.to_string(),
                ty,
                shape,
                tier,
                device: device.clone(),
                transient_repack: false,
                batch: BatchMath::Float,
            }),
        }
    }

    /// A weight owned on the device.
    pub(crate) fn device(name: &str, ty: TensorType, q: QTensor) -> Result<Self> {
        let shape = q.shape().clone();
        // Float weights become plain tensors (no second copy); quantized ones stay in blocks.
        // On a GPU the block bytes stay in device memory only: hypura's CPU kernels never see them.
        let device = q.device();
        let keep = ty.is_quantized() && device.is_cpu();
        let q = Arc::new(q);
        let mm = QMatMul::from_arc(q.clone())?;
        Ok(Self::new(
            name,
            ty,
            shape,
            Tier::Device {
                mm,
                q: keep.then_some(q),
            },
            &device,
        ))
    }

    /// The same weight, with multi-row products in place (no repacked copy) when `in_place`.
    pub(crate) fn with_transient_repack(mut self, transient: bool) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.transient_repack = transient;
        }
        self
    }

    /// The same weight, its GPU batch products done as `batch` says.
    pub(crate) fn with_batch_math(mut self, batch: BatchMath) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.batch = batch;
        }
        self
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn ty(&self) -> TensorType {
        self.inner.ty
    }

    /// Shape in candle order, e.g. `[n_out, n_in]` for a matrix.
    pub fn shape(&self) -> &Shape {
        &self.inner.shape
    }

    /// Which tier serves this weight: `"device"`, `"ram"` or `"nvme"`.
    pub fn tier_name(&self) -> &'static str {
        match self.inner.tier {
            Tier::Device { .. } => "device",
            Tier::Mapped { .. } => "ram",
            Tier::Streamed { .. } | Tier::Cached { .. } => "nvme",
            #[cfg(feature = "cuda")]
            Tier::Uploaded { home, .. } => home.name(),
        }
    }

    /// The weight as a matrix in CUDA memory for hypura's fused CUDA kernels: `None` unless it
    /// is device-resident on a GPU in a format those kernels read.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda_matrix(&self) -> Result<Option<hypura_kernels::cuda::DeviceMatrix>> {
        use candle_core::quantized::GgmlDType;
        use hypura_kernels::cuda::{supported, DeviceMatrix};
        let Tier::Device { mm, .. } = &self.inner.tier else {
            return Ok(None);
        };
        let &[rows, cols] = self.inner.shape.dims() else {
            return Ok(None);
        };
        let (bytes, ty) = match mm {
            QMatMul::QTensor(q) if supported(q.dtype()) => {
                (super::device_view::quantized_bytes(q)?, q.dtype())
            }
            // Float weights are kept as F32 tensors (candle dequantizes F16/BF16 at load).
            QMatMul::Tensor(t) => (super::device_view::f32_bytes(t)?, GgmlDType::F32),
            _ => return Ok(None),
        };
        let Some(bytes) = bytes else { return Ok(None) };
        DeviceMatrix::new(bytes, ty, rows, cols)
            .map(Some)
            .map_err(|e| self.kernel_error(e))
    }

    /// The weight's bytes in ggml block layout, when the CPU kernels can use them directly.
    fn bytes(&self) -> Result<Option<Bytes<'_>>> {
        Ok(match &self.inner.tier {
            Tier::Device { q: Some(q), .. } => Some(Bytes::Cow(q.data()?)),
            Tier::Device { .. } => None,
            #[cfg(feature = "cuda")]
            Tier::Uploaded { .. } => None,
            Tier::Mapped { map, range } => Some(Bytes::Borrowed(&map[range.clone()])),
            Tier::Cached { data, which } => Some(Bytes::Borrowed(data.slice(*which))),
            Tier::Streamed {
                streamer,
                group,
                range,
            } => Some(Bytes::Slab(streamer.acquire(*group)?, range.clone())),
        })
    }

    fn kernel_error(&self, e: hypura_kernels::KernelError) -> Error {
        Error::Candle(candle_core::Error::Msg(format!("{}: {e}", self.inner.name)))
    }

    /// `x · Wᵀ`: `x` is `[..., n_in]`, the result `[..., n_out]`. Quantized weights are multiplied
    /// in their block format (activations quantized as llama.cpp does), never dequantized whole.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        let k = x.dim(candle_core::D::Minus1)?;
        let m = x.elem_count() / k.max(1);
        // One input row of a quantized weight: hypura's kernels over the bytes where they lie.
        // Batches (and float weights): candle's path, which repacks Q4_K/Q8_0 into tiles — kept
        // beside device weights when the plan has room, else made from a temporary copy and
        // dropped, as for the other tiers. Every tier and plan computes exactly the same numbers.
        // hypura's kernels are CPU code: on a GPU they run only the single-row products of
        // mapped weights (the plan's `RamCompute::Host`: the activations cross the bus, not the
        // weight); every other product there runs through candle.
        let on_host = x.device().is_cpu() || matches!(self.inner.tier, Tier::Mapped { .. });
        let kernels = self.inner.ty.is_quantized() && m == 1 && on_host;
        #[cfg(feature = "cuda")]
        if let Tier::Uploaded {
            uploader,
            group,
            item,
            ..
        } = &self.inner.tier
        {
            let qt = uploader.acquire(*group, *item)?;
            if m > 1 && self.inner.ty.is_quantized() {
                return gpu_batch(&qt, x, self.inner.batch);
            }
            return Ok(QMatMul::from_arc(qt)?.forward(&x.contiguous()?)?);
        }
        if !kernels {
            if let Tier::Device { mm, q } = &self.inner.tier {
                if let (QMatMul::QTensor(qt), false, true) = (
                    mm,
                    x.device().is_cpu(),
                    m > 1 && self.inner.ty.is_quantized(),
                ) {
                    return gpu_batch(qt, x, self.inner.batch);
                }
                if !self.inner.transient_repack || q.is_none() {
                    return Ok(mm.forward(&x.contiguous()?)?);
                }
            }
            return self.matmul_t_transient(x);
        }
        let bytes = self.bytes()?.ok_or_else(|| {
            Error::InvalidRequest(format!(
                "{}: quantized weight without bytes",
                self.inner.name
            ))
        })?;
        let n = self.inner.shape.dims()[0];
        let lhs = x.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
        let mut dst = vec![0f32; m * n];
        hypura_kernels::matmul_t(self.inner.ty.to_candle(), &bytes, (m, k, n), &lhs, &mut dst)
            .map_err(|e| self.kernel_error(e))?;
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Ok(Tensor::from_vec(dst, dims, x.device())?)
    }

    /// A product through candle's path from temporary copies. On the CPU (batches only) at most
    /// 8 MiB of rows at a time (a multiple of candle's 16-row tiles, so each output is computed
    /// exactly as from the whole matrix), so memory stays bounded. On a GPU the whole tensor is
    /// copied host→device for this one use (correct, not fast: the weight crosses the bus per use).
    fn matmul_t_transient(&self, x: &Tensor) -> Result<Tensor> {
        let bytes = self
            .bytes()?
            .ok_or_else(|| Error::InvalidRequest("no bytes".into()))?;
        let dims = self.inner.shape.dims();
        let (n, k) = (dims[0], dims[1..].iter().product::<usize>());
        let m = x.elem_count() / k.max(1);
        let row_bytes = bytes.len() / n.max(1);
        let chunk = TRANSIENT_CHUNK_BYTES.load(std::sync::atomic::Ordering::Relaxed);
        let device = x.device();
        // Float weights go through a dense matmul whose blocking depends on the matrix size, so
        // only whole matrices give the same numbers; quantized ones are computed row by row.
        let rows = if self.inner.ty.is_quantized() && device.is_cpu() {
            ((chunk / row_bytes.max(1)) / 16 * 16).max(16)
        } else {
            n
        };
        let x = x.contiguous()?;
        let mut outs = Vec::with_capacity(n.div_ceil(rows));
        let mut r = 0;
        while r < n {
            let take = rows.min(n - r);
            let part = &bytes[r * row_bytes..(r + take) * row_bytes];
            let q = super::qtensor(part, self.inner.ty, Shape::from((take, k)), device)?;
            if !device.is_cpu() && m > 1 && self.inner.ty.is_quantized() {
                outs.push(gpu_batch(&Arc::new(q), &x, self.inner.batch)?);
            } else {
                outs.push(QMatMul::from_qtensor(q)?.forward(&x)?);
            }
            r += take;
        }
        if outs.len() == 1 {
            return Ok(outs.remove(0));
        }
        Ok(Tensor::cat(&outs, candle_core::D::Minus1)?)
    }

    /// Rows `ids` of a `[n_rows, n_cols]` weight as F32 `[ids.len(), n_cols]` (embedding lookup).
    /// Off-device tiers read only the rows asked for.
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        if let Tier::Device { mm, .. } = &self.inner.tier {
            return Ok(mm.embedding(ids)?);
        }
        let (n_rows, n_cols) = self.inner.shape.dims2()?;
        let row_bytes = self.inner.ty.row_bytes(n_cols as u64).unwrap_or(0) as usize;
        let ids_v: Vec<u32> = ids.flatten_all()?.to_device(&Device::Cpu)?.to_vec1()?;
        let bytes = self
            .bytes()?
            .ok_or_else(|| Error::InvalidRequest("no bytes".into()))?;
        let mut picked = Vec::with_capacity(ids_v.len() * row_bytes);
        for &id in &ids_v {
            let r = id as usize;
            if r >= n_rows {
                return Err(Error::InvalidRequest(format!(
                    "{}: row {r} of {n_rows}",
                    self.inner.name
                )));
            }
            picked.extend_from_slice(&bytes[r * row_bytes..(r + 1) * row_bytes]);
        }
        let q = QTensor::new(
            QStorage::from_data(Cow::Owned(picked), &Device::Cpu, self.inner.ty.to_candle())?,
            (ids_v.len(), n_cols),
        )?;
        let mut dims = ids.dims().to_vec();
        dims.push(n_cols);
        Ok(q.dequantize(&Device::Cpu)?
            .reshape(dims)?
            .to_device(ids.device())?)
    }

    /// The whole tensor as F32 (for small tensors: norms, biases, routers).
    pub fn dense(&self) -> Result<Tensor> {
        match &self.inner.tier {
            Tier::Device {
                mm: QMatMul::QTensor(q),
                ..
            } => Ok(q.dequantize(&q.device())?),
            Tier::Device {
                mm: QMatMul::Tensor(t),
                ..
            } => Ok(t.clone()),
            Tier::Device {
                mm: QMatMul::TensorF16(t),
                ..
            } => Ok(t.to_dtype(candle_core::DType::F32)?),
            #[cfg(feature = "cuda")]
            Tier::Uploaded {
                uploader,
                group,
                item,
                ..
            } => Ok(uploader
                .acquire(*group, *item)?
                .dequantize(&self.inner.device)?),
            _ => {
                let bytes = self
                    .bytes()?
                    .ok_or_else(|| Error::InvalidRequest("no bytes".into()))?;
                let storage = QStorage::from_data(
                    Cow::Borrowed(&bytes),
                    &Device::Cpu,
                    self.inner.ty.to_candle(),
                )?;
                let t =
                    QTensor::new(storage, self.inner.shape.clone())?.dequantize(&Device::Cpu)?;
                Ok(t.to_device(&self.inner.device)?)
            }
        }
    }
}

/// A batch product on a GPU, as `batch` says ([`BatchMath`]): by default the weight dequantized
/// to F32 on the device, then a cuBLAS matmul. candle's quantized batch kernels (MMQ) quantize
/// the activations to Q8_1, which moves a dense model's prompt logits further from llama.cpp's
/// CPU results than our tolerances allow (H200, small-llama Q4_K_M with every product on MMQ:
/// cosine 0.99879 against the 0.999 bar); exact F32 weights with F32 activations stay within
/// them. `HYPURA_CUDA_BATCH=mmq` puts every quantized weight on MMQ, `float` every one on F32.
/// Single rows (decode) keep the mat-vec kernels.
fn gpu_batch(q: &Arc<QTensor>, x: &Tensor, batch: BatchMath) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && crate::backend::cuda_batch_math(batch) == BatchMath::Int8 {
        return Ok(QMatMul::from_arc(q.clone())?.forward(&x.contiguous()?)?);
    }
    let _ = batch;
    let w = q.dequantize(x.device())?; // [n, k]
    let x = x.contiguous()?;
    Ok(x.broadcast_matmul(&w.t()?)?)
}

impl std::fmt::Debug for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Weight({} {} {:?} on {})",
            self.inner.name,
            self.inner.ty,
            self.inner.shape,
            self.tier_name()
        )
    }
}
