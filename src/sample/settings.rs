//! The presets and option spellings of `rrhf sample`: the paper's settings (Table 1), the strategy names and the
//! early-stopping values, as the CLI and `args.json` spell them.

use std::fmt;
use std::str::FromStr;

use super::EarlyStopping;

/// The paper's sampling settings (Table 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// Beam search + provided responses.
    Bp,
    /// Sampling + provided responses.
    Sp,
    /// Diverse beam search + provided responses.
    Dp,
    /// Diverse beam search only.
    D,
    /// Provided responses only.
    P,
}

impl FromStr for Setting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_uppercase().as_str() {
            "BP" => Ok(Setting::Bp),
            "SP" => Ok(Setting::Sp),
            "DP" => Ok(Setting::Dp),
            "D" => Ok(Setting::D),
            "P" => Ok(Setting::P),
            _ => Err(format!(
                "unknown setting `{s}` (expected one of: BP, SP, DP, D, P)"
            )),
        }
    }
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Setting::Bp => "BP",
            Setting::Sp => "SP",
            Setting::Dp => "DP",
            Setting::D => "D",
            Setting::P => "P",
        })
    }
}

/// `--strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrategyKind {
    Greedy,
    Beam,
    DiverseBeam,
    Sample,
}

impl StrategyKind {
    const NAMES: [(&'static str, StrategyKind); 4] = [
        ("greedy", StrategyKind::Greedy),
        ("beam", StrategyKind::Beam),
        ("diverse-beam", StrategyKind::DiverseBeam),
        ("sample", StrategyKind::Sample),
    ];

    /// `policy:{name}`, the source label of its responses.
    pub fn source(self) -> String {
        format!("policy:{self}")
    }
}

impl FromStr for StrategyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim().to_ascii_lowercase().replace('_', "-");
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == t)
            .map(|(_, k)| *k)
            .ok_or_else(|| {
                format!(
                    "unknown strategy `{s}` (expected one of: greedy, beam, diverse-beam, sample)"
                )
            })
    }
}

impl fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = Self::NAMES
            .iter()
            .find(|(_, k)| k == self)
            .map(|(n, _)| *n)
            .unwrap_or("greedy");
        f.write_str(name)
    }
}

/// `--early-stopping true|false|never` (Hugging Face's beam-search semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyStop {
    True,
    False,
    Never,
}

impl FromStr for EarlyStop {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "true" => Ok(EarlyStop::True),
            "false" => Ok(EarlyStop::False),
            "never" => Ok(EarlyStop::Never),
            _ => Err(format!(
                "unknown early stopping `{s}` (expected true, false or never)"
            )),
        }
    }
}

impl fmt::Display for EarlyStop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EarlyStop::True => "true",
            EarlyStop::False => "false",
            EarlyStop::Never => "never",
        })
    }
}

impl EarlyStop {
    pub(crate) fn engine(self) -> EarlyStopping {
        match self {
            EarlyStop::True => EarlyStopping::True,
            EarlyStop::False => EarlyStopping::False,
            EarlyStop::Never => EarlyStopping::Never,
        }
    }
}

serialize_as_display!(Setting, StrategyKind, EarlyStop);
