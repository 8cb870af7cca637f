//! Tokenizers: built from a GGUF file's metadata (byte-level BPE as llama.cpp stores it) or loaded from any
//! Hugging Face `tokenizer.json`, using the `tokenizers` crate for the actual encoding.

use crate::gguf::{GgufError, GgufMetadata};
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: tokenizer model '{model}' is not supported (only byte-level BPE, 'gpt2')")]
    UnsupportedModel { path: PathBuf, model: String },
    #[error("{path}: {message}")]
    Build { path: PathBuf, message: String },
    #[error(
        "no tokenizer found for {model}: put tokenizer.json (or the source .gguf) beside it or pass --tokenizer FILE"
    )]
    NotFound { model: PathBuf },
}

/// GGUF token types (llama.cpp's `llama_token_type`): control tokens are special, the rest are vocabulary.
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
pub fn from_gguf(meta: &GgufMetadata) -> Result<Tokenizer, TokenizerError> {
    let build_err = |message: String| TokenizerError::Build { path: meta.path.clone(), message };
    let model = meta.string("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(TokenizerError::UnsupportedModel { path: meta.path.clone(), model: model.to_string() });
    }
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let types = meta.ints("tokenizer.ggml.token_type").unwrap_or_default();
    let merges: Vec<(String, String)> = meta
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| build_err(format!("merge '{m}' is not two tokens separated by a space")))
        })
        .collect::<Result<_, _>>()?;
    let vocab: tokenizers::models::bpe::Vocab =
        tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| build_err(e.to_string()))?;

    let mut tokenizer = Tokenizer::new(bpe);
    // The pre-tokenizer llama.cpp calls "smollm" (and HF's SmolLM2 tokenizer.json): digits one by one,
    // then GPT-2's byte-level regex split without a prefix space.
    let pre = meta.string("tokenizer.ggml.pre").unwrap_or("gpt2");
    let byte_level = ByteLevel::new(false, true, true);
    if matches!(pre, "smollm" | "starcoder" | "refact") {
        tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![Digits::new(true).into(), byte_level.into()])));
    } else {
        tokenizer.with_pre_tokenizer(Some(byte_level));
    }
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(types.iter().copied().chain(std::iter::repeat(1)))
        .filter(|(_, ty)| *ty == TOKEN_TYPE_CONTROL || *ty == TOKEN_TYPE_USER_DEFINED)
        .map(|(t, ty)| AddedToken::from(t.to_string(), ty == TOKEN_TYPE_CONTROL))
        .collect();
    tokenizer.add_special_tokens(&special);
    Ok(tokenizer)
}

/// Writes `tokenizer.json` (the Hugging Face format), through a temporary file so no half-written file is left.
pub fn save(tokenizer: &Tokenizer, path: &Path) -> Result<(), TokenizerError> {
    let tmp = path.with_extension("json.tmp");
    let build_err = |message: String| TokenizerError::Build { path: path.to_path_buf(), message };
    tokenizer.save(&tmp, false).map_err(|e| build_err(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| build_err(e.to_string()))
}

pub fn load(path: &Path) -> Result<Tokenizer, TokenizerError> {
    Tokenizer::from_file(path).map_err(|e| TokenizerError::Build { path: path.to_path_buf(), message: e.to_string() })
}

/// The tokenizer for a model: `explicit` if given, else `tokenizer.json` beside the model, else one built
/// from a `.gguf` beside the model (and saved as `tokenizer.json` for next time).
pub fn for_model(model: &Path, explicit: Option<&Path>) -> Result<Tokenizer, TokenizerError> {
    if let Some(p) = explicit {
        return match p.extension().and_then(|e| e.to_str()) {
            Some("gguf") => from_gguf(&GgufMetadata::read(p)?),
            _ => load(p),
        };
    }
    // A compiled .qcc model is a directory holding its tokenizer.
    let dir = if model.is_dir() {
        model
    } else {
        model.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
    };
    let json = dir.join("tokenizer.json");
    if json.exists() {
        return load(&json);
    }
    let gguf = std::fs::read_dir(dir)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "gguf"));
    match gguf {
        Some(g) => {
            let tokenizer = from_gguf(&GgufMetadata::read(&g)?)?;
            // Caching is best-effort: a read-only model folder still gets a working tokenizer.
            let _ = save(&tokenizer, &json);
            Ok(tokenizer)
        }
        None => Err(TokenizerError::NotFound { model: model.to_path_buf() }),
    }
}
