//! The worker: one thread owns the model (it is not `Sync`) and runs jobs one at a time, in the
//! order they were submitted. Each job streams its text back over its own channel; a job whose
//! channel is closed (its client went away) stops at the next token, or is skipped if it has not
//! started.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::stop::StopMatcher;
use crate::error::{Error, Result};
use crate::generate::{generate_after, GenerateOptions, Sampler, SamplingParams, StopReason};
use crate::loader::LoadedModel;
use crate::models::LanguageModel;
use crate::tokenizer::StreamDecoder;

/// One generation request, tokenized and checked by the HTTP handler.
#[derive(Clone, Debug)]
pub struct Job {
    /// The whole prompt (BOS included when the model wants one).
    pub tokens: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
}

/// Why a reply ended, in API terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// End-of-generation token or a stop string.
    Stop,
    /// The token limit or the context size.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What a finished job reports.
#[derive(Clone, Debug)]
pub struct Summary {
    pub finish: Finish,
    /// Prompt tokens, and how many of them the KV cache already held from the previous job.
    pub n_prompt: usize,
    pub n_cached: usize,
    /// Generated tokens (as sampled; a stop string's tokens included).
    pub generated: Vec<u32>,
    pub queued_seconds: f64,
    pub prompt_seconds: f64,
    pub generate_seconds: f64,
}

/// What the worker sends back for a job.
#[derive(Clone, Debug)]
pub enum Event {
    /// The next piece of the reply's text.
    Text(String),
    Done(Summary),
    /// The job failed (the model's state was reset; the next job runs normally).
    Failed(String),
}

/// Counts since the worker started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Jobs whose reply was delivered.
    pub completed: u64,
    /// Jobs whose client went away (before they started, or while generating).
    pub cancelled: u64,
    pub failed: u64,
    /// Prompt tokens computed (those reused from the cache not counted).
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    /// Jobs waiting to start now.
    pub waiting: usize,
}

/// Worker settings.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// Jobs that may wait (beyond the one running) before new ones are refused.
    pub max_queue: usize,
    /// Reuse the KV cache when a prompt extends the previous job's prompt and reply.
    pub cache_prompt: bool,
    /// Prompt tokens per forward pass.
    pub batch_size: usize,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            max_queue: 64,
            cache_prompt: true,
            batch_size: 512,
        }
    }
}

/// The sending side of the job queue (cheap to share between handlers).
#[derive(Clone)]
pub struct Queue {
    tx: mpsc::Sender<Queued>,
    max: usize,
    control: Control,
}

/// Why a job was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// This many jobs are already waiting.
    Busy(usize),
    /// The worker thread has ended.
    Stopped,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Busy(n) => write!(f, "the server is busy: {n} requests are already waiting"),
            Refused::Stopped => write!(f, "the model worker has stopped"),
        }
    }
}

/// The worker's counters, and the switch that stops it.
#[derive(Clone, Default)]
pub(crate) struct Control {
    stats: Arc<Mutex<WorkerStats>>,
    waiting: Arc<AtomicUsize>,
    stopping: Arc<AtomicBool>,
}

impl Control {
    pub(crate) fn read(&self) -> WorkerStats {
        WorkerStats {
            waiting: self.waiting.load(Ordering::SeqCst),
            ..self.stats.lock().map(|s| *s).unwrap_or_default()
        }
    }

    /// Ends the running job at its next token and refuses the waiting ones, so that the
    /// server can shut down.
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

const SHUTTING_DOWN: &str = "the server is shutting down";

struct Queued {
    job: Job,
    events: UnboundedSender<Event>,
    at: Instant,
}

impl Queue {
    /// Queues `job` behind those already submitted; its events come on the returned channel.
    /// Dropping the receiver cancels the job. Fails when the queue is full or the worker is gone.
    pub fn submit(&self, job: Job) -> std::result::Result<UnboundedReceiver<Event>, Refused> {
        let waiting = &self.control.waiting;
        if waiting.fetch_add(1, Ordering::SeqCst) >= self.max {
            waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused::Busy(self.max));
        }
        let (events, rx) = unbounded_channel();
        let q = Queued {
            job,
            events,
            at: Instant::now(),
        };
        if self.tx.send(q).is_err() {
            waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused::Stopped);
        }
        Ok(rx)
    }

    /// What the worker has done so far.
    pub fn stats(&self) -> WorkerStats {
        self.control.read()
    }

    /// The worker's counters and stop switch, usable without holding a queue handle (the
    /// worker ends when the last queue handle is dropped).
    pub(crate) fn control(&self) -> Control {
        self.control.clone()
    }
}

/// Starts the worker thread, which owns `model` until every [`Queue`] clone is dropped; then it
/// saves what the model learned (MoE expert statistics) and ends.
pub fn spawn(model: LoadedModel, opts: WorkerOptions) -> Result<(Queue, JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel::<Queued>();
    let control = Control::default();
    let queue = Queue {
        tx,
        max: opts.max_queue.max(1),
        control: control.clone(),
    };
    let handle = std::thread::Builder::new()
        .name("hypura-model".into())
        .spawn(move || {
            let mut w = Worker::new(model, opts, control);
            while let Ok(q) = rx.recv() {
                w.control.waiting.fetch_sub(1, Ordering::SeqCst);
                w.run(q);
            }
            if let Err(e) = w.m.save_learned() {
                eprintln!("hypura serve: saving the expert statistics failed: {e}");
            }
        })
        .map_err(|e| Error::InvalidRequest(format!("starting the model thread: {e}")))?;
    Ok((queue, handle))
}

struct Worker {
    m: LoadedModel,
    control: Control,
    opts: WorkerOptions,
    stop_ids: Vec<u32>,
    /// Tokens the KV cache holds.
    cached: Vec<u32>,
}

impl Worker {
    fn new(m: LoadedModel, opts: WorkerOptions, control: Control) -> Self {
        let stop_ids = (0..m.tokenizer.n_vocab() as u32)
            .filter(|&id| m.tokenizer.is_end_of_generation(id))
            .collect();
        Worker {
            m,
            control,
            opts,
            stop_ids,
            cached: Vec::new(),
        }
    }

    fn run(&mut self, q: Queued) {
        if q.events.is_closed() {
            self.count(|s| s.cancelled += 1); // the client left while the job waited
            return;
        }
        if self.control.stopping() {
            self.count(|s| s.cancelled += 1);
            let _ = q.events.send(Event::Failed(SHUTTING_DOWN.into()));
            return;
        }
        let queued_seconds = q.at.elapsed().as_secs_f64();
        match self.generate(&q.job, &q.events) {
            Ok(mut s) => {
                s.queued_seconds = queued_seconds;
                let (prompt, generated) =
                    ((s.n_prompt - s.n_cached) as u64, s.generated.len() as u64);
                // Counted before the reply is delivered, so a client that has it sees the count.
                self.count(|st| {
                    st.prompt_tokens += prompt;
                    st.generated_tokens += generated;
                    st.completed += 1;
                });
                if q.events.send(Event::Done(s)).is_err() {
                    self.count(|st| {
                        st.completed -= 1;
                        st.cancelled += 1;
                    });
                }
            }
            Err(e) => {
                self.m.model.reset();
                self.cached.clear();
                let stopped = self.control.stopping();
                self.count(|s| {
                    if stopped {
                        s.cancelled += 1
                    } else {
                        s.failed += 1
                    }
                });
                let _ = q.events.send(Event::Failed(e.to_string()));
            }
        }
    }

    fn count(&self, f: impl FnOnce(&mut WorkerStats)) {
        if let Ok(mut s) = self.control.stats.lock() {
            f(&mut s);
        }
    }

    fn generate(&mut self, job: &Job, events: &UnboundedSender<Event>) -> Result<Summary> {
        let reuse = self.opts.cache_prompt
            && !self.cached.is_empty()
            && job.tokens.len() > self.cached.len()
            && job.tokens.starts_with(&self.cached);
        if !reuse {
            self.m.model.reset();
            self.cached.clear();
        }
        let n_cached = self.cached.len();
        let opts = GenerateOptions {
            max_new_tokens: job.max_tokens,
            stop_ids: self.stop_ids.clone(),
            batch_size: self.opts.batch_size.max(1),
        };
        let mut sampler = Sampler::new(job.sampling.clone());
        let mut decoder = StreamDecoder::new(&self.m.tokenizer);
        let mut stop = StopMatcher::new(job.stop.clone());
        let mut generated = Vec::new();
        let mut stopped = false;
        let mut gone = false;
        let control = &self.control;
        let mut on_token = |id: u32| -> Result<ControlFlow<()>> {
            if control.stopping() {
                return Err(Error::InvalidRequest(SHUTTING_DOWN.into()));
            }
            generated.push(id);
            let Some(piece) = decoder.push(id) else {
                return Ok(ControlFlow::Continue(()));
            };
            let (text, hit) = stop.push(&piece);
            if !text.is_empty() && events.send(Event::Text(text)).is_err() {
                gone = true;
                return Ok(ControlFlow::Break(()));
            }
            stopped = hit;
            Ok(if hit {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            })
        };
        let result = generate_after(
            &mut self.m.model,
            &self.cached,
            &job.tokens[n_cached..],
            &opts,
            &mut sampler,
            &mut on_token,
        );
        // The cache now holds the prompt and the generated tokens that were fed back.
        let n_past = self.m.model.n_past();
        self.cached = [job.tokens.as_slice(), &generated].concat();
        self.cached.truncate(n_past);
        let stats = result?;
        if !stopped && !gone {
            let (text, hit) = stop.push(&decoder.finish());
            let text = if hit { text } else { text + &stop.finish() };
            if !text.is_empty() {
                let _ = events.send(Event::Text(text));
            }
            stopped = hit;
        }
        let finish = match stats.stop {
            StopReason::MaxTokens | StopReason::ContextFull if !stopped => Finish::Length,
            _ => Finish::Stop,
        };
        Ok(Summary {
            finish,
            n_prompt: job.tokens.len(),
            n_cached,
            generated,
            queued_seconds: 0.0,
            prompt_seconds: stats.prompt_seconds,
            generate_seconds: stats.generate_seconds,
        })
    }
}
