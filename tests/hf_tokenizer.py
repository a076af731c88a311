"""A small byte-level BPE tokenizer.json with huginn-0125's special tokens, for the tiny HF fixture (vocab 512)."""

import json
import pathlib

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from rdlm.sampling.text import HUGINN_SPECIALS

_TEXT = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Question: What is 17 * 23?\nAnswer: 17 * 23 = 391. #### 391\n",
    "The answer is 42. The quick brown fox jumps over the lazy dog.\n",
    "0110=0 1011=1 1110=1 0000=0\n",
]


def write(directory) -> pathlib.Path:
    """Writes DIR/tokenizer.json (specials first: <|begin_text|> is id 0) and a generation_config.json."""
    directory = pathlib.Path(directory)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(HUGINN_SPECIALS.values())
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TEXT * 4, trainer)
    path = directory / "tokenizer.json"
    tok.save(str(path))
    ids = {name: tok.token_to_id(token) for name, token in HUGINN_SPECIALS.items()}
    config = {"bos_token_id": ids["bos"], "eos_token_id": [ids["end_text"], ids["end_turn"]], "pad_token_id": ids["pad"]}
    (directory / "generation_config.json").write_text(json.dumps(config))
    return path
