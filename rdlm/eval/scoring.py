"""Scores from model outputs, exactly as lm-evaluation-harness 0.4.13 computes them.

Multiple choice (`ConfigurableTask.process_results`, output_type multiple_choice): each choice's
continuation is `target_delimiter + choice`; `acc` takes the argmax of the summed log-likelihoods
and `acc_norm` the argmax of log-likelihood divided by the choice's length in characters (the
choice alone, without the delimiter). Ties go to the first choice (np.argmax).

GSM8K (`tasks/gsm8k/gsm8k.yaml`, `gsm8k-cot.yaml`): a regex filter extracts the answer from the
generation (`strict-match`: the task's answer pattern, first match; `flexible-extract`: the last
number-like match), then `exact_match` compares it with the reference after deleting `,`, `$`,
everything up to `#### ` and a final `.`, ignoring case. No match scores as "[invalid]".
"""

import math
import re

import numpy as np

# strict-match patterns: gsm8k.yaml's ("#### 42") and gsm8k-cot.yaml's ("The answer is 42.").
STRICT_PATTERNS = {
    "gsm8k": r"#### (\-?[0-9\.\,]+)",
    "gsm8k_cot": r"The answer is (\-?[0-9\.\,]+).",
}
FLEXIBLE_PATTERN = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
FALLBACK = "[invalid]"
IGNORED = (",", r"\$", r"(?s).*#### ", r"\.$")  # gsm8k's exact_match regexes_to_ignore
GENERATION_METRICS = ("strict-match", "flexible-extract")
CHOICE_METRICS = ("acc", "acc_norm")


def choice_scores(loglikelihoods, choices, label: int) -> dict[str, float]:
    """acc and acc_norm of one multiple-choice document from its choices' log-likelihoods."""
    lls = np.asarray(loglikelihoods, np.float64)
    lengths = np.asarray([float(len(c)) for c in choices])
    return {
        "acc": float(int(np.argmax(lls)) == label),
        "acc_norm": float(int(np.argmax(lls / lengths)) == label),
    }


def extract(text: str, pattern: str, group_select: int = 0) -> str:
    """lm-eval's `regex` filter: the `group_select`-th match (its first non-empty group), stripped."""
    matches = re.findall(pattern, text)
    if not matches:
        return FALLBACK
    match = matches[group_select]
    if isinstance(match, tuple):
        groups = [m for m in match if m]
        match = groups[0] if groups else FALLBACK
    return match.strip()


def _normalise(text: str) -> str:
    for pattern in IGNORED:
        text = re.sub(pattern, "", text)
    return text.lower()


def exact_match(prediction: str, reference: str) -> float:
    """gsm8k's exact_match (ignore_case, regexes_to_ignore, no punctuation stripping)."""
    return float(_normalise(prediction) == _normalise(reference))


def generation_scores(generated: str, reference: str, strict_pattern: str = STRICT_PATTERNS["gsm8k"]) -> dict[str, float]:
    """strict-match and flexible-extract of one generation against its reference answer."""
    return {
        "strict-match": exact_match(extract(generated, strict_pattern, 0), reference),
        "flexible-extract": exact_match(extract(generated, FLEXIBLE_PATTERN, -1), reference),
    }


def bits_per_byte(nll_nats: float, num_bytes: int) -> float | None:
    """Summed negative log-likelihood (nats) over the bytes it covers, in bits per byte."""
    return nll_nats / (math.log(2) * num_bytes) if num_bytes else None
