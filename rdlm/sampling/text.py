"""A checkpoint's tokenizer for generation: SentencePiece for models trained here, huginn's tokenizer.json
through the `tokenizers` package, with huginn's chat template (spec section 3.8)."""

import dataclasses
import json

from etils import epath

from rdlm import checkpoint_io, storage

HUGINN_SPECIALS = {"bos": "<|begin_text|>", "end_text": "<|end_text|>", "begin_header": "<|begin_header|>",
                   "end_header": "<|end_header|>", "end_turn": "<|end_turn|>", "pad": "<|pad|>"}
ASSISTANT_ROLE = "Huginn"


@dataclasses.dataclass
class TextCodec:
    """Text <-> ids for prompting: how to encode a prompt (with BOS), which ids stop, which id pads."""

    encode_fn: object
    decode_fn: object
    bos_id: int | None
    stop_ids: tuple[int, ...]
    pad_id: int
    chat_template: bool  # the huginn chat template is available

    def prompt_ids(self, text: str, chat: bool = False) -> list[int]:
        if chat:
            if not self.chat_template:
                raise ValueError("--chat needs a tokenizer with huginn's chat tokens (<|begin_header|> ...); "
                                 "this checkpoint's tokenizer has none.")
            return self.encode_fn(chat_prompt([{"role": "user", "content": text}]))
        ids = self.encode_fn(text)
        return ids if self.bos_id is None or (ids and ids[0] == self.bos_id) else [self.bos_id] + ids

    def decode(self, ids) -> str:
        return self.decode_fn([int(i) for i in ids])


def chat_prompt(messages: list[dict]) -> str:
    """Huginn's template: BOS, then <|begin_header|>{role}<|end_header|>\\n\\n{content}<|end_turn|> per
    message (assistant rendered as Huginn), then the generation prompt."""
    s = HUGINN_SPECIALS
    parts = [s["bos"]]
    for m in messages:
        role = ASSISTANT_ROLE if m["role"] == "assistant" else m["role"]
        parts.append(f"{s['begin_header']}{role}{s['end_header']}\n\n{m['content'].strip()}{s['end_turn']}")
    parts.append(f"{s['begin_header']}{ASSISTANT_ROLE}{s['end_header']}\n\n")
    return "".join(parts)


def _sentencepiece(path) -> TextCodec:
    from rdlm.data.tokenizer import Tokenizer

    tok = Tokenizer.from_file(path)
    bos = tok.bos_id if tok.bos_id >= 0 else None
    stops = (tok.eos_id,) if tok.eos_id >= 0 else ()
    return TextCodec(tok.encode, tok.decode, bos, stops, max(tok.pad_id, 0), chat_template=False)


def _hf_tokenizer(path) -> TextCodec:
    import tokenizers

    tok = tokenizers.Tokenizer.from_str(storage.read_text(path))
    ids = {name: tok.token_to_id(token) for name, token in HUGINN_SPECIALS.items()}
    stops = {ids[k] for k in ("bos", "end_text", "end_turn") if ids[k] is not None}  # the reference's stop set
    config = storage.path(path).parent / "generation_config.json"
    if storage.exists(config):
        eos = json.loads(storage.read_text(config)).get("eos_token_id")
        stops.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    chat = all(ids[k] is not None for k in ("bos", "begin_header", "end_header", "end_turn"))
    return TextCodec(
        lambda text: tok.encode(text, add_special_tokens=False).ids,
        lambda ids_: tok.decode(ids_, skip_special_tokens=True),
        ids["bos"],
        tuple(sorted(stops)),
        ids["pad"] if ids["pad"] is not None else 0,
        chat_template=chat,
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def tokenizer_path(checkpoint) -> epath.Path:
    """Where a checkpoint's tokenizer lives: tokenizer.json (huginn's) or tokenizer.model (SentencePiece) in the
    checkpoint directory (HF, a converted Orbax directory, a training workdir), or for a training step
    WORKDIR/checkpoints/<step>, in WORKDIR."""
    candidates = [d / name for d in checkpoint_io.companion_dirs(checkpoint) for name in TOKENIZER_FILES]
    for path in candidates:
        if storage.exists(path):
            return path
    raise FileNotFoundError(
        f"No tokenizer found for checkpoint {storage.path(checkpoint)} (looked for "
        f"{', '.join(str(p) for p in candidates)}); pass --tokenizer=PATH (a SentencePiece .model or a tokenizer.json)."
    )


def load_codec(checkpoint, tokenizer: str | None = None) -> TextCodec:
    """The codec of `tokenizer` (a .model or tokenizer.json path) or else of the checkpoint's own tokenizer."""
    path = storage.path(tokenizer) if tokenizer else tokenizer_path(checkpoint)
    if not storage.exists(path):
        raise FileNotFoundError(f"Tokenizer file {path} does not exist{storage.missing_reason(path)}.")
    return _hf_tokenizer(path) if path.suffix == ".json" else _sentencepiece(path)
