//! The tokenizer (from `tokenizer.json`, or rebuilt from GGUF metadata), the model's chat template
//! (rendered with minijinja; ChatML when the model has none) and incremental detokenization.

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::{Deserialize, Serialize};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use crate::error::{InferError, Result};

/// ChatML, used when a model carries no template of its own.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Tokens that end generation in the common chat formats, when the vocabulary has them.
const END_TOKENS: [&str; 4] = ["<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>"];

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A tokenizer with the model's chat template and end-of-generation tokens.
#[derive(Debug)]
pub struct TextTokenizer {
    inner: Tokenizer,
    /// The chat template, compiled once at load.
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
    stop_ids: Vec<u32>,
}

fn tok_err(e: impl std::fmt::Display) -> InferError {
    InferError::Tokenizer(e.to_string())
}

impl TextTokenizer {
    /// Rebuilds the byte-level BPE tokenizer stored in a GGUF file's `tokenizer.ggml.*` keys.
    pub fn from_gguf(path: &Path) -> Result<Self> {
        let (_, ct) = crate::gguf_check::open(path)?;
        Self::from_gguf_content(&ct)
    }

    /// Rebuilds the tokenizer from a GGUF header already read.
    pub(crate) fn from_gguf_content(ct: &gguf_file::Content) -> Result<Self> {
        let get = |k: &str| {
            ct.metadata
                .get(k)
                .ok_or_else(|| InferError::ModelUnavailable(format!("GGUF metadata has no {k}")))
        };
        let kind = get("tokenizer.ggml.model")?.to_string()?.clone();
        if kind != "gpt2" {
            return Err(InferError::ModelUnavailable(format!(
                "GGUF tokenizer {kind:?} is not supported (byte-level BPE \"gpt2\" is); serve the Hugging Face folder with its tokenizer.json instead"
            )));
        }
        let tokens: Vec<String> = get("tokenizer.ggml.tokens")?
            .to_vec()?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<candle_core::Result<_>>()?;
        let merges: Vec<(String, String)> = match ct.metadata.get("tokenizer.ggml.merges") {
            None => Vec::new(),
            Some(v) => v
                .to_vec()?
                .iter()
                .map(|m| {
                    let m = m.to_string()?;
                    m.split_once(' ')
                        .map(|(a, b)| (a.to_string(), b.to_string()))
                        .ok_or_else(|| candle_core::Error::Msg(format!("bad merge {m:?}")))
                })
                .collect::<candle_core::Result<_>>()?,
        };
        let types: Vec<i32> = match ct.metadata.get("tokenizer.ggml.token_type") {
            None => Vec::new(),
            Some(v) => v
                .to_vec()?
                .iter()
                .map(|t| t.to_i32())
                .collect::<candle_core::Result<_>>()?,
        };
        let mut vocab = Vocab::new();
        for (i, t) in tokens.iter().enumerate() {
            vocab.insert(t.clone(), i as u32);
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(tok_err)?;
        let mut inner = Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let pre = ct
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_default();
        if pre == "smollm" {
            inner.with_pre_tokenizer(Some(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(byte_level),
            ])));
        } else {
            inner.with_pre_tokenizer(Some(byte_level));
        }
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // Control (3) and user-defined (4) tokens are matched whole, never split by BPE.
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == 3 || **t == 4)
            .map(|(s, _)| AddedToken::from(s.clone(), true))
            .collect();
        inner.add_special_tokens(&special);
        let id_token = |key: &str| -> String {
            ct.metadata
                .get(key)
                .and_then(|v| v.to_u32().ok())
                .and_then(|id| tokens.get(id as usize).cloned())
                .unwrap_or_default()
        };
        let template = ct
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok().cloned());
        let eos_id = ct
            .metadata
            .get("tokenizer.ggml.eos_token_id")
            .and_then(|v| v.to_u32().ok());
        Self::assemble(
            inner,
            template,
            id_token("tokenizer.ggml.bos_token_id"),
            id_token("tokenizer.ggml.eos_token_id"),
            eos_id.into_iter().collect(),
        )
    }

    /// Loads `tokenizer.json` (and the chat template and special tokens from
    /// `tokenizer_config.json` and `config.json` when present) from a Hugging Face folder.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let inner = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| {
            InferError::ModelUnavailable(format!("{}: {e}", dir.join("tokenizer.json").display()))
        })?;
        let read_json = |name: &str| -> Option<serde_json::Value> {
            let text = std::fs::read_to_string(dir.join(name)).ok()?;
            serde_json::from_str(&text).ok()
        };
        let tc = read_json("tokenizer_config.json").unwrap_or_default();
        let cfg = read_json("config.json").unwrap_or_default();
        let token_str = |v: &serde_json::Value| -> String {
            match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Object(o) => o
                    .get("content")
                    .and_then(|c| c.as_str())
                    .unwrap_or_default()
                    .to_string(),
                _ => String::new(),
            }
        };
        let template = tc
            .get("chat_template")
            .and_then(|t| t.as_str())
            .map(str::to_string);
        let mut eos_ids: Vec<u32> = match cfg.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|n| n as u32).into_iter().collect()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|n| n.as_u64().map(|n| n as u32))
                .collect(),
            _ => Vec::new(),
        };
        let eos = tc.get("eos_token").map(token_str).unwrap_or_default();
        if let Some(id) = inner.token_to_id(&eos) {
            eos_ids.push(id);
        }
        Self::assemble(
            inner,
            template,
            tc.get("bos_token").map(token_str).unwrap_or_default(),
            eos,
            eos_ids,
        )
    }

    fn assemble(
        inner: Tokenizer,
        template: Option<String>,
        bos: String,
        eos: String,
        mut stop_ids: Vec<u32>,
    ) -> Result<Self> {
        for t in END_TOKENS {
            if let Some(id) = inner.token_to_id(t) {
                stop_ids.push(id);
            }
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let mut env = minijinja::Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned("chat", template.unwrap_or_else(|| CHATML.to_string()))
            .map_err(|e| InferError::ModelUnavailable(format!("chat template: {e}")))?;
        let tokenizer = Self {
            inner,
            env,
            bos,
            eos,
            stop_ids,
        };
        // A template that does not compile or run is a broken model, found at load time.
        tokenizer.apply_chat_template(&[])?;
        Ok(tokenizer)
    }

    /// Token ids of `text`; special-token text (`<|im_start|>`) becomes the special token.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    /// Tokens that end generation.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The prompt for `messages` in the model's chat format, ending where the assistant speaks.
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| InferError::ModelUnavailable(format!("chat template: {e}")))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => &self.bos,
            eos_token => &self.eos,
        })
        .map_err(|e| {
            InferError::invalid("messages", format!("the chat template refused them: {e}"))
        })
    }
}

/// Turns a growing list of token ids into text pieces, holding back bytes of an unfinished
/// UTF-8 character until the token that completes it arrives.
#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl Detokenizer {
    /// Adds a token; returns the new text it completes (maybe empty).
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let now = tokenizer.decode(&self.ids[self.prefix..])?;
        if now.len() > before.len()
            && !now.ends_with('\u{fffd}')
            && now.is_char_boundary(before.len())
        {
            let piece = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }
}
