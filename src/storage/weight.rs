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
    /// Held on the compute device (GPU memory, or RAM on a CPU build).
    Resident(QMatMul),
}

impl Weight {
    pub(crate) fn resident(name: &str, ty: TensorType, q: QTensor) -> Result<Self> {
        let shape = q.shape().clone();
        // Float weights become plain tensors (no second copy); quantized ones stay in blocks.
        let mm = QMatMul::from_qtensor(q)?;
        Ok(Weight { inner: Arc::new(Inner { name: name.to_string(), ty, shape, tier: Tier::Resident(mm) }) })
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
            Tier::Resident(mm) => Ok(mm.forward(&x.contiguous()?)?),
        }
    }

    /// Rows `ids` of a `[n_rows, n_cols]` weight as F32 `[ids.len(), n_cols]` (embedding lookup).
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.inner.tier {
            Tier::Resident(mm) => Ok(mm.embedding(ids)?),
        }
    }

    /// The whole tensor as F32 (for small tensors: norms, biases, routers).
    pub fn dense(&self) -> Result<Tensor> {
        match &self.inner.tier {
            Tier::Resident(QMatMul::QTensor(q)) => Ok(q.dequantize(&q.device())?),
            Tier::Resident(QMatMul::Tensor(t)) => Ok(t.clone()),
            Tier::Resident(QMatMul::TensorF16(t)) => Ok(t.to_dtype(candle_core::DType::F32)?),
        }
    }
}

impl std::fmt::Debug for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Weight({} {} {:?})", self.inner.name, self.inner.ty, self.inner.shape)
    }
}
