//! Continuous batching as a plain state machine: admission against a KV budget, prefill within a
//! token budget, one decode step for every running sequence. No threads, no clock, no model: the
//! engine thread asks for a [`Plan`], runs it, and reports finished sequences.

use std::collections::{HashMap, VecDeque};

/// A sequence's id, unique within one engine.
pub type SeqId = u64;

/// KV-cache accounting in blocks, so that a paged backend can replace the contiguous one.
pub trait KvAccounting: Send + std::fmt::Debug {
    /// Blocks `tokens` tokens take.
    fn blocks_for(&self, tokens: usize) -> usize;
    /// Reserves room for `tokens` tokens of `seq`; false (and nothing reserved) when it does not fit.
    fn try_reserve(&mut self, seq: SeqId, tokens: usize) -> bool;
    /// Frees everything `seq` holds.
    fn release(&mut self, seq: SeqId);
    fn used_blocks(&self) -> usize;
    fn total_blocks(&self) -> usize;
    fn block_size(&self) -> usize;
}

/// A fixed pool of equal blocks; a sequence reserves its worst case (prompt + `max_tokens`) up
/// front, so a running sequence never runs out of cache.
#[derive(Debug)]
pub struct BlockBudget {
    block_size: usize,
    total: usize,
    used: usize,
    held: HashMap<SeqId, usize>,
}

impl BlockBudget {
    pub fn new(total_tokens: usize, block_size: usize) -> Self {
        let block_size = block_size.max(1);
        Self {
            block_size,
            total: total_tokens / block_size,
            used: 0,
            held: HashMap::new(),
        }
    }
}

impl KvAccounting for BlockBudget {
    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    fn try_reserve(&mut self, seq: SeqId, tokens: usize) -> bool {
        let blocks = self.blocks_for(tokens);
        if self.used + blocks > self.total || self.held.contains_key(&seq) {
            return false;
        }
        self.used += blocks;
        self.held.insert(seq, blocks);
        true
    }

    fn release(&mut self, seq: SeqId) {
        if let Some(b) = self.held.remove(&seq) {
            self.used -= b;
        }
    }

    fn used_blocks(&self) -> usize {
        self.used
    }

    fn total_blocks(&self) -> usize {
        self.total
    }

    fn block_size(&self) -> usize {
        self.block_size
    }
}

/// Scheduler limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Requests waiting for admission before new ones are refused (429).
    pub max_waiting: usize,
    /// Sequences decoding together at most.
    pub max_running: usize,
    /// Prompt tokens prefilled in one step (the first newcomer always goes, however long).
    pub prefill_tokens: usize,
}

/// Why a request was not queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The waiting queue is full.
    QueueFull(usize),
    /// The request's worst case needs more blocks than the whole budget has.
    TooLarge { blocks: usize, total: usize },
}

/// One step's work.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Sequences admitted now: their whole prompt goes through the model this step.
    pub prefill: Vec<SeqId>,
    /// Running sequences: one new token each.
    pub decode: Vec<SeqId>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.prefill.is_empty() && self.decode.is_empty()
    }
}

#[derive(Debug)]
struct Waiting {
    id: SeqId,
    prompt: usize,
    reserve: usize,
}

/// The continuous-batching state machine.
#[derive(Debug)]
pub struct Scheduler<K> {
    config: SchedulerConfig,
    kv: K,
    waiting: VecDeque<Waiting>,
    running: Vec<SeqId>,
}

impl<K: KvAccounting> Scheduler<K> {
    pub fn new(config: SchedulerConfig, kv: K) -> Self {
        Self {
            config,
            kv,
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    /// Queues a request with `prompt` tokens that may grow by `max_new`.
    pub fn submit(&mut self, id: SeqId, prompt: usize, max_new: usize) -> Result<(), Refused> {
        let reserve = prompt + max_new;
        let blocks = self.kv.blocks_for(reserve);
        if blocks > self.kv.total_blocks() {
            return Err(Refused::TooLarge {
                blocks,
                total: self.kv.total_blocks(),
            });
        }
        if self.waiting.len() >= self.config.max_waiting {
            return Err(Refused::QueueFull(self.waiting.len()));
        }
        self.waiting.push_back(Waiting {
            id,
            prompt,
            reserve,
        });
        Ok(())
    }

    /// The next step: every running sequence decodes; waiting ones are admitted in order while
    /// their reservation fits the KV budget, the running limit and the prefill token budget.
    pub fn plan(&mut self) -> Plan {
        let decode = self.running.clone();
        let mut prefill = Vec::new();
        let mut budget = self.config.prefill_tokens;
        while let Some(front) = self.waiting.front() {
            if self.running.len() >= self.config.max_running {
                break;
            }
            if !prefill.is_empty() && front.prompt > budget {
                break;
            }
            if !self.kv.try_reserve(front.id, front.reserve) {
                break;
            }
            budget = budget.saturating_sub(front.prompt);
            prefill.push(front.id);
            self.running.push(front.id);
            self.waiting.pop_front();
        }
        Plan { prefill, decode }
    }

    /// A sequence finished or was cancelled, running or still waiting: its blocks are free now.
    pub fn finish(&mut self, id: SeqId) {
        self.running.retain(|&r| r != id);
        self.waiting.retain(|w| w.id != id);
        self.kv.release(id);
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn kv(&self) -> &K {
        &self.kv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(total_tokens: usize) -> Scheduler<BlockBudget> {
        Scheduler::new(
            SchedulerConfig {
                max_waiting: 4,
                max_running: 3,
                prefill_tokens: 100,
            },
            BlockBudget::new(total_tokens, 16),
        )
    }

    #[test]
    fn admits_while_the_worst_case_fits_and_frees_at_once() {
        let mut s = sched(160); // 10 blocks
        s.submit(1, 30, 34).ok(); // 4 blocks
        s.submit(2, 30, 34).ok(); // 4 blocks
        s.submit(3, 10, 20).ok(); // 2 blocks: would fit, but admission is in order
        let p = s.plan();
        assert_eq!(p.prefill, vec![1, 2, 3]);
        assert!(p.decode.is_empty());
        assert_eq!(s.kv().used_blocks(), 10);
        s.submit(4, 1, 1).ok();
        let p = s.plan();
        assert_eq!((p.prefill, p.decode), (vec![], vec![1, 2, 3]));
        s.finish(2);
        assert_eq!(s.kv().used_blocks(), 6);
        let p = s.plan();
        assert_eq!((p.prefill, p.decode), (vec![4], vec![1, 3]));
    }

    #[test]
    fn head_of_line_waits_for_room() {
        let mut s = sched(160);
        s.submit(1, 100, 50).ok(); // 10 blocks: the whole budget
        s.submit(2, 1, 1).ok();
        assert_eq!(s.plan().prefill, vec![1]);
        assert_eq!(s.plan().prefill, Vec::<SeqId>::new());
        assert_eq!(s.waiting(), 1);
        s.finish(1);
        assert_eq!(s.plan().prefill, vec![2]);
    }

    #[test]
    fn prefill_budget_and_running_limit() {
        let mut s = sched(10_000);
        s.submit(1, 150, 1).ok(); // over the prefill budget alone: still goes
        s.submit(2, 10, 1).ok();
        assert_eq!(s.plan().prefill, vec![1]);
        s.submit(3, 60, 1).ok();
        s.submit(4, 60, 1).ok();
        assert_eq!(s.plan().prefill, vec![2, 3]); // 4 would pass 100 tokens
        assert_eq!(s.plan().prefill, Vec::<SeqId>::new()); // 3 running: the limit
        s.finish(1);
        assert_eq!(s.plan().prefill, vec![4]);
    }

    #[test]
    fn refuses_when_full_or_never_fitting() {
        let mut s = sched(160);
        assert_eq!(
            s.submit(9, 150, 20),
            Err(Refused::TooLarge {
                blocks: 11,
                total: 10
            })
        );
        for i in 0..4 {
            assert_eq!(s.submit(i, 1, 1), Ok(()));
        }
        assert_eq!(s.submit(5, 1, 1), Err(Refused::QueueFull(4)));
        s.finish(0); // a cancelled waiting request leaves the queue
        assert_eq!(s.submit(5, 1, 1), Ok(()));
    }
}
