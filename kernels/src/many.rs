//! Several single-row products that share one input (q/k/v, gate/up) in one parallel region:
//! the input is quantized once per weight, and the threads meet once instead of once per matrix.

use candle_core::quantized::k_quants::{self, GgmlType};
use candle_core::quantized::GgmlDType;

use crate::{as_blocks, KernelError};

/// One weight of a [`matvec_many`] call: `n` rows of type `ty` in `w`, results into `dst` (`n`).
pub struct MatvecPart<'a> {
    pub ty: GgmlDType,
    pub w: &'a [u8],
    pub n: usize,
    pub dst: &'a mut [f32],
}

type RowDot<'a> = Box<dyn Fn(usize) -> f32 + Sync + 'a>;

fn generic<'a, T: GgmlType + 'a>(
    w: &'a [u8],
    n: usize,
    k: usize,
    lhs: &[f32],
) -> Result<RowDot<'a>, KernelError> {
    if !k.is_multiple_of(T::BLCK_SIZE) {
        return Err(KernelError(format!(
            "row length {k} is not a multiple of the block size {}",
            T::BLCK_SIZE
        )));
    }
    let kb = k / T::BLCK_SIZE;
    let blocks = as_blocks::<T>(w)?;
    if blocks.len() != n * kb {
        return Err(KernelError(format!(
            "weight has {} blocks, [{n}, {k}] needs {}",
            blocks.len(),
            n * kb
        )));
    }
    let mut ys = vec![T::VecDotType::zeros(); kb];
    T::VecDotType::from_float(lhs, &mut ys);
    Ok(Box::new(move |r| {
        T::vec_dot(k, &blocks[r * kb..(r + 1) * kb], &ys)
    }))
}

fn row_dot<'a>(
    ty: GgmlDType,
    w: &'a [u8],
    n: usize,
    k: usize,
    lhs: &[f32],
) -> Result<RowDot<'a>, KernelError> {
    #[cfg(target_arch = "x86_64")]
    if let Some(f) = crate::q8_0_x86::row_dot(ty, w, n, k, lhs) {
        return Ok(f);
    }
    match ty {
        GgmlDType::F32 => generic::<f32>(w, n, k, lhs),
        GgmlDType::F16 => generic::<half::f16>(w, n, k, lhs),
        GgmlDType::BF16 => generic::<half::bf16>(w, n, k, lhs),
        GgmlDType::Q4_0 => generic::<k_quants::BlockQ4_0>(w, n, k, lhs),
        GgmlDType::Q4_1 => generic::<k_quants::BlockQ4_1>(w, n, k, lhs),
        GgmlDType::Q5_0 => generic::<k_quants::BlockQ5_0>(w, n, k, lhs),
        GgmlDType::Q5_1 => generic::<k_quants::BlockQ5_1>(w, n, k, lhs),
        GgmlDType::Q8_0 => generic::<k_quants::BlockQ8_0>(w, n, k, lhs),
        GgmlDType::Q2K => generic::<k_quants::BlockQ2K>(w, n, k, lhs),
        GgmlDType::Q3K => generic::<k_quants::BlockQ3K>(w, n, k, lhs),
        GgmlDType::Q4K => generic::<k_quants::BlockQ4K>(w, n, k, lhs),
        GgmlDType::Q5K => generic::<k_quants::BlockQ5K>(w, n, k, lhs),
        GgmlDType::Q6K => generic::<k_quants::BlockQ6K>(w, n, k, lhs),
        other => Err(KernelError(format!(
            "no matmul kernel for {other:?} weights"
        ))),
    }
}

/// For each part, `part.dst = W_part · lhs` (`lhs` has `k` values), all in one parallel region.
pub fn matvec_many(k: usize, lhs: &[f32], parts: &mut [MatvecPart]) -> Result<(), KernelError> {
    if lhs.len() != k {
        return Err(KernelError(format!(
            "input has {} values, expected {k}",
            lhs.len()
        )));
    }
    let mut dots = Vec::with_capacity(parts.len());
    let mut starts = Vec::with_capacity(parts.len() + 1);
    let mut dsts = Vec::with_capacity(parts.len());
    let mut total = 0;
    for p in parts.iter_mut() {
        if p.dst.len() != p.n {
            return Err(KernelError(format!(
                "output has {} values, expected {}",
                p.dst.len(),
                p.n
            )));
        }
        dots.push(row_dot(p.ty, p.w, p.n, k, lhs)?);
        starts.push(total);
        dsts.push(p.dst.as_mut_ptr() as usize);
        total += p.n;
    }
    starts.push(total);
    candle_core::utils::barrier_pool().execute_chunked(total, |rows| {
        for g in rows {
            let part = starts.partition_point(|&s| s <= g) - 1;
            let r = g - starts[part];
            // SAFETY: row r < parts[part].n == dst.len(), and each global row is written by
            // exactly one worker, so the writes never alias.
            unsafe { *(dsts[part] as *mut f32).add(r) = dots[part](r) };
        }
    });
    Ok(())
}
