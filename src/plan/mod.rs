//! Placement planning: which tier holds each tensor, how streamed tensors are read, and what
//! that should cost. [`planner::plan`] is a pure function; [`Placement`] is what storage carries out.

mod experts;
mod gpu;
mod gpu_experts;
mod placement;
mod planner;

pub use experts::{expert_bytes, ExpertOptions};
pub use gpu::gpu_pool_slots;
pub use placement::{is_expert_tensor, layer_of, Placement, RamCompute, TierKind};
pub use planner::{
    gib, mib, parse_bytes, plan, Budgets, BytesPerToken, Mode, Override, Plan, PlanInput, Rates,
};
