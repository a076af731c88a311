"""A slow, independent reference for rdlm.sampling (imported by the sampling tests; holds no tests).

Batch 1, greedy. KL exit is checked after iterations max(min_steps, 1) + j * check_every, against the
distribution of the previous check. The prompt but its last token is one block, which stops at a check
by the same KL test on its last position's distribution (the reference's default; with
exit_in_prefill=False it runs at full depth); after that one token at a time, with every KV entry
kept in a dict keyed by (iteration, position) and read with the reference's lookup: a token that
ran e iterations is read at min(i, e - 1) (`latest-m4`), and with KV sharing iteration i reads what
its slot holds at the end, the last iteration i' < r with i' = i mod c (a frozen token counts as
repeating its last entry).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rdlm.model import RecurrentLM


def _np(kv):
    return tuple(np.asarray(x) for x in kv)


@functools.partial(jax.jit, static_argnames=("config", "method"))
def _stage(params, *args, config, method):
    return RecurrentLM(config).apply({"params": params}, *args, method=method)


class ReferenceDecoder:
    def __init__(self, config, params, max_len: int):
        self.config, self.T = config, max_len
        stage = functools.partial(_stage, params, config=config)
        self._embed = functools.partial(stage, method=RecurrentLM.embed)
        self._iterate = functools.partial(stage, method=RecurrentLM.iterate)
        self._decode = functools.partial(stage, method=RecurrentLM.decode)

    @staticmethod
    def source_iteration(i: int, r: int, share: int | None, ran: int) -> int:
        if share is not None:
            i = i % share + share * ((r - 1 - i % share) // share)
        return min(i, ran - 1)

    def _past(self, entries, positions):
        """Stacked keys [L, 1, H, K, T] and values [L, 1, H, T, K] of `entries[q]` (each [L, H, K]) for q in
        positions, zero-padded to T."""
        k0 = entries[positions[0]][0]
        L, H, K = k0.shape
        keys, values = np.zeros((L, 1, H, K, self.T), k0.dtype), np.zeros((L, 1, H, self.T, K), k0.dtype)
        for q in positions:
            keys[:, 0, :, :, q], values[:, 0, :, q] = entries[q]
        return keys, values

    def _kl_exit(self, logits, prev, threshold):
        logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)))
        return float(np.sum(np.exp(prev) * (prev - logp))) < threshold, logp

    def generate(self, prompt, max_new: int, r: int, *, share=None, kl_threshold=None, min_steps=0,
                 continuous=False, check_every=1, exit_in_prefill=True):
        cfg, T, V = self.config, self.T, self.config.vocab_size
        tokens = [int(t) for t in prompt]
        P = len(tokens) - 1
        prelude, core, coda, ran = {}, {}, {}, {}
        width = 8 * (P // 8 + 1)  # the prompt block is padded (segment 0) so that prompts share compiles
        pos, seg = np.arange(width)[None], (np.arange(width) < P)[None].astype(np.int32)
        e, kv = self._embed(np.asarray(tokens[:P] + [0] * (width - P))[None], pos, seg, None, None)
        kv = _np(kv)
        state = np.zeros((1, width, cfg.n_embd), np.float32)
        for q in range(P):
            prelude[q] = (kv[0][:, 0, q], kv[1][:, 0, q])
        first = max(min_steps, 1)  # checks after iterations first, first + check_every, ...
        prev, n = np.full((V,), -np.log(V), np.float32), 0
        for i in range(r):
            state, kv = self._iterate(state, e, pos, seg, None, None)
            kv = _np(kv)
            for q in range(P):
                core[(i, q)] = (kv[0][:, 0, q], kv[1][:, 0, q])
            n = i + 1
            if exit_in_prefill and kl_threshold is not None and n >= first and (n - first) % check_every == 0:
                logits, _, _ = self._decode(state, pos, seg, None, None)
                stop, prev = self._kl_exit(logits[0, max(P - 1, 0)], prev, kl_threshold)
                if stop:
                    break
        _, _, kv = self._decode(state, pos, seg, None, None)
        kv = _np(kv)
        for q in range(P):
            coda[q], ran[q] = (kv[0][:, 0, q], kv[1][:, 0, q]), n
        steps, last_state = [], np.zeros((1, 1, cfg.n_embd), np.float32)
        for _ in range(max_new):
            p = len(tokens) - 1
            pos, seg = np.asarray([[p]]), np.ones((1, 1), np.int32)
            seen = np.arange(T) < p
            if cfg.attention_window is not None:
                seen &= p - np.arange(T) < cfg.attention_window
            mask, before = seen[None, None], list(range(p))
            e, kv = self._embed(np.asarray([[tokens[p]]]), pos, seg, self._past(prelude, before), mask)
            kv = _np(kv)
            prelude[p] = (kv[0][:, 0, 0], kv[1][:, 0, 0])
            state = last_state if continuous else np.zeros((1, 1, cfg.n_embd), np.float32)
            prev, n = np.full((V,), -np.log(V), np.float32), 0
            for i in range(r):
                picked = {q: core[(self.source_iteration(i, r, share, ran[q]), q)] for q in before}
                state, kv = self._iterate(state, e, pos, seg, self._past(picked, before), mask)
                kv = _np(kv)
                core[(i, p)], n = (kv[0][:, 0, 0], kv[1][:, 0, 0]), i + 1
                if kl_threshold is not None and n >= first and (n - first) % check_every == 0:
                    logits, _, _ = self._decode(state, pos, seg, self._past(coda, before), mask)
                    stop, prev = self._kl_exit(logits[0, -1], prev, kl_threshold)
                    if stop:
                        break
            ran[p] = n
            logits, _, kv = self._decode(state, pos, seg, self._past(coda, before), mask)
            kv = _np(kv)
            coda[p] = (kv[0][:, 0, 0], kv[1][:, 0, 0])
            tokens.append(int(np.argmax(np.asarray(logits)[0, -1])))
            steps.append(n)
            last_state = np.asarray(state)
        return tokens, steps
