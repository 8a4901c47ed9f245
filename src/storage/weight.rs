//! [`Weight`]: a model's view of one weight tensor, whatever tier holds its bytes.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Module, Shape, Tensor};

use crate::error::Result;
use crate::gguf::TensorType;

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
}

enum Tier {
    /// Held on the compute device (GPU memory, or RAM on a CPU build). `q` is kept for quantized
    /// weights on the CPU, where single-row products run on hypura's own kernel (see `matmul_t`).
    Resident {
        mm: QMatMul,
        q: Option<Arc<QTensor>>,
    },
}

impl Weight {
    pub(crate) fn resident(name: &str, ty: TensorType, q: QTensor) -> Result<Self> {
        let shape = q.shape().clone();
        // Float weights become plain tensors (no second copy); quantized ones stay in blocks.
        let keep = ty.is_quantized() && q.device().is_cpu();
        let q = Arc::new(q);
        let mm = QMatMul::from_arc(q.clone())?;
        let q = keep.then_some(q);
        Ok(Weight {
            inner: Arc::new(Inner {
                name: name.to_string(),
                ty,
                shape,
                tier: Tier::Resident { mm, q },
            }),
        })
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

    /// `x · Wᵀ`: `x` is `[..., n_in]`, the result `[..., n_out]`. Quantized weights are multiplied
    /// in their block format (activations quantized as llama.cpp does), never dequantized whole.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        match &self.inner.tier {
            Tier::Resident { q: Some(q), .. }
                if x.elem_count() == x.dim(candle_core::D::Minus1)? =>
            {
                // One row (decode): the block kernel over the weight's own bytes. candle's repacked
                // path pays for an expanded copy that only a multi-row batch earns back.
                let (n, k) = q.shape().dims2()?;
                let lhs = x.flatten_all()?.to_vec1::<f32>()?;
                let mut dst = vec![0f32; n];
                let bytes = q.data()?;
                hypura_kernels::matmul_t(
                    self.inner.ty.to_candle(),
                    &bytes,
                    (1, k, n),
                    &lhs,
                    &mut dst,
                )
                .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", self.inner.name)))?;
                let mut dims = x.dims().to_vec();
                *dims.last_mut().unwrap_or(&mut 0) = n;
                Ok(Tensor::from_vec(dst, dims, x.device())?)
            }
            Tier::Resident { mm, .. } => Ok(mm.forward(&x.contiguous()?)?),
        }
    }

    /// Rows `ids` of a `[n_rows, n_cols]` weight as F32 `[ids.len(), n_cols]` (embedding lookup).
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.inner.tier {
            Tier::Resident { mm, .. } => Ok(mm.embedding(ids)?),
        }
    }

    /// The whole tensor as F32 (for small tensors: norms, biases, routers).
    pub fn dense(&self) -> Result<Tensor> {
        match &self.inner.tier {
            Tier::Resident {
                mm: QMatMul::QTensor(q),
                ..
            } => Ok(q.dequantize(&q.device())?),
            Tier::Resident {
                mm: QMatMul::Tensor(t),
                ..
            } => Ok(t.clone()),
            Tier::Resident {
                mm: QMatMul::TensorF16(t),
                ..
            } => Ok(t.to_dtype(candle_core::DType::F32)?),
        }
    }
}

impl std::fmt::Debug for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Weight({} {} {:?})",
            self.inner.name, self.inner.ty, self.inner.shape
        )
    }
}
