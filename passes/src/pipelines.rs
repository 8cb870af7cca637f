//! The named optimisation levels (`-O none|fp16|w8a8|w4a16|w4a8|w4a4|fp8`) as pipeline strings.
//!
//! Each level is a plain pipeline string so `qcc compile --show-pipeline -O w4a4` prints exactly what
//! runs and the same string can be edited and passed back with `--passes`.

use std::fmt;
use std::str::FromStr;

/// The structural prefix shared by every level: canonicalize, recognise blocks, clean up.
pub const STRUCTURAL: &str = "fold-constants,canonicalize,fuse-rms-norm,fuse-layer-norm,fuse-linear,fuse-rotary,fuse-attention,fuse-swiglu,eliminate-dead-code";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OptLevel {
    None,
    Fp16,
    W8A8,
    W4A16,
    W4A8,
    W4A4,
    Fp8,
}

impl OptLevel {
    pub const ALL: [OptLevel; 7] = [
        OptLevel::None,
        OptLevel::Fp16,
        OptLevel::W8A8,
        OptLevel::W4A16,
        OptLevel::W4A8,
        OptLevel::W4A4,
        OptLevel::Fp8,
    ];

    pub fn name(self) -> &'static str {
        match self {
            OptLevel::None => "none",
            OptLevel::Fp16 => "fp16",
            OptLevel::W8A8 => "w8a8",
            OptLevel::W4A16 => "w4a16",
            OptLevel::W4A8 => "w4a8",
            OptLevel::W4A4 => "w4a4",
            OptLevel::Fp8 => "fp8",
        }
    }

    /// The pipeline string this level runs: the structural prefix, then quantization and step
    /// migration. Static activation levels need a calibration set (the CLI builds one).
    pub fn pipeline(self) -> String {
        // The LM head (a graph-output linear) keeps 8-bit weights and float activations in every level:
        // measured cheapest for accuracy, and it needs no second calibration pass.
        let tail = match self {
            OptLevel::None => return STRUCTURAL.to_string(),
            // A half-precision runtime keeps its KV cache in half precision (the fair fp16 baseline).
            OptLevel::Fp16 => "convert-precision{kv-cache=half,to=f16}",
            OptLevel::W8A8 => "fold-norm-weights,rotate,clip{a=8,gram=true,prefix=1,skip=lm-head,w=8},quantize{a=8,prefix=1,skip=lm-head,w=8,weight-rounding=gptq},quantize{a=16,w=8},qsm",
            OptLevel::W4A16 => "fold-norm-weights,rotate,clip{a=16,gram=true,skip=lm-head,w=4},quantize{a=16,skip=lm-head,w=4,weight-rounding=gptq},quantize{a=16,w=8},qsm",
            OptLevel::W4A8 => "fold-norm-weights,rotate,clip{a=8,gram=true,prefix=1,skip=lm-head,w=4},quantize{a=8,prefix=1,skip=lm-head,w=4,weight-rounding=gptq},quantize{a=16,w=8},qsm",
            OptLevel::W4A4 => "fold-norm-weights,rotate,clip{a=4,gram=true,prefix=1,skip=lm-head,w=4},quantize{a=4,prefix=1,skip=lm-head,w=4,weight-rounding=gptq},quantize{a=16,w=8},qsm",
            OptLevel::Fp8 => "quantize{a=8,format=fp8,skip=lm-head,w=8},quantize{a=16,w=8},qsm",
        };
        format!("{STRUCTURAL},{tail},eliminate-dead-code")
    }

    /// Whether the level needs a calibration set (static activation steps, clipping or GPTQ).
    pub fn needs_calibration(self) -> bool {
        !matches!(self, OptLevel::None | OptLevel::Fp16)
    }
}

impl fmt::Display for OptLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown optimisation level '{0}'; valid levels: none, fp16, w8a8, w4a16, w4a8, w4a4, fp8")]
pub struct UnknownOptLevel(pub String);

impl FromStr for OptLevel {
    type Err = UnknownOptLevel;

    fn from_str(s: &str) -> Result<OptLevel, UnknownOptLevel> {
        OptLevel::ALL.into_iter().find(|l| l.name() == s).ok_or_else(|| UnknownOptLevel(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Registry;

    #[test]
    fn every_level_parses_with_the_standard_registry() {
        let reg = Registry::standard();
        for level in OptLevel::ALL {
            let p = reg.parse_pipeline(&level.pipeline()).unwrap();
            assert_eq!(p.to_string(), level.pipeline(), "pipeline text of {level} is not canonical");
            assert_eq!(level.name().parse::<OptLevel>().unwrap(), level);
        }
        assert!("w2a2".parse::<OptLevel>().unwrap_err().to_string().contains("w4a4"));
    }
}
