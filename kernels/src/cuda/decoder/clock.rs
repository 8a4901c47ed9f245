//! `DecodeOptions::step_clock`: where a decode step's wall time goes, host against device.
//!
//! Each [`Decoder::step`](super::Decoder::step) is bracketed by two timing events on the step's
//! stream (the GPU's time from the step's upload to its last kernel) and by host clocks around
//! the upload and launch, and around the logits download and its wait (the logits are then read
//! in place in page-locked memory: no copy). The sums are printed to
//! stderr when the decoder is dropped. A diagnostic: the events cost ~1 µs a step.

use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::cuda_backend::cudarc::driver::{CudaEvent, CudaStream};

use super::driver;
use crate::KernelError;

#[derive(Default)]
pub(super) struct StepClock {
    steps: usize,
    gpu: Duration,
    launch: Duration,
    download: Duration,
}

/// One step in progress: its start event and host clock.
pub(super) struct Tick {
    start: CudaEvent,
    t0: Instant,
}

fn event(stream: &CudaStream) -> Result<CudaEvent, KernelError> {
    stream
        .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(driver("step clock event"))
}

impl StepClock {
    pub fn start(stream: &CudaStream) -> Result<Tick, KernelError> {
        Ok(Tick {
            start: event(stream)?,
            t0: Instant::now(),
        })
    }

    /// After the launch: the event that ends the GPU's part and the host clock at that point.
    pub fn launched(stream: &CudaStream) -> Result<(CudaEvent, Instant), KernelError> {
        Ok((event(stream)?, Instant::now()))
    }

    /// After the download has returned (the stream is idle, so both events have completed).
    pub fn add(&mut self, tick: Tick, (end, t1): (CudaEvent, Instant)) -> Result<(), KernelError> {
        let ms = tick.start.elapsed_ms(&end).map_err(driver("step clock"))?;
        self.steps += 1;
        self.gpu += Duration::from_secs_f64(ms as f64 / 1e3);
        self.launch += t1 - tick.t0;
        self.download += t1.elapsed();
        Ok(())
    }

    pub fn report(&self) -> Option<String> {
        let n = self.steps.max(1) as f64;
        let us = |d: Duration| d.as_secs_f64() * 1e6 / n;
        (self.steps > 0).then(|| {
            format!(
                "hypura: {} fused decode steps: GPU {:.1} µs a step (upload to last kernel); \
                 host {:.1} µs uploading and launching, then {:.1} µs until the logits were \
                 in host memory",
                self.steps,
                us(self.gpu),
                us(self.launch),
                us(self.download)
            )
        })
    }
}
