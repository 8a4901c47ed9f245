//! Placement planning: which tier holds each tensor.

mod placement;

pub use placement::{layer_of, Placement, TierKind};
