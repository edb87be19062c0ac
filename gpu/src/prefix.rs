//! Prompt prefixes whose KV the engine keeps after a prefill, so that a later prompt sharing a
//! prefix with one of them (the same system prompt, the conversation so far) starts from a copy
//! of that KV and only computes the rest, as vLLM's automatic prefix caching does. Sans-IO: the
//! entries are whatever cache type the model has; least recently used entries go first when the
//! token budget is full.

use std::collections::VecDeque;

/// Shorter shared prefixes are recomputed (copying them saves less than it costs to look up).
pub(crate) const MIN_SHARED: usize = 4;

struct Entry<C> {
    tokens: Vec<u32>,
    cache: C,
}

pub(crate) struct PrefixCache<C> {
    /// Least recently used first.
    entries: VecDeque<Entry<C>>,
    /// Tokens held by all entries.
    held: usize,
    /// At most this many tokens held.
    capacity: usize,
}

fn shared(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl<C> PrefixCache<C> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            held: 0,
            capacity,
        }
    }

    /// The entry sharing the longest prefix with `prompt`, and how many tokens of it to reuse:
    /// at most `prompt.len() - 1` (the last prompt token is always computed, for its logits), at
    /// least [`MIN_SHARED`]. The entry becomes the most recently used.
    pub(crate) fn lookup(&mut self, prompt: &[u32]) -> Option<(usize, &C)> {
        let limit = prompt.len().saturating_sub(1);
        let (best, len) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, shared(&e.tokens, prompt).min(limit)))
            .max_by_key(|&(i, len)| (len, i))?;
        if len < MIN_SHARED {
            return None;
        }
        let entry = self.entries.remove(best)?;
        self.entries.push_back(entry);
        self.entries.back().map(|e| (len, &e.cache))
    }

    /// Keeps the KV of `tokens` (made by `make`, only when it will be kept): not when an entry
    /// already covers them, replacing entries that are prefixes of them, evicting the least
    /// recently used past the budget.
    pub(crate) fn insert(&mut self, tokens: &[u32], make: impl FnOnce() -> Option<C>) {
        if tokens.len() < MIN_SHARED || tokens.len() > self.capacity {
            return;
        }
        if let Some(i) = self
            .entries
            .iter()
            .position(|e| e.tokens.starts_with(tokens))
        {
            if let Some(e) = self.entries.remove(i) {
                self.entries.push_back(e);
            }
            return;
        }
        let Some(cache) = make() else {
            return;
        };
        let held = &mut self.held;
        self.entries.retain(|e| {
            let replaced = tokens.starts_with(&e.tokens);
            if replaced {
                *held -= e.tokens.len();
            }
            !replaced
        });
        while self.held + tokens.len() > self.capacity {
            match self.entries.pop_front() {
                Some(e) => self.held -= e.tokens.len(),
                None => break,
            }
        }
        self.held += tokens.len();
        self.entries.push_back(Entry {
            tokens: tokens.to_vec(),
            cache,
        });
    }

    /// Tokens held.
    pub(crate) fn held(&self) -> usize {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(capacity: usize) -> PrefixCache<&'static str> {
        PrefixCache::new(capacity)
    }

    #[test]
    fn the_longest_shared_prefix_wins_and_the_last_token_is_computed() {
        let mut c = cache(100);
        c.insert(&[1, 2, 3, 4, 5, 6], || Some("a"));
        c.insert(&[1, 2, 3, 4, 9, 9, 9], || Some("b"));
        assert_eq!(c.lookup(&[1, 2, 3, 4, 5, 6, 7]), Some((6, &"a")));
        assert_eq!(c.lookup(&[1, 2, 3, 4, 9, 9]), Some((5, &"b")));
        // The same prompt again: all but its last token.
        assert_eq!(c.lookup(&[1, 2, 3, 4, 5, 6]), Some((5, &"a")));
        // Too little shared.
        assert_eq!(c.lookup(&[1, 2, 3, 7, 7, 7]), None);
        assert_eq!(c.lookup(&[9, 9]), None);
    }

    #[test]
    fn covered_prefixes_are_not_stored_twice() {
        let mut c = cache(100);
        c.insert(&[1, 2, 3, 4, 5], || Some("short"));
        c.insert(&[1, 2, 3, 4, 5, 6, 7], || Some("long"));
        assert_eq!(c.held(), 7, "the longer one replaced its prefix");
        c.insert(&[1, 2, 3, 4, 5], || panic!("covered: not made"));
        assert_eq!(c.held(), 7);
    }

    #[test]
    fn least_recently_used_go_first() {
        let mut c = cache(12);
        c.insert(&[1, 1, 1, 1, 1], || Some("ones"));
        c.insert(&[2, 2, 2, 2, 2], || Some("twos"));
        assert!(c.lookup(&[1, 1, 1, 1, 1, 0]).is_some());
        c.insert(&[3, 3, 3, 3, 3], || Some("threes"));
        assert_eq!(c.held(), 10);
        assert_eq!(c.lookup(&[2, 2, 2, 2, 2, 0]), None, "twos evicted");
        assert!(c.lookup(&[1, 1, 1, 1, 1, 0]).is_some());
        // Longer than the whole budget: not kept.
        c.insert(&[4; 13], || Some("huge"));
        assert_eq!(c.held(), 10);
    }

    #[test]
    fn a_zero_budget_keeps_nothing() {
        let mut c = cache(0);
        c.insert(&[1, 2, 3, 4, 5], || Some("a"));
        assert_eq!(c.held(), 0);
        assert_eq!(c.lookup(&[1, 2, 3, 4, 5, 6]), None);
    }
}
