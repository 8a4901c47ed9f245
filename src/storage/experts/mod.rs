//! Mixture-of-experts weights: a layer's experts as one [`ExpertSet`], resident or streamed on
//! demand through the [`ExpertCache`].
//!
//! The model asks for the experts its router picked ([`ExpertSet::with_routed`]) and gets each
//! one's gate/up/down weights as ordinary [`Weight`]s; it never learns whether they were resident,
//! cached, or just read from disk. The experts missing at one step are read together, slices
//! adjacent in the file merged into one read ([`merged_reads`]).

mod cache;
mod coact;
#[cfg(feature = "cuda")]
mod device;
mod policy;
mod reads;
mod stats;

use std::sync::Arc;

use candle_core::{Device, Shape};

pub(crate) use cache::SliceSpec;
pub use cache::{ExpertCache, ExpertCacheConfig, ExpertData};
pub use coact::CoActivation;
#[cfg(feature = "cuda")]
use device::Order;
#[cfg(feature = "cuda")]
pub use device::{DeviceExpertStats, DeviceExperts};
pub use policy::{simulate, EvictionPolicy, ExpertKey, SimResult, TraceEntry};
pub use reads::{merged_reads, ReadPart, MAX_READ_BYTES, MAX_READ_PARTS};
pub use stats::ExpertStats;

use super::weight::{Tier, Weight};
use crate::error::Result;
use crate::gguf::TensorType;

/// One expert's feed-forward weights.
#[derive(Clone, Debug)]
pub struct ExpertWeights {
    pub gate: Weight, // [n_ff, n_embd]
    pub up: Weight,   // [n_ff, n_embd]
    pub down: Weight, // [n_embd, n_ff]
}

/// Name, type and per-expert shape of one of a layer's three expert tensors.
#[derive(Clone, Debug)]
pub(crate) struct SliceMeta {
    pub name: String,
    pub ty: TensorType,
    pub shape: Shape,
}

enum Source {
    Resident(Vec<ExpertWeights>),
    Cached {
        cache: Arc<ExpertCache>,
        meta: Box<[SliceMeta; 3]>,
        /// The compute device the weights are used on.
        device: Device,
        /// GPU builds: the device expert cache in front of the host one.
        #[cfg(feature = "cuda")]
        gpu: Option<Arc<DeviceExperts>>,
    },
}

/// The experts of one MoE layer.
pub struct ExpertSet {
    layer: usize,
    n_expert: usize,
    source: Source,
}

impl ExpertSet {
    /// The layer these experts belong to.
    pub fn layer(&self) -> usize {
        self.layer
    }

    pub(crate) fn resident(layer: usize, experts: Vec<ExpertWeights>) -> Self {
        ExpertSet {
            layer,
            n_expert: experts.len(),
            source: Source::Resident(experts),
        }
    }

    pub(crate) fn cached(
        layer: usize,
        n_expert: usize,
        cache: Arc<ExpertCache>,
        meta: [SliceMeta; 3],
        device: &Device,
    ) -> Self {
        ExpertSet {
            layer,
            n_expert,
            source: Source::Cached {
                cache,
                meta: Box::new(meta),
                device: device.clone(),
                #[cfg(feature = "cuda")]
                gpu: None,
            },
        }
    }

    /// The same set, with the device expert cache `gpu` in front of the host cache.
    #[cfg(feature = "cuda")]
    pub(crate) fn with_device_cache(mut self, gpu: Arc<DeviceExperts>) -> Self {
        if let Source::Cached { gpu: g, .. } = &mut self.source {
            *g = Some(gpu);
        }
        self
    }

    pub fn n_expert(&self) -> usize {
        self.n_expert
    }

    /// Every expert's weights, when the set is resident (not behind an expert cache).
    pub fn resident_experts(&self) -> Option<&[ExpertWeights]> {
        match &self.source {
            Source::Resident(experts) => Some(experts),
            Source::Cached { .. } => None,
        }
    }

    /// Whether every expert [`with_routed`](Self::with_routed) hands out is in CUDA memory in a
    /// format the fused decoder reads (inner `Err`: why not).
    #[cfg(feature = "cuda")]
    pub(crate) fn fused_ready(&self) -> Result<std::result::Result<(), String>> {
        match &self.source {
            Source::Resident(experts) => {
                for (e, x) in experts.iter().enumerate() {
                    for w in [&x.gate, &x.up, &x.down] {
                        if w.cuda_matrix()?.is_none() {
                            return Ok(Err(format!(
                                "expert {e} of layer {}: {} is {} on the {} tier",
                                self.layer,
                                w.name(),
                                w.ty().name(),
                                w.tier_name()
                            )));
                        }
                    }
                }
                Ok(Ok(()))
            }
            Source::Cached {
                meta, gpu: Some(_), ..
            } => Ok(
                match meta
                    .iter()
                    .find(|m| !hypura_kernels::cuda::supported(m.ty.to_candle()))
                {
                    Some(m) => Err(format!("{} is {}", m.name, m.ty.name())),
                    None => Ok(()),
                },
            ),
            Source::Cached { .. } => Ok(Err(format!(
                "layer {}'s experts are used from host memory",
                self.layer
            ))),
        }
    }

    /// GPU builds: the fused decoder's view of a set behind the device expert cache: the
    /// layer's address table and the experts' (gate, up, down) types; `None` for other sets.
    #[cfg(feature = "cuda")]
    pub(crate) fn served_table(
        &self,
    ) -> Result<
        Option<(
            hypura_kernels::cuda::DeviceBytes,
            [candle_core::quantized::GgmlDType; 3],
        )>,
    > {
        let Source::Cached {
            meta,
            gpu: Some(gpu),
            ..
        } = &self.source
        else {
            return Ok(None);
        };
        let types = [0, 1, 2].map(|i| meta[i].ty.to_candle());
        Ok(Some((gpu.table(self.layer)?, types)))
    }

    /// GPU builds, inside a fused step whose device waits for the answer: puts the chosen
    /// experts `ids` of this layer into device memory (and the address table), from the host
    /// cache or the disk. Counts the request like [`with_routed`](Self::with_routed).
    #[cfg(feature = "cuda")]
    pub(crate) fn serve_device(&self, ids: &[usize]) -> Result<()> {
        let Source::Cached {
            cache,
            meta,
            gpu: Some(gpu),
            ..
        } = &self.source
        else {
            return Err(crate::Error::InvalidRequest(format!(
                "layer {}'s experts are not behind the device expert cache",
                self.layer
            )));
        };
        let (layer, per_token) = (self.layer, [ids.to_vec()]);
        let (_, miss) = gpu.lookup(layer, ids);
        let held = |k: ExpertKey| gpu.contains(k);
        cache.serve_some(layer, &per_token, Some(&miss), &held, &mut |e, data| {
            gpu.insert(layer, e, data, meta, ids, Order::DeviceWaiting)
                .map(drop)
        })
    }

    /// GPU builds, after a fused step that found this layer's chosen experts `ids` all in
    /// device memory: counts the request and lets both caches learn from it (nothing is read).
    #[cfg(feature = "cuda")]
    pub(crate) fn note_device_hits(&self, ids: &[usize]) {
        if let Source::Cached {
            cache,
            gpu: Some(gpu),
            ..
        } = &self.source
        {
            gpu.lookup(self.layer, ids);
            cache.observe(self.layer, &[ids.to_vec()]);
        }
    }

    /// Calls `visit(e, weights)` once for each expert that some token was routed to
    /// (`per_token[t]` = token `t`'s experts). Resident experts come in id order; streamed ones
    /// in the order they become available (cached first), so callers that sum expert outputs
    /// must fix their own order.
    pub fn with_routed(
        &self,
        per_token: &[Vec<usize>],
        mut visit: impl FnMut(usize, &ExpertWeights) -> Result<()>,
    ) -> Result<()> {
        match &self.source {
            Source::Resident(experts) => {
                let mut used: Vec<usize> = per_token.iter().flatten().copied().collect();
                used.sort_unstable();
                used.dedup();
                for e in used {
                    let w = experts.get(e).ok_or_else(|| {
                        crate::Error::InvalidRequest(format!(
                            "expert {e} of {} routed at layer {}",
                            experts.len(),
                            self.layer
                        ))
                    })?;
                    visit(e, w)?;
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Source::Cached {
                cache,
                meta,
                gpu: Some(gpu),
                ..
            } => {
                let mut used: Vec<usize> = per_token.iter().flatten().copied().collect();
                used.sort_unstable();
                used.dedup();
                let (hit, miss) = gpu.lookup(self.layer, &used);
                for &e in &hit {
                    visit(e, &gpu.weights(self.layer, e, meta)?)?;
                }
                // The host cache learns from the whole routing, fetches only what the device
                // lacks, and prefetches nothing the device already holds.
                let layer = self.layer;
                let held = |k: ExpertKey| gpu.contains(k);
                cache.serve_some(layer, per_token, Some(&miss), &held, &mut |e, data| {
                    let w = gpu.insert(layer, e, data, meta, &used, Order::AfterIssued)?;
                    visit(e, &w)
                })
            }
            Source::Cached {
                cache,
                meta,
                device,
                ..
            } => cache.serve(self.layer, per_token, &mut |e, data| {
                let w = |i: usize| {
                    let m = &meta[i];
                    Weight::new(
                        &format!("{}[{e}]", m.name),
                        m.ty,
                        m.shape.clone(),
                        Tier::Cached {
                            data: data.clone(),
                            which: i,
                        },
                        device,
                    )
                    .with_transient_repack(true)
                    .with_batch_math(super::BatchMath::Int8)
                };
                visit(
                    e,
                    &ExpertWeights {
                        gate: w(0),
                        up: w(1),
                        down: w(2),
                    },
                )
            }),
        }
    }
}
