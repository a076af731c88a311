"""Huginn's chat template (spec section 3.8), the one rendering that training data and prompts both go through.

The reference (the template the recurrent-pretraining project sets on huginn's tokenizer, the one its
`finetuning_simple_example.py` asks for assistant masks with), per message:

    [BOS if first] <|begin_header|> ROLE <|end_header|> "\\n\\n" CONTENT.strip() <|end_turn|>

ROLE is the message's role, except that `assistant` (or `Huginn`) is written `Huginn`; the assistant's
`CONTENT.strip() <|end_turn|>` is its `{% generation %}` span, the part a fine-tune trains on. After the
last message come either the generation prompt `<|begin_header|>Huginn<|end_header|>\\n\\n` or, for a
finished conversation, `<|end_text|>`.

`render` returns the conversation as pieces: special tokens by name, and text with the offset where the
trained span starts. Turning pieces into ids (rdlm.data.chat) or into a string (`to_text`) is up to the
tokenizer; nothing here imports one.
"""

import dataclasses
from collections.abc import Sequence

# Special tokens by name: huginn-0125's strings (ids 65504...). BOS and END_TEXT are the tokenizer's own
# BOS and end of text (SentencePiece's <s> and </s> in a SentencePiece model).
HUGINN_SPECIALS = {"bos": "<|begin_text|>", "end_text": "<|end_text|>", "begin_header": "<|begin_header|>",
                   "end_header": "<|end_header|>", "end_turn": "<|end_turn|>", "pad": "<|pad|>"}
BOS, END_TEXT, BEGIN_HEADER, END_HEADER, END_TURN = "bos", "end_text", "begin_header", "end_header", "end_turn"
TEMPLATE_SPECIALS = (BOS, END_TEXT, BEGIN_HEADER, END_HEADER, END_TURN)
# The chat tokens a SentencePiece model needs beyond its BOS and EOS (rdlm trains them in as user pieces).
SENTENCEPIECE_CHAT_PIECES = tuple(HUGINN_SPECIALS[n] for n in (BEGIN_HEADER, END_HEADER, END_TURN))

ASSISTANT_ROLE = "Huginn"
ASSISTANT_ROLES = ("assistant", ASSISTANT_ROLE)
ROLES = ("system", "user", *ASSISTANT_ROLES)
_HEADER_END = "\n\n"


@dataclasses.dataclass(frozen=True)
class Piece:
    """A special token (`text` is its name in TEMPLATE_SPECIALS) or literal text; `trained_from` is where the
    assistant's span starts in it (0 for a whole special token), None when none of it is trained."""

    text: str
    special: bool = False
    trained_from: int | None = None


def render(messages: Sequence[dict], add_generation_prompt: bool = False) -> list[Piece]:
    """The pieces of a conversation (`[{"role", "content"}, ...]`), exactly as the reference template writes it."""
    pieces = [Piece(BOS, special=True)]
    for m in messages:
        assistant = m["role"] in ASSISTANT_ROLES
        pieces += [
            Piece(BEGIN_HEADER, special=True),
            Piece(ASSISTANT_ROLE if assistant else m["role"]),
            Piece(END_HEADER, special=True),
            Piece(_HEADER_END + m["content"].strip(), trained_from=len(_HEADER_END) if assistant else None),
            Piece(END_TURN, special=True, trained_from=0 if assistant else None),
        ]
    if add_generation_prompt:
        pieces += [Piece(BEGIN_HEADER, special=True), Piece(ASSISTANT_ROLE), Piece(END_HEADER, special=True),
                   Piece(_HEADER_END)]
    else:
        pieces.append(Piece(END_TEXT, special=True))
    return pieces


def to_text(pieces: Sequence[Piece], special_text: dict[str, str] | None = None) -> str:
    """The pieces as one string; special tokens as `special_text[name]` (default: huginn's strings)."""
    special_text = HUGINN_SPECIALS if special_text is None else special_text
    return "".join(special_text[p.text] if p.special else p.text for p in pieces)


if __name__ == "__main__":
    import sys

    print("rdlm.data.chat_template is huginn's chat template, not a command; prepare chat data with\n"
          "  python -m rdlm.data.prepare --format=chat --input='conv/*.jsonl' --output_dir=data/chat", file=sys.stderr)
    sys.exit(2)
