"""The model side of evaluation, shared by `rdlm.evaluate` and the lm-eval adapter: text in, scores out.

    engine = Engine(config, params, codec, mesh=mesh, rules=rules, batch_size=16)
    engine.loglikelihood([("0110=", "0"), ...], num_steps=32)     # [(sum log p, is greedy)], per token steps
    engine.generate(["Question: ...\\nAnswer:"], until=["Question:"], max_gen_toks=256, num_steps=32)

Requests are tokenised as lm-eval's TemplateLM does (BOS + context; trailing spaces of the context
move to the continuation; the continuation is what the joint encoding adds after the context),
sorted into length buckets (powers of two up to block_size) and batched: one compiled program per
bucket serves every r. Log-likelihoods at a fixed depth come from one parallel forward pass; with
an adaptive exit, and for generation, tokens go one at a time through the KV cache (rdlm/eval/decoding.py).
"""

import collections
import dataclasses
import functools
import math
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rdlm import sharding
from rdlm.eval import decoding
from rdlm.model import RecurrentLM
from rdlm.model.config import ModelConfig
from rdlm.sampling.exits import ExitCriterion
from rdlm.sampling.text import TextCodec

_MIN_BUCKET = 16


@dataclasses.dataclass
class Scored:
    """Per request: summed log-probability of the continuation, whether it is the greedy one, and the
    core iterations each token used (with an exit: every token of context and continuation)."""

    loglikelihood: list[float]
    greedy: list[bool]
    steps: list[list[int]]


@dataclasses.dataclass
class Generated:
    text: list[str]
    steps: list[list[int]]  # core iterations of each generated token


def bucket(n: int, limit: int) -> int:
    """The smallest power of two >= n (and >= 16), at most `limit`."""
    return min(max(_MIN_BUCKET, 1 << max(n - 1, 0).bit_length()), limit)


def request_seed(ids) -> int:
    return zlib.crc32(np.asarray(ids, np.int32).tobytes())


@functools.partial(jax.jit, static_argnames=("config", "init_scale"))
def _forward_scores(params, inputs_BT, targets_BT, score_BT, valid_BT, seeds_B, key, num_steps, *,
                    config: ModelConfig, init_scale: float):
    B, T = inputs_BT.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    init = decoding.position_noise(config, key, seeds_B, positions, init_scale)
    out = RecurrentLM(config).apply({"params": params}, inputs_BT, num_steps=num_steps, positions=positions,
                                    segment_ids=valid_BT.astype(jnp.int32), init_state=init)
    logp_BTV = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
    token_logp = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    greedy = (jnp.argmax(logp_BTV, axis=-1) == targets_BT) | ~score_BT
    return jnp.sum(jnp.where(score_BT, token_logp, 0.0), axis=-1), jnp.all(greedy, axis=-1)


class Engine:
    """A loaded model with its tokenizer on a mesh; methods take text and any r."""

    def __init__(self, config: ModelConfig, params, codec: TextCodec, *, mesh, rules, batch_size: int = 16,
                 init_scale: float = 1.0, seed: int = 0, max_steps: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1.")
        self.config, self.params, self.codec = config, params, codec
        self.mesh, self.rules = mesh, rules
        ways = math.prod(mesh.shape[a] for a in sharding.data_axes(rules))
        self.rows = ways * math.ceil(batch_size / ways)  # rows per batch: a multiple of the data shards
        self.init_scale, self.key = float(init_scale), jax.random.key(seed)
        self.prefix_id = codec.bos_id if codec.bos_id is not None else (codec.stop_ids or (0,))[0]
        self._in = sharding.batch_sharding(mesh, rules)
        self._depth = max(int(max_steps), 1)  # KV slots per token of the cached programs

    # Tokenisation as lm-eval's TemplateLM.
    def encode(self, text: str) -> list[int]:
        """BOS + the text's ids, how every training document starts (one BOS if the text has its own)."""
        ids = list(self.codec.encode_fn(text))
        return ids if ids and ids[0] == self.prefix_id else [self.prefix_id] + ids

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            ids = list(self.codec.encode_fn(continuation))
            return ([self.prefix_id], ids) if not ids or ids[0] != self.prefix_id else (ids[:1], ids[1:])
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, head = self.encode(context + continuation), self.encode(context)
        return head, whole[len(head):]

    def loglikelihood(self, pairs, num_steps: int, exit: ExitCriterion | None = None) -> Scored:
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in pairs], num_steps, exit)

    def loglikelihood_tokens(self, requests, num_steps: int, exit: ExitCriterion | None = None) -> Scored:
        """Scores (context ids, continuation ids) pairs; a context keeps its last tokens if the pair is too long."""
        limit = self.config.block_size
        rows = []
        for context, continuation in requests:
            if not continuation:
                raise ValueError("A continuation encodes to no tokens; every choice must be non-empty text.")
            if len(continuation) > limit:
                raise ValueError(f"A continuation of {len(continuation)} tokens exceeds block_size={limit}.")
            whole = (list(context) + list(continuation))[-(limit + 1):]
            rows.append((whole, len(continuation), request_seed(context)))
        if exit is None:
            return self._forward(rows, num_steps)
        return self._cached_scores(rows, num_steps, exit)

    def generate(self, contexts, *, until, max_gen_toks: int, num_steps: int,
                 exit: ExitCriterion | None = None) -> Generated:
        """Greedy continuations of `contexts` (text), cut at the first of `until` and at the model's stop ids."""
        limit = self.config.block_size
        if not 1 <= max_gen_toks < limit:
            raise ValueError(f"max_gen_toks={max_gen_toks} must be in [1, {limit - 1}] (block_size={limit}).")
        prompts = [self.encode(c)[-(limit - max_gen_toks):] for c in contexts]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        texts, steps = [""] * len(prompts), [[] for _ in prompts]
        knobs = decoding.knobs_for(exit, self.codec.stop_ids)
        for chunk in self._chunks(order, lambda i: bucket(len(prompts[i]), limit - max_gen_toks)):
            P = bucket(max(len(prompts[i]) for i in chunk), limit - max_gen_toks)
            seeds = np.zeros((self.rows,), np.uint32)
            seeds[:len(chunk)] = [request_seed(prompts[i]) for i in chunk]
            budget = np.zeros((self.rows,), np.int32)
            if exit is None:  # the prompt prefilled at full depth
                context, lengths = self._context_batch([prompts[i] for i in chunk], P)
                forced, forced_len = np.zeros((self.rows, max_gen_toks), np.int32), budget.copy()
            else:  # every token one at a time through the exit, prompt included
                context, lengths = self._context_batch([prompts[i][:1] for i in chunk], 1)
                forced, forced_len = np.zeros((self.rows, P - 1 + max_gen_toks), np.int32), budget.copy()
                for row, i in enumerate(chunk):
                    forced[row, :len(prompts[i]) - 1] = prompts[i][1:]
                    forced_len[row] = len(prompts[i]) - 1
            budget[:len(chunk)] = forced_len[:len(chunk)] + max_gen_toks
            out = self._run(context, lengths, forced, forced_len, budget, seeds, num_steps, knobs, exit)
            tokens, used = np.asarray(out.tokens_BM), np.asarray(out.steps_BM)
            for row, i in enumerate(chunk):
                n, first = int((used[row] > 0).sum()), int(forced_len[row])
                ids = [t for t in tokens[row, first:n].tolist() if t not in self.codec.stop_ids]
                text = self.codec.decode(ids)
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                texts[i], steps[i] = text, used[row, :n].tolist()  # with an exit, the prompt's too
        return Generated(texts, steps)

    # Batching.
    def _chunks(self, order, bucket_of):
        groups = collections.defaultdict(list)
        for i in order:
            groups[bucket_of(i)].append(i)
        for key in sorted(groups):
            items = groups[key]
            for start in range(0, len(items), self.rows):
                yield items[start:start + self.rows]

    def _put(self, *arrays):
        return [jax.device_put(a, self._in) for a in arrays]

    def _forward(self, rows, num_steps: int) -> Scored:
        limit = self.config.block_size
        lls, greedy = [0.0] * len(rows), [False] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
        for chunk in self._chunks(order, lambda i: bucket(len(rows[i][0]) - 1, limit)):
            T = bucket(max(len(rows[i][0]) for i in chunk) - 1, limit)
            inputs, targets = np.zeros((self.rows, T), np.int32), np.zeros((self.rows, T), np.int32)
            score, valid = np.zeros((self.rows, T), bool), np.zeros((self.rows, T), bool)
            seeds = np.zeros((self.rows,), np.uint32)
            valid[:, 0] = True  # padding rows see one token, so that no row attends to nothing
            for row, i in enumerate(chunk):
                whole, n_cont, seed = rows[i]
                n = len(whole) - 1
                inputs[row, :n], targets[row, :n], valid[row, :n] = whole[:-1], whole[1:], True
                score[row, n - n_cont:n], seeds[row] = True, seed
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
                ll, ok = _forward_scores(self.params, *self._put(inputs, targets, score, valid, seeds), self.key,
                                         jnp.int32(num_steps), config=self.config, init_scale=self.init_scale)
            ll, ok = np.asarray(ll), np.asarray(ok)
            for row, i in enumerate(chunk):
                lls[i], greedy[i] = float(ll[row]), bool(ok[row])
        return Scored(lls, greedy, [[int(num_steps)] * r[1] for r in rows])

    def _cached_scores(self, rows, num_steps: int, exit: ExitCriterion) -> Scored:
        """Every token, context included, one at a time with the exit: the iterations are all the compute spent."""
        limit = self.config.block_size
        lls, greedy, steps = [0.0] * len(rows), [False] * len(rows), [[] for _ in rows]
        knobs = decoding.knobs_for(exit, ())
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
        for chunk in self._chunks(order, lambda i: bucket(len(rows[i][0]) - 1, limit)):
            M = bucket(max(len(rows[i][0]) for i in chunk) - 1, limit)
            context, lengths = self._context_batch([rows[i][0][:1] for i in chunk], 1)
            forced, budget = np.zeros((self.rows, M), np.int32), np.zeros((self.rows,), np.int32)
            seeds = np.zeros((self.rows,), np.uint32)
            for row, i in enumerate(chunk):
                whole, _, seed = rows[i]
                forced[row, :len(whole) - 1], budget[row], seeds[row] = whole[1:], len(whole) - 1, seed
            out = self._run(context, lengths, forced, budget, budget, seeds, num_steps, knobs, exit)
            logp, ok, used = np.asarray(out.logp_BM), np.asarray(out.greedy_BM), np.asarray(out.steps_BM)
            for row, i in enumerate(chunk):
                whole, n_cont, _ = rows[i]
                span = slice(len(whole) - 1 - n_cont, len(whole) - 1)
                lls[i], greedy[i] = float(logp[row, span].sum()), bool(ok[row, span].all())
                steps[i] = used[row, :len(whole) - 1].tolist()
        return Scored(lls, greedy, steps)

    def _context_batch(self, prompts, P: int):
        context = np.full((self.rows, P), self.prefix_id, np.int32)
        lengths = np.ones((self.rows,), np.int32)
        for row, ids in enumerate(prompts):
            context[row, :len(ids)], lengths[row] = ids, len(ids)
        return context, lengths

    def _run(self, context, lengths, forced, forced_len, budget, seeds, num_steps, knobs, exit):
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps} must be >= 1.")
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return decoding.run(self.params, *self._put(context, lengths, forced, forced_len, budget, seeds),
                                self.key, jnp.int32(num_steps), knobs, config=self.config,
                                depth=self.depth_for(num_steps), exit=decoding.static_exit(exit),
                                init_scale=self.init_scale)

    def depth_for(self, num_steps: int) -> int:
        """KV slots per token: max_steps, or a larger r once asked for (that recompiles), so every r <= it
        reuses one program."""
        self._depth = max(self._depth, int(num_steps))
        return self._depth
