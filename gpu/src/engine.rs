//! The engine thread: owns the model's KV caches, runs the scheduler's plan one batched forward
//! at a time, samples, detokenizes and streams events back. It is a plain OS thread (model steps
//! are long CPU work, never on a tokio worker). A panic inside a step is caught: every sequence of
//! that run ends (their streams close), and the loop restarts with fresh state, at most
//! `restart_budget` times a minute; past that the engine stops and says so.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::error::{InferError, Result};
use crate::model::{BatchItem, LanguageModel};
use crate::prefix::PrefixCache;
use crate::sampling::{Sampler, SamplingParams, StopCheck, StopStrings};
use crate::scheduler::{
    BlockBudget, KvAccounting, Plan, Refused, Scheduler, SchedulerConfig, SeqId,
};
use crate::stats::EngineStats;
use crate::tokenizer::{Detokenizer, TextTokenizer};

/// Engine limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    /// Tokens of KV cache all sequences together may hold (worst case reserved on admission).
    pub kv_tokens: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Crashes tolerated per minute before the engine stops.
    pub restart_budget: u32,
    /// Prompt tokens whose KV is kept after their prefill for later prompts that share a prefix
    /// (0: none kept). Held besides `kv_tokens`.
    pub prefix_cache_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            scheduler: SchedulerConfig {
                max_waiting: 256,
                max_running: 32,
                prefill_tokens: 2048,
            },
            kv_tokens: 65_536,
            block_size: 16,
            restart_budget: 5,
            prefix_cache_tokens: 4096,
        }
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// What a running request streams back.
#[derive(Debug)]
pub enum Event {
    /// New text (a token may complete no text yet: then nothing is sent).
    Text(String),
    /// The end, with usage counts.
    Done {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The request failed after it was queued.
    Failed(InferError),
}

/// A queued request: read its events; drop it to cancel (its KV is freed at the next step).
#[derive(Debug)]
pub struct Generation {
    pub events: mpsc::Receiver<Event>,
    pub prompt_tokens: usize,
}

enum Command {
    Submit(Box<Submitted>),
}

struct Submitted {
    prompt: Vec<u32>,
    params: SamplingParams,
    events: mpsc::Sender<Event>,
    at: Instant,
}

/// The sending side of an engine; cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    commands: SyncSender<Command>,
    stats: Arc<EngineStats>,
    stopped: Arc<Mutex<Option<String>>>,
    context: usize,
    max_reserve: usize,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("context", &self.context)
            .finish_non_exhaustive()
    }
}

impl EngineHandle {
    /// Starts the engine thread for `model`.
    pub fn start<M: LanguageModel>(
        model: Arc<M>,
        tokenizer: Arc<TextTokenizer>,
        config: EngineConfig,
    ) -> Result<Self> {
        let (tx, rx) = sync_channel(config.scheduler.max_waiting.max(1));
        let stats = Arc::new(EngineStats::default());
        let stopped = Arc::new(Mutex::new(None));
        let context = model.context_length();
        let max_reserve = (config.kv_tokens / config.block_size.max(1)) * config.block_size.max(1);
        let handle = Self {
            commands: tx,
            stats: stats.clone(),
            stopped: stopped.clone(),
            context,
            max_reserve: max_reserve.min(context),
        };
        std::thread::Builder::new()
            .name("swarm-engine".into())
            .spawn(move || supervise(&model, &tokenizer, config, &rx, &stats, &stopped))
            .map_err(|e| {
                InferError::EngineStopped(format!("cannot start the engine thread: {e}"))
            })?;
        Ok(handle)
    }

    /// Queues `prompt` (token ids). Fails at once when a field is wrong, the prompt plus
    /// `max_tokens` cannot fit the context or the KV budget, or the queue is full.
    pub fn submit(&self, prompt: Vec<u32>, params: SamplingParams) -> Result<Generation> {
        params.validate()?;
        if prompt.is_empty() {
            return Err(InferError::invalid("prompt", "is empty"));
        }
        if prompt.len() >= self.max_reserve {
            return Err(InferError::ContextLength {
                field: "prompt",
                tokens: prompt.len(),
                limit: self.max_reserve,
            });
        }
        if prompt.len() + params.max_tokens > self.max_reserve {
            return Err(InferError::ContextLength {
                field: "max_tokens",
                tokens: prompt.len() + params.max_tokens,
                limit: self.max_reserve,
            });
        }
        if let Some(why) = self.stopped_reason() {
            return Err(InferError::EngineStopped(why));
        }
        let (tx, rx) = mpsc::channel(params.max_tokens + 2);
        let prompt_tokens = prompt.len();
        let cmd = Command::Submit(Box::new(Submitted {
            prompt,
            params,
            events: tx,
            at: Instant::now(),
        }));
        match self.commands.try_send(cmd) {
            Ok(()) => Ok(Generation {
                events: rx,
                prompt_tokens,
            }),
            Err(TrySendError::Full(_)) => {
                self.stats.refused.fetch_add(1, Relaxed);
                Err(InferError::Overloaded(
                    self.stats.waiting.load(Relaxed) as usize
                ))
            }
            Err(TrySendError::Disconnected(_)) => Err(InferError::EngineStopped(
                self.stopped_reason()
                    .unwrap_or_else(|| "the engine thread is gone".into()),
            )),
        }
    }

    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
    }

    /// Why the engine stopped, if it did.
    pub fn stopped_reason(&self) -> Option<String> {
        self.stopped
            .lock()
            .map(|g| g.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }
}

fn supervise<M: LanguageModel>(
    model: &Arc<M>,
    tokenizer: &Arc<TextTokenizer>,
    config: EngineConfig,
    rx: &Receiver<Command>,
    stats: &Arc<EngineStats>,
    stopped: &Mutex<Option<String>>,
) {
    let mut crashes: Vec<Instant> = Vec::new();
    loop {
        let run = catch_unwind(AssertUnwindSafe(|| {
            Runner::new(model.as_ref(), tokenizer, config, stats).run(rx)
        }));
        match run {
            Ok(()) => {
                tracing::info!("engine stopped: every handle is gone");
                set_stopped(stopped, "shut down");
                return;
            }
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                stats.restarts.fetch_add(1, Relaxed);
                stats.running.store(0, Relaxed);
                stats.waiting.store(0, Relaxed);
                stats.kv_used_blocks.store(0, Relaxed);
                let now = Instant::now();
                crashes.retain(|t| now.duration_since(*t) < Duration::from_secs(60));
                crashes.push(now);
                if crashes.len() > config.restart_budget as usize {
                    tracing::error!(panic = %what, "engine crashed past its restart budget; stopping");
                    set_stopped(
                        stopped,
                        &format!("crashed {} times in a minute: {what}", crashes.len()),
                    );
                    return;
                }
                tracing::error!(panic = %what, "engine crashed; its sequences ended; restarting");
            }
        }
    }
}

fn set_stopped(stopped: &Mutex<Option<String>>, why: &str) {
    let mut g = stopped.lock().unwrap_or_else(|p| p.into_inner());
    *g = Some(why.to_string());
}

struct Seq<C> {
    tokens: Vec<u32>,
    prompt_len: usize,
    params: SamplingParams,
    sampler: Sampler,
    detok: Detokenizer,
    stops: StopStrings,
    events: mpsc::Sender<Event>,
    cache: Option<C>,
    /// Tokens of `tokens` whose KV is in `cache`; the next step computes the rest.
    cached: usize,
    submitted: Instant,
    last_token: Option<Instant>,
}

struct Runner<'a, M: LanguageModel> {
    model: &'a M,
    tokenizer: &'a TextTokenizer,
    config: EngineConfig,
    stats: &'a EngineStats,
    sched: Scheduler<BlockBudget>,
    seqs: HashMap<SeqId, Seq<M::Cache>>,
    next_id: SeqId,
    prefixes: PrefixCache<M::Cache>,
}

impl<'a, M: LanguageModel> Runner<'a, M> {
    fn new(
        model: &'a M,
        tokenizer: &'a TextTokenizer,
        config: EngineConfig,
        stats: &'a EngineStats,
    ) -> Self {
        let kv = BlockBudget::new(config.kv_tokens, config.block_size);
        stats
            .kv_total_blocks
            .store(kv.total_blocks() as u64, Relaxed);
        stats.prefix_cache_tokens.store(0, Relaxed);
        Self {
            model,
            tokenizer,
            config,
            stats,
            sched: Scheduler::new(config.scheduler, kv),
            seqs: HashMap::new(),
            next_id: 0,
            prefixes: PrefixCache::new(config.prefix_cache_tokens),
        }
    }

    /// Runs until every handle is dropped.
    fn run(mut self, rx: &Receiver<Command>) {
        loop {
            // Block while there is nothing to do; otherwise take what arrived and go on.
            if self.sched.is_idle() {
                match rx.recv() {
                    Ok(cmd) => self.accept(cmd),
                    Err(_) => return,
                }
            } else if self.sched.running() == 0 {
                match rx.recv_timeout(Duration::from_millis(5)) {
                    Ok(cmd) => self.accept(cmd),
                    Err(RecvTimeoutError::Disconnected) => return,
                    Err(RecvTimeoutError::Timeout) => {}
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                self.accept(cmd);
            }
            self.drop_cancelled();
            let plan = self.sched.plan();
            self.publish();
            if !plan.is_empty() {
                self.step(plan);
            }
        }
    }

    fn accept(&mut self, cmd: Command) {
        let Command::Submit(s) = cmd;
        let id = self.next_id;
        self.next_id += 1;
        let s = *s;
        match self.sched.submit(id, s.prompt.len(), s.params.max_tokens) {
            Ok(()) => {
                self.stats.requests.fetch_add(1, Relaxed);
                self.stats
                    .prompt_tokens
                    .fetch_add(s.prompt.len() as u64, Relaxed);
                self.seqs.insert(
                    id,
                    Seq {
                        prompt_len: s.prompt.len(),
                        tokens: s.prompt,
                        sampler: Sampler::new(&s.params),
                        stops: StopStrings::new(s.params.stop.clone()),
                        params: s.params,
                        detok: Detokenizer::default(),
                        events: s.events,
                        cache: None,
                        cached: 0,
                        submitted: s.at,
                        last_token: None,
                    },
                );
            }
            Err(refused) => {
                self.stats.refused.fetch_add(1, Relaxed);
                let e = match refused {
                    Refused::QueueFull(n) => InferError::Overloaded(n),
                    Refused::TooLarge { blocks, total } => InferError::ContextLength {
                        field: "max_tokens",
                        tokens: blocks * self.config.block_size,
                        limit: total * self.config.block_size,
                    },
                };
                let _ = s.events.try_send(Event::Failed(e));
            }
        }
    }

    /// A client that went away frees its sequence (and its KV blocks) now.
    fn drop_cancelled(&mut self) {
        let gone: Vec<SeqId> = self
            .seqs
            .iter()
            .filter(|(_, s)| s.events.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.stats.cancelled.fetch_add(1, Relaxed);
            self.end(id);
        }
    }

    fn end(&mut self, id: SeqId) {
        self.sched.finish(id);
        self.seqs.remove(&id);
    }

    fn publish(&self) {
        self.stats
            .running
            .store(self.sched.running() as u64, Relaxed);
        self.stats
            .waiting
            .store(self.sched.waiting() as u64, Relaxed);
        self.stats
            .kv_used_blocks
            .store(self.sched.kv().used_blocks() as u64, Relaxed);
    }

    fn step(&mut self, plan: Plan) {
        let _span = tracing::debug_span!(
            "batch",
            prefill = plan.prefill.len(),
            decode = plan.decode.len()
        )
        .entered();
        let ids: Vec<SeqId> = plan.prefill.iter().chain(&plan.decode).copied().collect();
        let mut batch: Vec<(SeqId, Seq<M::Cache>)> = Vec::with_capacity(ids.len());
        for id in &ids {
            if let Some(mut s) = self.seqs.remove(id) {
                if s.cache.is_none() {
                    self.start_cache(&mut s);
                }
                batch.push((*id, s));
            }
        }
        let news: Vec<Vec<u32>> = batch
            .iter()
            .map(|(_, s)| s.tokens[s.cached.min(s.tokens.len())..].to_vec())
            .collect();
        let mut items: Vec<BatchItem<'_, M::Cache>> = batch
            .iter_mut()
            .zip(&news)
            .filter_map(|((_, s), t)| s.cache.as_mut().map(|cache| BatchItem { tokens: t, cache }))
            .collect();
        self.stats.steps.fetch_add(1, Relaxed);
        self.stats.batch_size.observe(items.len() as f64);
        let started = Instant::now();
        let out = self.model.forward(&mut items);
        drop(items);
        match out {
            Ok(logits) if logits.len() == batch.len() => {
                // Each sequence's next token, the sequences spread over the rayon pool (a pass
                // over the vocabulary each; one after another they leave the other cores idle).
                let tokens: Vec<u32> = {
                    use rayon::prelude::*;
                    batch
                        .par_iter_mut()
                        .zip(logits.par_iter())
                        .map(|((_, s), logits)| s.sampler.sample(logits))
                        .collect()
                };
                for ((id, mut s), token) in batch.into_iter().zip(tokens) {
                    let prefilled = s.cached < s.prompt_len;
                    s.cached = s.tokens.len();
                    if prefilled && let Some(cache) = &s.cache {
                        let model = self.model;
                        let n = s.prompt_len;
                        self.prefixes
                            .insert(&s.tokens[..n], || model.fork(cache, n, n));
                        self.stats
                            .prefix_cache_tokens
                            .store(self.prefixes.held() as u64, Relaxed);
                    }
                    if self.advance(&mut s, token) {
                        // A finished sequence's KV (prompt and answer) is kept too: the next
                        // turn of a conversation (an agent's next stage) extends it.
                        if s.cached > s.prompt_len
                            && let Some(cache) = &s.cache
                        {
                            let model = self.model;
                            let n = s.cached;
                            self.prefixes
                                .insert(&s.tokens[..n], || model.fork(cache, n, n));
                            self.stats
                                .prefix_cache_tokens
                                .store(self.prefixes.held() as u64, Relaxed);
                        }
                        self.sched.finish(id);
                    } else {
                        self.seqs.insert(id, s);
                    }
                }
            }
            other => {
                let e = match other {
                    Err(e) => e,
                    Ok(_) => InferError::EngineStopped(
                        "the model returned the wrong number of rows".into(),
                    ),
                };
                tracing::error!(error = %e, sequences = batch.len(), "batch failed; its sequences end");
                for (id, s) in batch {
                    self.stats.failed.fetch_add(1, Relaxed);
                    let _ = s
                        .events
                        .try_send(Event::Failed(InferError::EngineStopped(e.to_string())));
                    self.sched.finish(id);
                }
            }
        }
        self.stats.step_seconds.observe_duration(started.elapsed());
        self.publish();
    }

    /// A new sequence's cache: a copy of the longest cached prefix of its prompt when there is
    /// one (only the rest is computed), else empty.
    fn start_cache(&mut self, s: &mut Seq<M::Cache>) {
        let capacity = s.prompt_len + s.params.max_tokens;
        let model = self.model;
        let reused = self
            .prefixes
            .lookup(&s.tokens[..s.prompt_len])
            .and_then(|(len, from)| Some((len, model.fork(from, len, capacity)?)));
        match reused {
            Some((len, cache)) => {
                self.stats
                    .prompt_tokens_cached
                    .fetch_add(len as u64, Relaxed);
                s.cache = Some(cache);
                s.cached = len;
            }
            None => {
                s.cache = Some(model.new_cache(capacity));
                s.cached = 0;
            }
        }
    }

    /// Appends the sampled `token` to `s`; true when the sequence is done (its events are sent).
    fn advance(&self, s: &mut Seq<M::Cache>, token: u32) -> bool {
        s.tokens.push(token);
        let now = Instant::now();
        match s.last_token {
            None => self
                .stats
                .time_to_first_token
                .observe_duration(now - s.submitted),
            Some(t) => self.stats.inter_token_latency.observe_duration(now - t),
        }
        s.last_token = Some(now);
        self.stats.generated_tokens.fetch_add(1, Relaxed);
        let generated = s.tokens.len() - s.prompt_len;
        let mut finish = None;
        if !s.params.ignore_eos && self.tokenizer.stop_ids().contains(&token) {
            finish = Some(FinishReason::Stop);
        } else {
            let piece = match s.detok.push(self.tokenizer, token) {
                Ok(p) => p,
                Err(e) => {
                    let _ = s.events.try_send(Event::Failed(e));
                    return true;
                }
            };
            let text = match s.stops.push(&piece) {
                StopCheck::Continue(t) => t,
                StopCheck::Stopped(t) => {
                    finish = Some(FinishReason::Stop);
                    t
                }
            };
            if !text.is_empty() && s.events.try_send(Event::Text(text)).is_err() {
                self.stats.cancelled.fetch_add(1, Relaxed);
                return true;
            }
        }
        if finish.is_none() && generated >= s.params.max_tokens {
            finish = Some(FinishReason::Length);
        }
        let Some(reason) = finish else {
            return false;
        };
        if reason == FinishReason::Length {
            let rest = s.stops.flush();
            if !rest.is_empty() {
                let _ = s.events.try_send(Event::Text(rest));
            }
        }
        let _ = s.events.try_send(Event::Done {
            reason,
            prompt_tokens: s.prompt_len,
            completion_tokens: generated,
        });
        true
    }
}
