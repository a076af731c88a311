"""Chat data: huginn's template against the reference's Jinja template, loss masks, shards, packing, bad input."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import jinja2
import jinja2.ext
import numpy as np
import pytest
import sentencepiece as spm
import tokenizers

import huginn_tokenizer
from rdlm import checkpoint_io
from rdlm.data import chat, chat_template, packing, pipeline, prepare, sources
from rdlm.data import tokenizer as tokenizer_lib
from rdlm.model import RecurrentLM

REPO = pathlib.Path(__file__).resolve().parents[1]

# The reference's chat template, as the recurrent-pretraining project sets it on the huginn tokenizer it uploads
# (its HF conversion script) and as its finetuning_simple_example.py relies on for `return_assistant_tokens_mask`
# (which needs the {% generation %} tags).
REFERENCE_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set start_content = '<|begin_header|>' %}"
    "{% set end_content = message['content'] | trim  + '<|end_turn|>' %}{% if loop.index0 == 0 %}"
    "{% set start_content = bos_token + start_content %}{% endif %}"
    "{% if message['role'] == 'Huginn' or message['role'] == 'assistant' %}"
    "{% set start_content = start_content + 'Huginn<|end_header|>\n\n' %}{{ start_content }}"
    "{% generation %}{{ end_content }}{% endgeneration %}"
    "{% else %}{% set start_content = start_content + message['role'] + '<|end_header|>\n\n' %}"
    "{{ start_content }}{{ end_content }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|begin_header|>Huginn<|end_header|>\n\n' }}{% else %}{{ '<|end_text|>' }}"
    "{% endif %}"
)

CONVERSATIONS = [
    [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "  What is 17 * 23?\n"},
     {"role": "assistant", "content": " 17 * 23 = 391. #### 391 "}],
    [{"role": "user", "content": "def f(x):\n    return x\n"}, {"role": "Huginn", "content": "It returns x.\n\n"},
     {"role": "user", "content": "héllo — ünïcode 🙂 0110="}, {"role": "assistant", "content": "0"}],
    [{"role": "assistant", "content": "The quick brown fox."}, {"role": "user", "content": "1011="},
     {"role": "system", "content": ""}, {"role": "assistant", "content": ""}],
]
_START, _END = "\x02", "\x03"


class _Generation(jinja2.ext.Extension):
    """transformers' {% generation %} tag: marks the span it renders (the assistant mask)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller):
        return _START + caller() + _END


def reference(messages, add_generation_prompt=False, bos_token="<|begin_text|>"):
    """(text, [(start, end)] character spans of the assistant's generation blocks) from the reference template."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation])
    marked = env.from_string(REFERENCE_TEMPLATE).render(messages=messages, bos_token=bos_token,
                                                        add_generation_prompt=add_generation_prompt)
    text, spans, start = "", [], None
    for ch in marked:
        if ch == _START:
            start = len(text)
        elif ch == _END:
            spans.append((start, len(text)))
        else:
            text += ch
    return text, spans


def mask_from_spans(spans, starts_ends, n):
    """transformers' assistant mask: the tokens from the one holding a span's first character to the one holding
    its last (`char_to_token`), given each token's (start, end) offsets."""
    mask = np.zeros(n, bool)
    for start, end in spans:
        if end <= start:
            continue
        holding = [i for i, (s, e) in enumerate(starts_ends) if s <= start < e or s <= end - 1 < e]
        mask[min(holding):max(holding) + 1] = True
    return mask


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    path = huginn_tokenizer.write_bpe(tmp_path_factory.mktemp("bpe"))
    return path, tokenizers.Tokenizer.from_file(str(path))


@pytest.fixture(scope="module")
def sp_tokenizer():
    texts = ["def f(x):\n    return x * 2\n", "What is 17 * 23? 17 * 23 = 391. #### 391\n", "0110=0 1011=1\n",
             "The quick brown fox jumps over the lazy dog. It returns x.\n"] * 50
    return tokenizer_lib.train_tokenizer(texts, vocab_size=400)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_rendering_equals_the_reference_template_through_a_tokenizer_json(hf_tokenizer, add_generation_prompt):
    path, tok = hf_tokenizer
    encoder = chat.ChatTokenizer.from_file(path)
    for messages in CONVERSATIONS:
        text, spans = reference(messages, add_generation_prompt)
        assert chat_template.to_text(chat_template.render(messages, add_generation_prompt)) == text
        assert encoder.text(messages, add_generation_prompt) == text
        ids, mask = encoder.encode(messages, add_generation_prompt=add_generation_prompt)
        enc = tok.encode(text, add_special_tokens=False)
        assert ids.tolist() == enc.ids
        assert mask.tolist() == mask_from_spans(spans, enc.offsets, len(enc.ids)).tolist()
        trained = "".join(m["content"].strip() + "<|end_turn|>" for m in messages if m["role"] in ("assistant", "Huginn"))
        assert tok.decode(ids[mask].tolist(), skip_special_tokens=False) == trained
        all_ids, all_mask = encoder.encode(messages, add_generation_prompt=add_generation_prompt, train_on="all")
        assert all_ids.tolist() == ids.tolist() and all_mask.all()


def test_rendering_through_an_rdlm_sentencepiece_model(sp_tokenizer):
    """<s> and </s> stand for the template's BOS and <|end_text|>; the chat tokens are pieces 4-6."""
    encoder = chat.ChatTokenizer(sp_tokenizer, "sp")
    sp = sp_tokenizer.processor
    assert [sp.id_to_piece(i) for i in (4, 5, 6)] == list(chat_template.SENTENCEPIECE_CHAT_PIECES)
    for messages in CONVERSATIONS:
        text, spans = reference(messages, bos_token="")
        assert text.endswith("<|end_text|>")
        body = text[: -len("<|end_text|>")]
        pieces = sp.encode(body, out_type="proto").pieces
        ids, mask = encoder.encode(messages)
        assert ids.tolist() == [1] + [p.id for p in pieces] + [2]
        byte_spans = [(len(body[:s].encode()), len(body[:e].encode())) for s, e in spans]
        expected = mask_from_spans(byte_spans, [(p.begin, p.end) for p in pieces], len(pieces))
        assert mask.tolist() == [False] + expected.tolist() + [False]
        prompt = encoder.prompt_ids(messages[:1])
        assert prompt[0] == 1 and sp_tokenizer.encode(encoder.text(messages[:1])) == prompt[1:]


def _write_conversations(path, conversations):
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))


def test_prepare_chat_shards_read_back_with_their_masks_and_pack_apart(tmp_path, hf_tokenizer):
    path, _ = hf_tokenizer
    conversations = CONVERSATIONS * 3
    _write_conversations(tmp_path / "a.jsonl", conversations[:4])
    _write_conversations(tmp_path / "b.jsonl", conversations[4:])
    meta = prepare.prepare_chat(str(tmp_path / "*.jsonl"), str(tmp_path / "out"), tokenizer=str(path), num_shards=2)
    encoder = chat.ChatTokenizer.from_file(path)
    expected = [encoder.encode(m) for m in conversations]
    assert meta["num_documents"] == 9 and meta["loss_mask"] and meta["tokenizer"] == "tokenizer.json"
    assert meta["num_loss_tokens"] == sum(int(m.sum()) for _, m in expected)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == path.read_text()
    assert (tmp_path / "out" / "generation_config.json").exists()
    config = pipeline.config_lib.get_config()
    config.source, config.paths = "arrayrecord", str(tmp_path / "out" / "*.array_record")
    source = pipeline._file_source(config, config.paths, "data.paths", 512)
    assert isinstance(source, chat.ChatRecordSource) and len(source) == 9
    docs = [source[i] for i in range(9)]
    order = sorted(range(9), key=lambda i: (i % 2, i // 2))  # round-robin over the two shards
    for doc, i in zip(docs, order):
        assert doc["ids"].tolist() == expected[i][0].tolist() and doc["loss_mask"].tolist() == expected[i][1].tolist()
    ids = pipeline.special_ids(config)
    assert (ids.bos, ids.eos) == (encoder.bos_id, encoder.eos_id)
    rows = packing.pack_documents(docs, seq_len=64, bos_id=ids.bos, eos_id=ids.eos, pad_id=ids.pad)
    flat = [(int(t), float(w), int(s)) for r in rows for t, w, s in zip(r["targets"], r["weights"], r["segment_ids"])]
    trained = [int(t) for doc in docs for t, m in zip(doc["ids"][1:], doc["loss_mask"][1:]) if m]
    assert [t for t, w, _ in flat if w] == trained  # exactly the assistant tokens are targets in the loss
    for r in rows:  # every conversation starts at position 0 under its own segment id
        starts = np.flatnonzero(r["inputs"] == ids.bos)
        assert (r["positions"][starts] == 0).all()


def test_packed_conversations_do_not_attend_to_each_other(huginn_tiny_dir, hf_tokenizer):
    config, params = checkpoint_io.load_params(huginn_tiny_dir / "checkpoint")
    encoder = chat.ChatTokenizer.from_file(hf_tokenizer[0])
    first, second = (encoder.encode(m)[0] for m in (CONVERSATIONS[0], CONVERSATIONS[2]))
    changed = first.copy()
    changed[3:-3] = (changed[3:-3] + 7) % 300  # every text token of the first conversation
    forward = jax.jit(lambda ids, positions, segments: RecurrentLM(config).apply(
        {"params": params}, ids, num_steps=4, positions=positions, segment_ids=segments, init_scale=0.0).logits)
    outputs = {}
    for name, a in (("same", first), ("perturbed", changed)):
        (row,) = packing.pack_documents([a, second], seq_len=len(first) + len(second) - 1, bos_id=encoder.bos_id,
                                        eos_id=encoder.eos_id)
        assert row["positions"][len(first)] == 0 and row["segment_ids"][len(first)] == 2
        for masked in (True, False):
            segments = row["segment_ids"] if masked else np.ones_like(row["segment_ids"])
            logits = forward(*(jnp.asarray(x[None]) for x in (row["inputs"], row["positions"], segments)))
            outputs[name, masked] = np.asarray(logits[0, len(first):])
    assert np.array_equal(outputs["same", True], outputs["perturbed", True])  # bit-identical
    assert not np.allclose(outputs["same", False], outputs["perturbed", False])  # without the mask they would leak


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.count(". ") == 0, message
    return message


def test_bad_conversations_name_file_and_line(tmp_path, hf_tokenizer):
    good = json.dumps({"messages": CONVERSATIONS[0]})
    cases = {
        "no assistant turn": json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        "unknown role 'bot'": json.dumps({"messages": [{"role": "bot", "content": "hi"}]}),
        "not valid JSON": "{messages: [",
        "no 'messages' list": json.dumps({"text": "hi"}),
        "message 0 must be an object": json.dumps({"messages": [{"role": "user", "content": 3}]}),
    }
    for i, (what, line) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(f"{good}\n\n{line}\n")
        message = _error(prepare.prepare_chat, str(path), str(tmp_path / f"out{i}"), tokenizer=str(hf_tokenizer[0]))
        assert f"{path}:3" in message and what in message, message
        assert not (tmp_path / f"out{i}").exists()  # nothing is written before every line is checked


def test_tokenizers_without_chat_tokens_are_refused_in_one_sentence(tmp_path):
    import io

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["plain text without chat tokens"] * 50), model_writer=model,
                                   vocab_size=40, model_type="bpe", byte_fallback=False, minloglevel=2)
    (tmp_path / "plain.model").write_bytes(model.getvalue())
    huginn_tokenizer.write(tmp_path / "words.json")
    words = json.loads((tmp_path / "words.json").read_text())
    words["added_tokens"] = [t for t in words["added_tokens"] if t["content"] != "<|end_turn|>"]
    del words["model"]["vocab"]["<|end_turn|>"]
    (tmp_path / "no_turn.json").write_text(json.dumps(words))
    _write_conversations(tmp_path / "c.jsonl", CONVERSATIONS)
    for name, missing in (("plain.model", "<|begin_header|>, <|end_header|>, <|end_turn|>"), ("no_turn.json", "<|end_turn|>")):
        message = _error(prepare.prepare_chat, str(tmp_path / "c.jsonl"), str(tmp_path / "o"),
                         tokenizer=str(tmp_path / name))
        assert f"{tmp_path / name} has no huginn chat tokens ({missing} missing)" in message, message


@pytest.mark.slow
def test_prepare_chat_command_line(tmp_path):
    """The command trains a SentencePiece model with the chat tokens when given none; bad input exits 2."""
    _write_conversations(tmp_path / "c.jsonl", CONVERSATIONS * 30)
    args = [sys.executable, "-m", "rdlm.data.prepare", "--format=chat", f"--input={tmp_path / 'c.jsonl'}",
            f"--output_dir={tmp_path / 'out'}", "--vocab_size=400", "--train_on=all"]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Wrote 90 conversations" in done.stdout
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["train_on"] == "all" and meta["num_loss_tokens"] == meta["num_tokens"]
    tok = tokenizer_lib.Tokenizer.from_file(tmp_path / "out" / "tokenizer.model")
    doc = chat.ChatRecordSource([str(tmp_path / "out" / meta["shards"][0])])[0]
    assert doc["ids"].tolist() == chat.ChatTokenizer(tok, "t").encode(CONVERSATIONS[0])[0].tolist()
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": [{"role": "narrator", "content": "x"}]}) + "\n")
    args[4] = f"--input={tmp_path / 'bad.jsonl'}"
    done = subprocess.run(args[:6], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'bad.jsonl'}:1: message 0 has the unknown role 'narrator'; use one of system, user, "
        "assistant, Huginn."]


def test_init_from_another_shape_is_one_sentence(huginn_tiny_dir):
    config = checkpoint_io.model_config_of(huginn_tiny_dir / "checkpoint")
    other = config.replace(n_embd=32, n_heads=2, n_layers_in_coda=1)
    message = _error(checkpoint_io.check_same_shape, huginn_tiny_dir / "checkpoint", other)
    assert ("holds a model of another shape: model.n_embd=64 (this config: 32), model.n_heads=4 (this config: 2), "
            "model.n_layers_in_coda=2 (this config: 1)") in message
    checkpoint_io.check_same_shape(huginn_tiny_dir / "checkpoint", config.replace(block_size=64))  # not a shape
