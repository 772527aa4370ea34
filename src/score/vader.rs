//! VADER sentiment (Hutto & Gilbert 2014), a line-by-line port of the reference implementation vaderSentiment 3.3.2
//! (MIT; `vader_data/LICENSE.txt`), used as a built-in reward: the compound score in [−1, 1].
//!
//! The lexicon is embedded (`vader_data/`, derived from the vaderSentiment 3.3.2 package by
//! `tools/make_score_fixtures.py`: the two columns the reference reads, and the single-character emoji it can match).
//! The Rust crates that embed VADER (`vader_sentiment` 0.1.1, `vader-sentimental` 0.1.3) port an older version: their
//! lexicon lacks `heart`/`hearts` and their rules differ from 3.3.2 (boosters, `least`, `no`, emoji), giving compound
//! scores off by up to 0.46 on the reference's own examples, so they are not used.
//!
//! The one deliberate difference: the reference rounds `compound` to 4 decimals; this returns it unrounded (rewards
//! that differ in the 5th decimal still rank).

use std::collections::HashMap;
use std::sync::OnceLock;

const LEXICON_TSV: &str = include_str!("vader_data/vader_lexicon.tsv");
const EMOJI_TSV: &str = include_str!("vader_data/emoji_utf8_lexicon.tsv");

const B_INCR: f64 = 0.293;
const B_DECR: f64 = -0.293;
const C_INCR: f64 = 0.733;
const N_SCALAR: f64 = -0.74;

const NEGATE: &[&str] = &[
    "aint",
    "arent",
    "cannot",
    "cant",
    "couldnt",
    "darent",
    "didnt",
    "doesnt",
    "ain't",
    "aren't",
    "can't",
    "couldn't",
    "daren't",
    "didn't",
    "doesn't",
    "dont",
    "hadnt",
    "hasnt",
    "havent",
    "isnt",
    "mightnt",
    "mustnt",
    "neither",
    "don't",
    "hadn't",
    "hasn't",
    "haven't",
    "isn't",
    "mightn't",
    "mustn't",
    "neednt",
    "needn't",
    "never",
    "none",
    "nope",
    "nor",
    "not",
    "nothing",
    "nowhere",
    "oughtnt",
    "shant",
    "shouldnt",
    "uhuh",
    "wasnt",
    "werent",
    "oughtn't",
    "shan't",
    "shouldn't",
    "uh-uh",
    "wasn't",
    "weren't",
    "without",
    "wont",
    "wouldnt",
    "won't",
    "wouldn't",
    "rarely",
    "seldom",
    "despite",
];

const BOOSTER_INCR: &[&str] = &[
    "absolutely",
    "amazingly",
    "awfully",
    "completely",
    "considerable",
    "considerably",
    "decidedly",
    "deeply",
    "effing",
    "enormous",
    "enormously",
    "entirely",
    "especially",
    "exceptional",
    "exceptionally",
    "extreme",
    "extremely",
    "fabulously",
    "flipping",
    "flippin",
    "frackin",
    "fracking",
    "fricking",
    "frickin",
    "frigging",
    "friggin",
    "fully",
    "fuckin",
    "fucking",
    "fuggin",
    "fugging",
    "greatly",
    "hella",
    "highly",
    "hugely",
    "incredible",
    "incredibly",
    "intensely",
    "major",
    "majorly",
    "more",
    "most",
    "particularly",
    "purely",
    "quite",
    "really",
    "remarkably",
    "so",
    "substantially",
    "thoroughly",
    "total",
    "totally",
    "tremendous",
    "tremendously",
    "uber",
    "unbelievably",
    "unusually",
    "utter",
    "utterly",
    "very",
];

const BOOSTER_DECR: &[&str] = &[
    "almost",
    "barely",
    "hardly",
    "just enough",
    "kind of",
    "kinda",
    "kindof",
    "kind-of",
    "less",
    "little",
    "marginal",
    "marginally",
    "occasional",
    "occasionally",
    "partly",
    "scarce",
    "scarcely",
    "slight",
    "slightly",
    "somewhat",
    "sort of",
    "sorta",
    "sortof",
    "sort-of",
];

const SPECIAL_CASES: &[(&str, f64)] = &[
    ("the shit", 3.0),
    ("the bomb", 3.0),
    ("bad ass", 1.5),
    ("badass", 1.5),
    ("bus stop", 0.0),
    ("yeah right", -2.0),
    ("kiss of death", -1.5),
    ("to die for", 3.0),
    ("beating heart", 3.5),
];

/// The analyzer's tables, built once from the embedded files.
struct Tables {
    lexicon: HashMap<&'static str, f64>,
    emojis: HashMap<char, &'static str>,
}

fn tables() -> &'static Tables {
    static T: OnceLock<Tables> = OnceLock::new();
    T.get_or_init(|| {
        let mut lexicon = HashMap::with_capacity(7600);
        for line in LEXICON_TSV.lines() {
            if let Some((w, m)) = line.split_once('\t') {
                // The file is generated from the reference lexicon; every measure parses.
                lexicon.insert(w, m.parse::<f64>().unwrap_or(0.0));
            }
        }
        let mut emojis = HashMap::with_capacity(1500);
        for line in EMOJI_TSV.lines() {
            if let Some((e, d)) = line.split_once('\t') {
                let mut chars = e.chars();
                if let (Some(c), None) = (chars.next(), chars.next()) {
                    emojis.insert(c, d);
                }
            }
        }
        Tables { lexicon, emojis }
    })
}

fn booster(word: &str) -> Option<f64> {
    if BOOSTER_INCR.contains(&word) {
        Some(B_INCR)
    } else if BOOSTER_DECR.contains(&word) {
        Some(B_DECR)
    } else {
        None
    }
}

fn special_case(seq: &str) -> Option<f64> {
    SPECIAL_CASES
        .iter()
        .find(|(k, _)| *k == seq)
        .map(|(_, v)| *v)
}

/// Python's `str.isspace`.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

/// Python's `str.isupper`: at least one cased character and no lowercase or titlecase one.
fn py_isupper(s: &str) -> bool {
    let mut cased = false;
    for c in s.chars() {
        if c.is_lowercase() || is_titlecase(c) {
            return false;
        }
        if c.is_uppercase() {
            cased = true;
        }
    }
    cased
}

/// Unicode general category Lt.
fn is_titlecase(c: char) -> bool {
    matches!(c, '\u{01C5}' | '\u{01C8}' | '\u{01CB}' | '\u{01F2}' | '\u{1F88}'..='\u{1F8F}'
        | '\u{1F98}'..='\u{1F9F}' | '\u{1FA8}'..='\u{1FAF}' | '\u{1FBC}' | '\u{1FCC}' | '\u{1FFC}')
}

/// `negated([word])` of the reference: a negation word or anything containing "n't".
fn negated(lower: &str) -> bool {
    NEGATE.contains(&lower) || lower.contains("n't")
}

/// `SentiText._strip_punc_if_word`: strip ASCII punctuation unless that leaves two characters or fewer.
fn strip_punc_if_word(token: &str) -> &str {
    let stripped = token.trim_matches(|c: char| c.is_ascii_punctuation());
    if stripped.chars().count() <= 2 {
        token
    } else {
        stripped
    }
}

fn scalar_inc_dec(word: &str, lower: &str, valence: f64, is_cap_diff: bool) -> f64 {
    let mut scalar = 0.0;
    if let Some(b) = booster(lower) {
        scalar = b;
        if valence < 0.0 {
            scalar *= -1.0;
        }
        if py_isupper(word) && is_cap_diff {
            if valence > 0.0 {
                scalar += C_INCR;
            } else {
                scalar -= C_INCR;
            }
        }
    }
    scalar
}

struct Analysis<'a> {
    t: &'static Tables,
    words: Vec<&'a str>,
    lower: Vec<String>,
    is_cap_diff: bool,
}

impl Analysis<'_> {
    fn in_lexicon(&self, j: usize) -> bool {
        self.t.lexicon.contains_key(self.lower[j].as_str())
    }

    fn sentiment_valence(&self, i: usize) -> f64 {
        let n = self.words.len();
        let w = &self.lower;
        let Some(&lex) = self.t.lexicon.get(w[i].as_str()) else {
            return 0.0;
        };
        let mut valence = lex;
        if w[i] == "no" && i != n - 1 && self.in_lexicon(i + 1) {
            valence = 0.0;
        }
        if (i > 0 && w[i - 1] == "no")
            || (i > 1 && w[i - 2] == "no")
            || (i > 2 && w[i - 3] == "no" && (w[i - 1] == "or" || w[i - 1] == "nor"))
        {
            valence = lex * N_SCALAR;
        }
        if py_isupper(self.words[i]) && self.is_cap_diff {
            if valence > 0.0 {
                valence += C_INCR;
            } else {
                valence -= C_INCR;
            }
        }
        for start_i in 0..3 {
            if i > start_i && !self.in_lexicon(i - (start_i + 1)) {
                let j = i - (start_i + 1);
                let mut s = scalar_inc_dec(self.words[j], &w[j], valence, self.is_cap_diff);
                if start_i == 1 && s != 0.0 {
                    s *= 0.95;
                }
                if start_i == 2 && s != 0.0 {
                    s *= 0.9;
                }
                valence += s;
                valence = self.negation_check(valence, start_i, i);
                if start_i == 2 {
                    valence = self.special_idioms_check(valence, i);
                }
            }
        }
        self.least_check(valence, i)
    }

    fn least_check(&self, valence: f64, i: usize) -> f64 {
        let w = &self.lower;
        if i > 1 && !self.in_lexicon(i - 1) && w[i - 1] == "least" {
            if w[i - 2] != "at" && w[i - 2] != "very" {
                return valence * N_SCALAR;
            }
        } else if i > 0 && !self.in_lexicon(i - 1) && w[i - 1] == "least" {
            return valence * N_SCALAR;
        }
        valence
    }

    fn negation_check(&self, valence: f64, start_i: usize, i: usize) -> f64 {
        let w = &self.lower;
        let so_this = |x: &str| x == "so" || x == "this";
        match start_i {
            0 if negated(&w[i - 1]) => valence * N_SCALAR,
            1 => {
                if w[i - 2] == "never" && so_this(&w[i - 1]) {
                    valence * 1.25
                } else if w[i - 2] == "without" && w[i - 1] == "doubt" {
                    valence
                } else if negated(&w[i - 2]) {
                    valence * N_SCALAR
                } else {
                    valence
                }
            }
            2 => {
                if (w[i - 3] == "never" && so_this(&w[i - 2])) || so_this(&w[i - 1]) {
                    valence * 1.25
                } else if w[i - 3] == "without" && (w[i - 2] == "doubt" || w[i - 1] == "doubt") {
                    valence
                } else if negated(&w[i - 3]) {
                    valence * N_SCALAR
                } else {
                    valence
                }
            }
            _ => valence,
        }
    }

    /// Only called with i ≥ 3.
    fn special_idioms_check(&self, mut valence: f64, i: usize) -> f64 {
        let w = &self.lower;
        let n = w.len();
        let onezero = format!("{} {}", w[i - 1], w[i]);
        let twoonezero = format!("{} {} {}", w[i - 2], w[i - 1], w[i]);
        let twoone = format!("{} {}", w[i - 2], w[i - 1]);
        let threetwoone = format!("{} {} {}", w[i - 3], w[i - 2], w[i - 1]);
        let threetwo = format!("{} {}", w[i - 3], w[i - 2]);
        for seq in [&onezero, &twoonezero, &twoone, &threetwoone, &threetwo] {
            if let Some(v) = special_case(seq) {
                valence = v;
                break;
            }
        }
        if n - 1 > i {
            if let Some(v) = special_case(&format!("{} {}", w[i], w[i + 1])) {
                valence = v;
            }
        }
        if n - 1 > i + 1 {
            if let Some(v) = special_case(&format!("{} {} {}", w[i], w[i + 1], w[i + 2])) {
                valence = v;
            }
        }
        for ngram in [&threetwoone, &threetwo, &twoone] {
            if let Some(b) = booster(ngram) {
                valence += b;
            }
        }
        valence
    }

    /// `_but_check`, including the reference's `list.index` behaviour: each value scales the *first* entry equal
    /// to it, read while the list is being rewritten.
    fn but_check(&self, sentiments: &mut [f64]) {
        let Some(bi) = self.lower.iter().position(|w| w == "but") else {
            return;
        };
        for idx in 0..sentiments.len() {
            let s = sentiments[idx];
            let si = sentiments.iter().position(|&x| x == s).unwrap_or(idx);
            if si < bi {
                sentiments[si] = s * 0.5;
            } else if si > bi {
                sentiments[si] = s * 1.5;
            }
        }
    }
}

fn punctuation_emphasis(text: &str) -> f64 {
    let ep = text.matches('!').count().min(4) as f64 * 0.292;
    let qm_count = text.matches('?').count();
    let qm = if qm_count > 1 {
        if qm_count <= 3 {
            qm_count as f64 * 0.18
        } else {
            0.96
        }
    } else {
        0.0
    };
    ep + qm
}

fn normalize(score: f64) -> f64 {
    (score / (score * score + 15.0).sqrt()).clamp(-1.0, 1.0)
}

/// The VADER compound score of `text` in [−1, 1] (vaderSentiment 3.3.2's `polarity_scores(text)["compound"]`,
/// unrounded).
pub fn compound(text: &str) -> f64 {
    let t = tables();
    // Emoji become their descriptions.
    let mut no_emoji = String::with_capacity(text.len());
    let mut prev_space = true;
    for c in text.chars() {
        if let Some(desc) = t.emojis.get(&c) {
            if !prev_space {
                no_emoji.push(' ');
            }
            no_emoji.push_str(desc);
            prev_space = false;
        } else {
            no_emoji.push(c);
            prev_space = c == ' ';
        }
    }
    let text = no_emoji.trim_matches(py_space);
    let words: Vec<&str> = text
        .split(py_space)
        .filter(|w| !w.is_empty())
        .map(strip_punc_if_word)
        .collect();
    let caps = words.iter().filter(|w| py_isupper(w)).count();
    let a = Analysis {
        t,
        lower: words.iter().map(|w| w.to_lowercase()).collect(),
        is_cap_diff: caps > 0 && caps < words.len(),
        words,
    };
    let n = a.words.len();
    let mut sentiments = Vec::with_capacity(n);
    for i in 0..n {
        let lw = a.lower[i].as_str();
        if booster(lw).is_some() || (i + 1 < n && lw == "kind" && a.lower[i + 1] == "of") {
            sentiments.push(0.0);
        } else {
            sentiments.push(a.sentiment_valence(i));
        }
    }
    a.but_check(&mut sentiments);
    if sentiments.is_empty() {
        return 0.0;
    }
    let mut sum: f64 = sentiments.iter().fold(0.0, |acc, &x| acc + x);
    let punct = punctuation_emphasis(text);
    if sum > 0.0 {
        sum += punct;
    } else if sum < 0.0 {
        sum -= punct;
    }
    normalize(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_examples() {
        // vaderSentiment 3.3.2 README values (rounded to 4 decimals there).
        for (text, want) in [
            ("VADER is smart, handsome, and funny.", 0.8316),
            ("VADER is very smart, handsome, and funny.", 0.8545),
            ("VADER is not smart, handsome, nor funny.", -0.7424),
            ("Today SUX!", -0.5461),
            ("", 0.0),
        ] {
            let got = compound(text);
            assert!((got - want).abs() < 5.1e-5, "{text}: {got} vs {want}");
        }
    }

    #[test]
    fn lexicon_is_the_3_3_2_one() {
        let t = tables();
        assert_eq!(t.lexicon.get("heart"), Some(&3.2));
        assert_eq!(t.lexicon.get("hearts"), Some(&3.3));
        assert!(t.lexicon.len() > 7400, "{}", t.lexicon.len());
        assert_eq!(t.emojis.get(&'😁'), Some(&"beaming face with smiling eyes"));
    }
}
