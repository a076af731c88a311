"""Small tokenizer.json files with huginn's special tokens, made with the `tokenizers` package (as huginn-0125's is).

`write`: a word-level vocabulary w0 ... w499 (ids 0 ... 499), then the specials (500 ...), then [UNK].
`write_bpe`: a byte-level BPE for the tiny HF fixture (vocab 512) that round-trips real text.
"""

import json
import pathlib

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from rdlm.sampling.text import HUGINN_SPECIALS

SPECIALS = list(HUGINN_SPECIALS.values())
WORDS = 500


def write(path) -> None:
    vocab = {f"w{i}": i for i in range(WORDS)} | {s: WORDS + i for i, s in enumerate(SPECIALS)}
    vocab["[UNK]"] = WORDS + len(SPECIALS)
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    tok.decoder = decoders.WordPiece()
    tok.save(str(path))


_TEXT = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Question: What is 17 * 23?\nAnswer: 17 * 23 = 391. #### 391\n",
    "The answer is 42. The quick brown fox jumps over the lazy dog.\n",
    "0110=0 1011=1 1110=1 0000=0\n",
]


def write_bpe(directory) -> pathlib.Path:
    """A byte-level BPE model trained on a few lines of code, math and parity text: real text round-trips."""
    # DIR/tokenizer.json (specials first: <|begin_text|> is id 0) and a generation_config.json.
    directory = pathlib.Path(directory)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TEXT * 4, trainer)
    path = directory / "tokenizer.json"
    tok.save(str(path))
    ids = {name: tok.token_to_id(token) for name, token in HUGINN_SPECIALS.items()}
    config = {"bos_token_id": ids["bos"], "eos_token_id": [ids["end_text"], ids["end_turn"]], "pad_token_id": ids["pad"]}
    (directory / "generation_config.json").write_text(json.dumps(config))
    return path
