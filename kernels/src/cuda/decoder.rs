//! [`Decoder`]: one decode step as a fixed kernel sequence, replayed from a CUDA graph.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::sys::{
    CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode,
};
use candle_core::cuda_backend::cudarc::driver::{
    CudaEvent, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DevicePtr, DriverError,
    LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;

use super::shapes::{AttShape, MvShape, ATT_LONG_SPLIT, MV_WARPS};
use super::{type_id, DecodeSpec, DeviceMatrix, FfnSpec, MoeExperts, RopePairs, MAX_EXPERTS_USED};
use crate::KernelError;

/// decode.cu compiled by build.rs: machine code for the build's compute capability, plus PTX.
const FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/decode.fatbin"));
fn driver(what: &str) -> impl Fn(DriverError) -> KernelError + '_ {
    move |e| KernelError(format!("CUDA {what}: {e}"))
}

/// Launches kernel `$name` of `$self` with `cfg` and the listed arguments, in order.
/// While profiling, each launch is bracketed by a pair of timing events under a label.
macro_rules! launch {
    ($self:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {
        launch!(@labelled $self, $name, || $name.to_string(), $cfg, $($arg),+)
    };
    (@labelled $self:expr, $name:expr, $label:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let name: &str = $name;
        let func = $self.func(name)?;
        let start = $self.profile_event()?;
        // SAFETY: every argument is a device address of a buffer this decoder owns or borrows
        // through `DeviceBytes` (alive as long as the decoder), sized as `DecodeSpec::validate`
        // checked, or a scalar; the kernel signatures in decode.cu take exactly these arguments
        // in this order. Each argument is a reference to a local or a field, never to a
        // temporary, so the pointers in `params` stay valid through the launch.
        if $self.dependent.get() {
            let mut params = [$( $arg as *const _ as *mut std::ffi::c_void ),+];
            unsafe { $self.launch_dependent(func, $cfg, &mut params) }.map_err(driver(name))?;
        } else {
            let mut b = $self.stream.launch_builder(func);
            $( b.arg($arg); )+
            unsafe { b.launch($cfg) }.map_err(driver(name))?;
        }
        if let Some(start) = start {
            let end = $self.profile_event()?.expect("profiling");
            if let Some(p) = $self.prof.borrow_mut().as_mut() {
                p.push(($label(), start, end));
            }
        }
        Ok::<(), KernelError>(())
    }};
}

/// A buffer the decoder owns, with its address cached (the graph bakes addresses in).
struct Buf<T> {
    slice: CudaSlice<T>,
    ptr: u64,
}

impl<T> Buf<T> {
    fn new(slice: CudaSlice<T>, stream: &CudaStream) -> Self {
        let ptr = slice.device_ptr(stream).0;
        Buf { slice, ptr }
    }
}

struct Layer {
    attn_norm: Buf<f32>,
    ffn_norm: Buf<f32>,
    biases: [Option<Buf<f32>>; 3], // q, k, v
    k_cache: u64,
    v_cache: u64,
    /// A MoE block: its experts' address table (3 per expert: gate, up, down), the decoder's
    /// own copy when they are resident (`own_table`), else the caller's; 0 in dense blocks.
    expert_table: u64,
    own_table: Option<Buf<u64>>,
    /// The experts' kernel type ids (gate, up, down), their number and how many a token uses.
    expert_types: [i32; 3],
    n_expert: usize,
    n_expert_used: usize,
    /// Whether the caller's caches serve the block's experts ([`MoeExperts::Served`]).
    served: bool,
}

/// A captured graph. cudarc's `CudaGraph` holds raw CUDA handles and so is not `Send`.
struct Graph(CudaGraph);

// SAFETY: a CUDA graph exec may be launched from any thread; the only requirement is that calls
// on it are not concurrent. The graph lives inside a `Decoder` and is used only through
// `&mut Decoder`, so every call on it is serialized.
unsafe impl Send for Graph {}

/// The fused single-token decoder of one model (see the module docs).
pub struct Decoder {
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    funcs: HashMap<&'static str, CudaFunction>,
    spec: DecodeSpec,
    layers: Vec<Layer>,
    out_norm: Buf<f32>,
    rope_cos: Buf<f32>,
    rope_sin: Buf<f32>,
    step: Buf<u32>, // [token, pos]
    x: Buf<f32>,    // [n_embd] the residual stream
    xn: Buf<f32>,   // [n_embd] normed
    q: Buf<f32>,    // [n_head * head_dim]
    k: Buf<f32>,    // [n_head_kv * head_dim]
    v: Buf<f32>,    // [n_head_kv * head_dim]
    att: Buf<f32>,  // [n_head * head_dim]
    // Softmax partials when a head's keys are split over blocks: [n_head, n_split, hd + 2].
    att_part: Buf<f32>,
    ffn: Buf<f32>, // [n_ff] silu(gate · xn) * (up · xn)
    // The current mat-vec input quantized to int8 blocks of 32 (for k-quant rows).
    xq: Buf<i8>,      // [max(n_embd, n_ff, n_head * head_dim)]
    xd: Buf<f32>,     // [that / 32] block scales
    xs: Buf<f32>,     // [that / 32] scale · Σq per block
    logits: Buf<f32>, // [n_vocab]
    /// Where the logits are downloaded to (page-locked).
    logits_host: HostLogits,
    /// Where greedy chains download each step's token id (page-locked; two slots, one per step
    /// in flight).
    ids_host: Pinned<u32>,
    /// Top-k candidates' buffers (decoder/topk.rs).
    topk: TopK,
    // Mixture-of-experts blocks: the router's logits; each block's routing (`moe_route`: the
    // chosen ids as floats, then their weights); each chosen expert's output by rank; and the
    // experts' hidden states as int8 (so `xq` keeps the normed input for every expert). `ffn`
    // holds the experts' hidden states by rank. One element each in dense models.
    router: Buf<f32>, // [n_expert]
    route: Buf<f32>,  // [n_layer, 2 * MAX_EXPERTS_USED]
    /// Where the device asks the host for experts (models with served MoE blocks).
    mail: Option<Mail>,
    ys: Buf<f32>, // [n_expert_used, n_embd]
    fq: Buf<i8>,  // [n_expert_used * n_ff]
    fd: Buf<f32>, // [that / 32]
    fs: Buf<f32>, // [that / 32]
    /// Folded norms (norms.rs): which ones, the int8 copy of `x ⊙ w` their producers write
    /// (`[n_embd]` and its block scales), and the producers' `Σx²` per block.
    folds: Folds,
    xq_n: Buf<i8>,
    xd_n: Buf<f32>,
    xs_n: Buf<f32>,
    norm_part: Buf<f32>, // [n_embd / 32]
    /// One graph per attention shape ([`AttShape::regime`]) and ending (the logits, or the
    /// logits' argmax as the next step's token: [`Decoder::greedy_chain`]), captured at its
    /// first step ([`graph_index`]).
    graphs: [Option<Graph>; 6],
    use_graph: bool,
    /// Why the graph capture failed, if it did (steps then launch kernels one by one).
    capture_failure: Option<String>,
    /// Set only inside [`Decoder::profile_step`].
    prof: RefCell<Option<Vec<(String, CudaEvent, CudaEvent)>>>,
    /// [`DecodeOptions::dependent_launch`].
    dependent_launch: bool,
    /// [`DecodeOptions::fused_router`].
    fused_router: bool,
    /// Launches go out as programmatic dependent launches (only while a graph is captured).
    dependent: Cell<bool>,
    /// The most dynamic shared memory a staged kernel (`matvec_norm_st_*`, `moe_down_st_*`) may
    /// take here.
    staged_smem_max: usize,
    /// [`DecodeOptions::step_clock`].
    clock: Option<StepClock>,
}

impl Decoder {
    /// Loads the kernels and allocates the step's buffers. With `options.graph`, the first
    /// [`step`](Self::step) captures the kernel sequence into a CUDA graph; without it (or if
    /// capture fails) every step launches the kernels one by one. Same results either way.
    pub fn new(
        stream: Arc<CudaStream>,
        spec: DecodeSpec,
        options: DecodeOptions,
    ) -> Result<Self, KernelError> {
        spec.validate()?;
        let module = stream
            .context()
            .load_module(Ptx::from_binary(FATBIN.to_vec()))
            .map_err(driver("loading the decode kernels"))?;
        let mut funcs = HashMap::new();
        for &name in KERNELS {
            let f = module.load_function(name).map_err(driver(name))?;
            funcs.insert(name, f);
        }
        let staged_smem_max = if options.staged_down {
            allow_staged_smem(&stream, &funcs)?
        } else {
            0
        };
        let up = |v: &[f32]| -> Result<Buf<f32>, KernelError> {
            let s = stream.clone_htod(v).map_err(driver("upload"))?;
            Ok(Buf::new(s, &stream))
        };
        let zeros = |n: usize| -> Result<Buf<f32>, KernelError> {
            let s = stream
                .alloc_zeros::<f32>(n.max(1))
                .map_err(driver("alloc"))?;
            Ok(Buf::new(s, &stream))
        };
        let mut layers = Vec::with_capacity(spec.layers.len());
        for l in &spec.layers {
            let bias = |b: &Option<Vec<f32>>| b.as_deref().map(up).transpose();
            let mut layer = Layer {
                attn_norm: up(&l.attn_norm)?,
                ffn_norm: up(&l.ffn_norm)?,
                biases: [bias(&l.q_bias)?, bias(&l.k_bias)?, bias(&l.v_bias)?],
                k_cache: l.k_cache.ptr,
                v_cache: l.v_cache.ptr,
                expert_table: 0,
                own_table: None,
                expert_types: [0; 3],
                n_expert: 0,
                n_expert_used: 0,
                served: false,
            };
            if let FfnSpec::Moe {
                experts,
                router,
                n_expert_used,
                ..
            } = &l.ffn
            {
                layer.n_expert = router.rows;
                layer.n_expert_used = *n_expert_used;
                match experts {
                    MoeExperts::Resident(experts) => {
                        let table: Vec<u64> = experts.iter().flat_map(|x| x.ptrs()).collect();
                        let t = stream.clone_htod(&table).map_err(driver("upload"))?;
                        let t = Buf::new(t, &stream);
                        layer.expert_table = t.ptr;
                        layer.own_table = Some(t);
                        layer.expert_types = experts[0].types();
                    }
                    MoeExperts::Served { table, types, .. } => {
                        layer.expert_table = table.ptr;
                        layer.expert_types = types.map(type_id);
                        layer.served = true;
                    }
                }
            }
            layers.push(layer);
        }
        let (qd, kvd) = (spec.n_head * spec.head_dim, spec.n_head_kv * spec.head_dim);
        let step = stream.alloc_zeros::<u32>(2).map_err(driver("alloc"))?;
        let (k_max, n_expert) = spec.max_experts();
        let n_ff_moe = spec.moe_n_ff();
        let n_ff = spec.n_ff.max(k_max * n_ff_moe);
        let widest = spec.n_embd.max(spec.n_ff).max(qd);
        let int8 = |n: usize| -> Result<Buf<i8>, KernelError> {
            let s = stream
                .alloc_zeros::<i8>(n.max(1))
                .map_err(driver("alloc"))?;
            Ok(Buf::new(s, &stream))
        };
        let folds = Folds::plan(&spec, &options);
        Ok(Decoder {
            folds,
            xq_n: int8(spec.n_embd)?,
            xd_n: zeros(spec.n_embd / 32)?,
            xs_n: zeros(spec.n_embd / 32)?,
            norm_part: zeros(spec.n_embd / NORM_ROWS)?,
            out_norm: up(&spec.out_norm)?,
            rope_cos: up(&spec.rope_cos)?,
            rope_sin: up(&spec.rope_sin)?,
            step: Buf::new(step, &stream),
            x: zeros(spec.n_embd)?,
            xn: zeros(spec.n_embd)?,
            q: zeros(qd)?,
            k: zeros(kvd)?,
            v: zeros(kvd)?,
            att: zeros(qd)?,
            att_part: zeros(spec.n_head * ATT_LONG_SPLIT as usize * (spec.head_dim + 2))?,
            ffn: zeros(n_ff)?,
            xq: int8(widest)?,
            xd: zeros(widest / 32)?,
            xs: zeros(widest / 32)?,
            logits: zeros(spec.n_vocab)?,
            logits_host: HostLogits::new(&stream, spec.n_vocab)?,
            ids_host: Pinned::new(&stream, 2, "page-locked token ids alloc")?,
            topk: TopK::new(&stream)?,
            router: zeros(n_expert)?,
            route: zeros(spec.layers.len() * 2 * MAX_EXPERTS_USED)?,
            mail: if spec.needs_host() {
                Some(Mail::new(stream.context())?)
            } else {
                None
            },
            ys: zeros(k_max * spec.n_embd)?,
            fq: int8(k_max * n_ff_moe)?,
            fd: zeros(k_max * n_ff_moe / 32)?,
            fs: zeros(k_max * n_ff_moe / 32)?,
            layers,
            spec,
            funcs,
            _module: module,
            stream,
            graphs: Default::default(),
            use_graph: options.graph,
            capture_failure: None,
            prof: RefCell::new(None),
            dependent_launch: options.dependent_launch,
            fused_router: options.fused_router,
            clock: options.step_clock.then(StepClock::default),
            dependent: Cell::new(false),
            staged_smem_max,
        })
    }

    /// Whether steps replay a captured CUDA graph (false until the first step, or if capture
    /// was refused).
    pub fn graph_captured(&self) -> bool {
        self.graphs.iter().any(Option::is_some)
    }

    /// The model's vocabulary size (the length of a step's logits).
    pub fn n_vocab(&self) -> usize {
        self.spec.n_vocab
    }

    /// Whether the caller's caches serve some MoE block's experts (steps then go through
    /// [`Decoder::step_served`]).
    pub fn needs_host(&self) -> bool {
        self.spec.needs_host()
    }

    /// Why CUDA refused to capture the step into a graph, if it did.
    pub fn capture_failure(&self) -> Option<&str> {
        self.capture_failure.as_deref()
    }

    /// Runs one token at position `pos` (its k and v land in the cache at `pos`); returns the
    /// `[n_vocab]` logits, in place in page-locked host memory (valid until the next step).
    /// `row` is the token's embedding row when the table is not on the device
    /// ([`DecodeSpec::embed`] `None`), and ignored otherwise.
    pub fn step(
        &mut self,
        token: u32,
        pos: usize,
        row: Option<&[f32]>,
    ) -> Result<&[f32], KernelError> {
        if self.spec.needs_host() {
            return Err(KernelError(
                "a mixture-of-experts model whose experts are served by the caller's caches \
                 steps through Decoder::step_served"
                    .into(),
            ));
        }
        let Some(_) = self.clock else {
            self.launch_step(token, pos, row, None)?;
            return self.download_logits();
        };
        let tick = StepClock::start(&self.stream)?;
        self.launch_step(token, pos, row, None)?;
        let launched = StepClock::launched(&self.stream)?;
        self.download_logits()?;
        if let Some(c) = self.clock.as_mut() {
            c.add(tick, launched)?;
        }
        Ok(self.logits_host.get())
    }

    /// Uploads the step's inputs and launches its kernels (the graph of its attention shape,
    /// captured on first use, or one by one; then `serve` answers the device's requests for
    /// experts as each MoE block is reached, so the host never runs far ahead of a waiting device).
    fn launch_step(
        &mut self,
        token: u32,
        pos: usize,
        row: Option<&[f32]>,
        serve: Option<Serve<'_>>,
    ) -> Result<(), KernelError> {
        self.upload_step(token, pos, row)?;
        let n_kv = pos + 1;
        let g = graph_index(n_kv, false);
        if self.use_graph && self.graphs[g].is_none() {
            self.capture(n_kv, false);
        }
        match &self.graphs[g] {
            Some(g) => g.0.launch().map_err(driver("graph launch")),
            None => self.record(n_kv, serve),
        }
    }

    /// Checks and uploads the step's `[token, pos]` (and the embedding row, if given here).
    fn upload_step(
        &mut self,
        token: u32,
        pos: usize,
        row: Option<&[f32]>,
    ) -> Result<(), KernelError> {
        if pos >= self.spec.n_ctx || token as usize >= self.spec.n_vocab {
            return Err(KernelError(format!(
                "fused decode of token {token} at position {pos}: outside n_vocab {} / n_ctx {}",
                self.spec.n_vocab, self.spec.n_ctx
            )));
        }
        self.stream
            .memcpy_htod(&[token, pos as u32], &mut self.step.slice)
            .map_err(driver("step upload"))?;
        if self.spec.embed.is_none() {
            let row = row.filter(|r| r.len() == self.spec.n_embd).ok_or_else(|| {
                KernelError(format!(
                    "fused decode: the embedding table is on the host, so each step needs \
                     the token's row of {} values",
                    self.spec.n_embd
                ))
            })?;
            self.stream
                .memcpy_htod(row, &mut self.x.slice)
                .map_err(driver("embedding row upload"))?;
        }
        Ok(())
    }

    fn download_logits(&mut self) -> Result<&[f32], KernelError> {
        self.logits_host.download(&self.stream, self.logits.ptr)
    }

    /// Like [`step_served`](Self::step_served) (for a dense model or resident experts `serve`
    /// is never called), but launches the kernels one by one, each between two timing events;
    /// also returns the GPU time per kernel label (kernel and shape), largest first.
    pub fn profile_step(
        &mut self,
        token: u32,
        pos: usize,
        row: Option<&[f32]>,
        serve: Serve<'_>,
    ) -> Result<(Vec<f32>, Vec<KernelTime>), KernelError> {
        let graphs = std::mem::take(&mut self.graphs);
        let use_graph = std::mem::replace(&mut self.use_graph, false);
        *self.prof.borrow_mut() = Some(Vec::new());
        let out = self
            .step_served(token, pos, row, serve)
            .map(<[f32]>::to_vec);
        let times = self.finish_profile();
        self.graphs = graphs;
        self.use_graph = use_graph;
        Ok((out?, times?))
    }

    /// Stops profiling; the GPU time per kernel label (kernel and shape) since profiling
    /// started, largest first.
    fn finish_profile(&mut self) -> Result<Vec<KernelTime>, KernelError> {
        let events = self.prof.borrow_mut().take().unwrap_or_default();
        let mut by: Vec<KernelTime> = Vec::new();
        for (label, start, end) in events {
            let us = start.elapsed_ms(&end).map_err(driver("event timing"))? as f64 * 1e3;
            match by.iter_mut().find(|k| k.label == label) {
                Some(k) => {
                    k.launches += 1;
                    k.total_us += us;
                }
                None => by.push(KernelTime {
                    label,
                    launches: 1,
                    total_us: us,
                }),
            }
        }
        by.sort_by(|a, b| b.total_us.total_cmp(&a.total_us));
        Ok(by)
    }

    fn profile_event(&self) -> Result<Option<CudaEvent>, KernelError> {
        if self.prof.borrow().is_none() {
            return Ok(None);
        }
        let flags = CUevent_flags::CU_EVENT_DEFAULT;
        let e = self
            .stream
            .record_event(Some(flags))
            .map_err(driver("event"))?;
        Ok(Some(e))
    }

    /// Captures [`record`](Self::record) (then, if `greedy`, [`argmax_next`](Self::argmax_next))
    /// into a graph; on any failure, steps stay direct (the same kernels, so the same numbers)
    /// and [`capture_failure`](Self::capture_failure) says why.
    fn capture(&mut self, n_kv: usize, greedy: bool) {
        let mode = CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
        let outcome = match self.stream.begin_capture(mode) {
            Err(e) => Err(format!("begin capture: {e}")),
            Ok(()) => {
                self.dependent.set(self.dependent_launch);
                let mut recorded = self.record(n_kv, None);
                if greedy && recorded.is_ok() {
                    recorded = self.argmax_next();
                }
                self.dependent.set(false);
                let graph = self.stream.end_capture(CUgraphInstantiate_flags(0));
                match (recorded, graph) {
                    (Ok(()), Ok(Some(g))) => Ok(g),
                    (Err(e), _) => Err(e.to_string()),
                    (_, Err(e)) => Err(format!("end capture: {e}")),
                    (_, Ok(None)) => Err("end capture: empty graph".into()),
                }
            }
        };
        match outcome {
            Ok(g) => self.graphs[graph_index(n_kv, greedy)] = Some(Graph(g)),
            Err(why) => {
                self.use_graph = false;
                self.capture_failure = Some(why);
            }
        }
    }

    /// Issues the kernels of one step over `n_kv` keys on the stream, in order (the position
    /// itself is read on the device: the same kernels serve every `n_kv` of its regime).
    /// Launched directly (not captured), with `serve`: after each served MoE block's routing,
    /// answers the device's requests until the stream has got past it.
    fn record(&self, n_kv: usize, mut serve: Option<Serve<'_>>) -> Result<(), KernelError> {
        let att = AttShape::for_keys(n_kv, self.spec.head_dim);
        self.embed()?;
        for i in 0..self.layers.len() {
            self.attention(i, att)?;
            match &self.spec.layers[i].ffn {
                FfnSpec::Dense { gate, up, down } => self.dense_ffn(i, gate, up, down)?,
                FfnSpec::Moe {
                    router,
                    n_expert_used,
                    n_ff,
                    ..
                } => {
                    self.moe_block(i, router, *n_expert_used, *n_ff)?;
                    if let Some(serve) = serve.as_deref_mut().filter(|_| self.layers[i].served) {
                        self.answer_requests(serve)?;
                    }
                }
            }
        }
        self.head()
    }

    /// `x += down · swiglu(xn)` for dense block `i` (down also writing the next norm's
    /// input where that norm folds).
    fn dense_ffn(
        &self,
        i: usize,
        gate: &DeviceMatrix,
        up: &DeviceMatrix,
        down: &DeviceMatrix,
    ) -> Result<(), KernelError> {
        self.swiglu(gate, up, self.folds.ffn[i])?;
        let norm = self.norm_after(i);
        if let Some(w) = norm.filter(|_| quantizes_own_input(down)) {
            return self.matvec_norm(down, ProducerInput::F32(self.ffn.ptr), w);
        }
        self.quantize(self.ffn.ptr, gate.rows, self.q8())?;
        match norm {
            Some(w) => self.matvec_norm(down, ProducerInput::Int8(self.ffn.ptr), w),
            None => {
                let (x, q8) = (self.x.ptr, self.q8());
                self.matvec(down, self.ffn.ptr, q8, x, x, NormIn::NONE)
            }
        }
    }

    /// The logits from the residual stream: output norm and output matrix.
    fn head(&self) -> Result<(), KernelError> {
        let (s, folded) = (&self.spec, self.folds.out);
        if !folded {
            self.rms_norm(self.x.ptr, self.out_norm.ptr, self.xn.ptr)?;
        }
        let nin = self.norm_in(folded);
        let q8 = self.q8_in(folded);
        self.matvec(&s.output, self.xn.ptr, q8, self.logits.ptr, 0, nin)
    }

    /// Block `i` up to its feed-forward: `x += attention(norm(x))`, then `xn` (and the int8
    /// buffers) = the feed-forward's normed input.
    fn attention(&self, i: usize, att: AttShape) -> Result<(), KernelError> {
        let (s, l, spec) = (&self.spec, &self.layers[i], &self.spec.layers[i]);
        let hd = s.head_dim as i32;
        let in_kernel_quant = s.head_dim.is_multiple_of(32);
        let folded = self.folds.attn[i];
        if !folded {
            self.rms_norm(self.x.ptr, l.attn_norm.ptr, self.xn.ptr)?;
        }
        self.qkv(l, spec, folded)?;
        let (nh, rd) = (s.n_head as i32, s.rope_dim as i32);
        let style: i32 = match s.rope_pairs {
            RopePairs::Interleaved => 0,
            RopePairs::HalfSplit => 1,
        };
        let n_ctx = s.n_ctx as i32;
        let (nkv, n_split, chunk_min) =
            (s.n_head_kv as i32, att.n_split as i32, att.chunk_min as i32);
        let scale = 1.0f32 / (s.head_dim as f32).sqrt();
        let cfg = LaunchConfig {
            grid_dim: (s.n_head as u32, att.n_split, 1),
            block_dim: (32, att.warps, 1),
            shared_mem_bytes: 0,
        };
        // The output in int8 blocks straight from the kernel when heads are whole blocks.
        let (oq, od, os) = if in_kernel_quant {
            (self.xq.ptr, self.xd.ptr, self.xs.ptr)
        } else {
            (0, 0, 0)
        };
        launch!(
            self,
            att.kernel,
            cfg,
            &self.q.ptr,
            &self.k.ptr,
            &self.v.ptr,
            &l.k_cache,
            &l.v_cache,
            &self.att.ptr,
            &self.rope_cos.ptr,
            &self.rope_sin.ptr,
            &self.step.ptr,
            &nh,
            &nkv,
            &hd,
            &rd,
            &style,
            &n_ctx,
            &scale,
            &oq,
            &od,
            &os,
            &self.att_part.ptr,
            &n_split,
            &chunk_min
        )?;
        if att.n_split > 1 {
            let cfg = LaunchConfig {
                grid_dim: (s.n_head as u32, 1, 1),
                block_dim: ((s.head_dim as u32).next_multiple_of(32), 1, 1),
                shared_mem_bytes: 0,
            };
            launch!(
                self,
                "attention_merge",
                cfg,
                &self.att_part.ptr,
                &self.att.ptr,
                &self.step.ptr,
                &hd,
                &n_split,
                &chunk_min,
                &oq,
                &od,
                &os
            )?;
        }
        if !in_kernel_quant {
            self.quantize(self.att.ptr, s.n_head * s.head_dim, self.q8())?;
        }
        if self.folds.ffn[i] {
            let input = ProducerInput::Int8(self.att.ptr);
            return self.matvec_norm(&spec.o, input, l.ffn_norm.ptr);
        }
        let (x, q8) = (self.x.ptr, self.q8());
        self.matvec(&spec.o, self.att.ptr, q8, x, x, NormIn::NONE)?;
        self.rms_norm(self.x.ptr, l.ffn_norm.ptr, self.xn.ptr)
    }
}

mod clock;
mod greedy;
mod launches;
mod mail;
mod moe;
mod norms;
mod options;
mod pinned;
mod topk;
use clock::StepClock;
use greedy::graph_index;
use launches::grid1;
use mail::Mail;
pub use moe::Serve;
use norms::{quantizes_own_input, Folds, NormIn, ProducerInput, NORM_ROWS};
use options::{allow_staged_smem, KERNELS};
pub use options::{DecodeOptions, KernelTime};
use pinned::{HostLogits, Pinned};
pub use topk::StepLogits;
use topk::TopK;

impl Drop for Decoder {
    fn drop(&mut self) {
        if let Some(line) = self.clock.as_ref().and_then(StepClock::report) {
            eprintln!("{line}");
        }
    }
}
