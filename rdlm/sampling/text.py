"""A checkpoint's tokenizer for generation: SentencePiece for models trained here, huginn's tokenizer.json
through the `tokenizers` package, and huginn's chat template (spec section 3.8) through rdlm.data.chat, the
same rendering that chat training data goes through."""

import dataclasses
import json

from etils import epath

from rdlm import checkpoint_io, storage
from rdlm.data import chat as chat_lib
from rdlm.data.chat_template import ASSISTANT_ROLE, HUGINN_SPECIALS, render, to_text  # noqa: F401 (re-exported)


@dataclasses.dataclass
class TextCodec:
    """Text <-> ids for prompting: how to encode a prompt (with BOS), which ids stop, which id pads."""

    encode_fn: object
    decode_fn: object
    bos_id: int | None
    stop_ids: tuple[int, ...]
    pad_id: int
    chat: chat_lib.ChatTokenizer | None = None  # huginn's chat template, when the tokenizer has its tokens
    chat_error: str = ""  # why there is no chat template

    @property
    def chat_template(self) -> bool:
        return self.chat is not None

    def prompt_ids(self, text: str, chat: bool = False) -> list[int]:
        if chat:
            if self.chat is None:
                raise ValueError(f"--chat needs a tokenizer with huginn's chat tokens: {self.chat_error}")
            return self.chat.prompt_ids([{"role": "user", "content": text}])
        ids = self.encode_fn(text)
        return ids if self.bos_id is None or (ids and ids[0] == self.bos_id) else [self.bos_id] + ids

    def chat_text(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template as one string (for lm-eval and text tasks); encoding it gives `prompt_ids`."""
        if self.chat is None:
            raise ValueError(f"A chat template needs a tokenizer with huginn's chat tokens: {self.chat_error}")
        return self.chat.text(messages, add_generation_prompt)

    def decode(self, ids) -> str:
        return self.decode_fn([int(i) for i in ids])


def chat_prompt(messages: list[dict]) -> str:
    """Huginn's template with huginn's token strings, ending in the generation prompt."""
    return to_text(render(messages, add_generation_prompt=True))


def _chat_of(tokenizer, where: str) -> tuple[chat_lib.ChatTokenizer | None, str]:
    try:
        return chat_lib.ChatTokenizer(tokenizer, where), ""
    except ValueError as e:
        return None, str(e)


def sentencepiece_codec(tok, where: str = "the run's tokenizer") -> TextCodec:
    """The codec of a SentencePiece tokenizer (rdlm.data.tokenizer.Tokenizer); chat tokens decode to nothing."""
    bos = tok.bos_id if tok.bos_id >= 0 else None
    chat, error = _chat_of(tok, where)
    stops = {tok.eos_id} if tok.eos_id >= 0 else set()
    hidden = set()
    if chat is not None:
        stops.update(chat.stop_ids)
        hidden = {chat.special_ids[n] for n in ("begin_header", "end_header", "end_turn")}
    return TextCodec(tok.encode, lambda ids: tok.decode([i for i in ids if i not in hidden]), bos,
                     tuple(sorted(stops)), max(tok.pad_id, 0), chat, error)


def _sentencepiece(path) -> TextCodec:
    from rdlm.data.tokenizer import Tokenizer

    return sentencepiece_codec(Tokenizer.from_file(path), str(path))


def _hf_tokenizer(path) -> TextCodec:
    import tokenizers

    tok = tokenizers.Tokenizer.from_str(storage.read_text(path))
    ids = {name: tok.token_to_id(token) for name, token in HUGINN_SPECIALS.items()}
    stops = {ids[k] for k in ("bos", "end_text", "end_turn") if ids[k] is not None}  # the reference's stop set
    config = storage.path(path).parent / "generation_config.json"
    if storage.exists(config):
        eos = json.loads(storage.read_text(config)).get("eos_token_id")
        stops.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    chat, error = _chat_of(tok, str(path))
    return TextCodec(
        lambda text: tok.encode(text, add_special_tokens=False).ids,
        lambda ids_: tok.decode(ids_, skip_special_tokens=True),
        ids["bos"],
        tuple(sorted(stops)),
        ids["pad"] if ids["pad"] is not None else 0,
        chat,
        error,
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
