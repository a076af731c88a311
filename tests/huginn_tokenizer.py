"""A small tokenizer.json with huginn's special tokens, made with the `tokenizers` package (as huginn-0125's is)."""

from rdlm.sampling import text

SPECIALS = list(text.HUGINN_SPECIALS.values())
WORDS = 500  # w0 ... w499 are ids 0 ... 499; the specials follow, then [UNK]


def write(path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(WORDS)} | {s: WORDS + i for i, s in enumerate(SPECIALS)}
    vocab["[UNK]"] = WORDS + len(SPECIALS)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    tok.decoder = decoders.WordPiece()
    tok.save(str(path))
