"""Generate text from a checkpoint and show the compute each token used.

    python -m rdlm.generate --checkpoint=DIR --prompt="..." --num_steps=32 [--exit=kl:5e-4] [--check_every=C]
        [--sampler=sequential|speculative|parallel] [--dtype=float32|bfloat16] [--max_new_tokens=N]
        [--temperature=T] [--chat]

DIR is a training workdir, an Orbax step directory or a Hugging Face checkpoint directory; the text
goes through the checkpoint's tokenizer (SentencePiece for models trained here, huginn's
tokenizer.json otherwise; --chat applies huginn's chat template).
"""

import dataclasses
import time

from absl import flags

from rdlm import cli

SAMPLERS = ("sequential", "speculative", "parallel")

FLAGS = flags.FlagValues()
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Training workdir, Orbax step directory or HF directory.", flag_values=FLAGS
)
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text.", flag_values=FLAGS)
_NUM_STEPS = flags.DEFINE_integer(
    "num_steps", 32, "Core iterations per token (the verifier's with speculative).", flag_values=FLAGS
)
_EXIT = flags.DEFINE_string(
    "exit", "", "Adaptive exit 'criterion[:threshold]', e.g. kl:5e-4; '' = fixed depth.", flag_values=FLAGS
)
_CHECK_EVERY = flags.DEFINE_integer(
    "check_every", 0, "Check the exit criterion every C iterations; 0 = the criterion's default.", flag_values=FLAGS
)
_EXIT_IN_PREFILL = flags.DEFINE_boolean(
    "exit_in_prefill", True, "The prompt's iterations stop by the exit criterion too (the reference's default); "
    "--noexit_in_prefill runs the prompt at full depth.", flag_values=FLAGS
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ("float32", "bfloat16"), "Weights and compute.", flag_values=FLAGS)
_SAMPLER = flags.DEFINE_enum("sampler", "sequential", SAMPLERS, "Decoding algorithm.", flag_values=FLAGS)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.", flag_values=FLAGS)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.", flag_values=FLAGS)
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 = off.", flag_values=FLAGS)
_TOP_P = flags.DEFINE_float("top_p", 0.0, "Nucleus sampling mass; 0 = off.", flag_values=FLAGS)
_MIN_P = flags.DEFINE_float("min_p", 0.0, "Drop tokens below min_p x the top probability; 0 = off.", flag_values=FLAGS)
_CHAT = flags.DEFINE_boolean("chat", False, "Wrap the prompt in huginn's chat template.", flag_values=FLAGS)
_INIT_SCALE = flags.DEFINE_float(
    "init_scale", 1.0, "Std multiplier of the random initial state; 0 = zero state.", flag_values=FLAGS
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initial states and of sampling.", flag_values=FLAGS)
_KV_SHARE = flags.DEFINE_integer(
    "kv_share", 0, "Core KV slots per token (iteration i: slot i mod c); 0 = all.", flag_values=FLAGS
)
_MIN_STEPS = flags.DEFINE_integer("min_steps", 0, "Iterations before a token may exit.", flag_values=FLAGS)
_CONTINUOUS = flags.DEFINE_boolean(
    "continuous", False, "Start each token's state from the previous token's.", flag_values=FLAGS
)
_DRAFT_STEPS = flags.DEFINE_integer("draft_steps", 4, "Speculative: iterations per drafted token.", flag_values=FLAGS)
_LOOKAHEAD = flags.DEFINE_integer("lookahead", 8, "Speculative: tokens drafted per round.", flag_values=FLAGS)
_INNER_STEPS = flags.DEFINE_integer("inner_steps", 4, "Parallel: iterations per forward pass.", flag_values=FLAGS)
_FREEZE = flags.DEFINE_float(
    "freeze_threshold", 0.03, "Parallel: latent change below which a position freezes.", flag_values=FLAGS
)
_WINDOW = flags.DEFINE_integer("window", 0, "Parallel: in-flight positions; 0 = the sampler's default.",
                               flag_values=FLAGS)
_COMMIT = flags.DEFINE_enum("commit", "leading", ("leading", "last"),
                            "Parallel: commit the frozen front positions, or up to the last frozen one.",
                            flag_values=FLAGS)
_EMA = flags.DEFINE_float("ema_embeds", 0.0, "Parallel: weight of the previous pass's embedding.", flag_values=FLAGS)
_NOISE = flags.DEFINE_float("state_noise", 0.0, "Parallel: initial-state mixing before a pass.", flag_values=FLAGS)
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", "", "Tokenizer file overriding the checkpoint's (.model or .json).", flag_values=FLAGS
)


@dataclasses.dataclass
class Generation:
    text: str
    new_ids: list[int]
    steps_per_token: list[int]
    seconds: float
    extra: dict


def generate_text(
    checkpoint: str,
    prompt: str,
    *,
    sampler: str = "sequential",
    num_steps: int = 32,
    exit: str = "",
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    chat: bool = False,
    init_scale: float = 1.0,
    seed: int = 0,
    kv_share: int = 0,
    min_steps: int = 0,
    check_every: int = 0,
    exit_in_prefill: bool = True,
    continuous: bool = False,
    dtype: str = "float32",
    draft_steps: int = 4,
    lookahead: int = 8,
    inner_steps: int = 4,
    freeze_threshold: float = 0.03,
    window: int = 0,
    commit: str = "leading",
    ema_embeds: float = 0.0,
    state_noise: float = 0.0,
    tokenizer: str = "",
) -> Generation:
    """Loads the checkpoint and its tokenizer, generates from `prompt`, and returns the text and steps."""
    import jax

    from rdlm import checkpoint_io, sampling
    from rdlm.sampling import exits, precision, text as text_lib

    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {SAMPLERS}.")
    criterion = sampling.parse_exit(exit) if exit else None
    if criterion is not None and sampler != "sequential":
        raise ValueError(f"--exit works with --sampler=sequential, not {sampler}.")
    exits.check_exit_flags(exit, check_every, exit_in_prefill)
    codec = text_lib.load_codec(checkpoint, tokenizer or None)
    config, params = precision.with_dtype(*checkpoint_io.load_params(checkpoint), dtype)
    ids = codec.prompt_ids(prompt, chat=chat)
    common = dict(
        max_new_tokens=max_new_tokens,
        num_steps=num_steps,
        temperature=temperature,
        top_k=top_k or None,
        top_p=top_p or None,
        min_p=min_p or None,
        stop_tokens=codec.stop_ids,
        pad_id=codec.pad_id,
        rng=jax.random.key(seed),
        init_scale=init_scale,
    )
    start = time.perf_counter()
    extra = {}
    if sampler == "sequential":
        out = sampling.generate(
            config,
            params,
            [ids],
            exit_criterion=criterion and criterion.name,
            exit_threshold=criterion and criterion.threshold,
            min_steps=min_steps,
            check_every=check_every,
            exit_in_prefill=exit_in_prefill,
            kv_share=kv_share or None,
            continuous=continuous,
            **common,
        )
        extra["prompt_steps"] = int(jax.device_get(out.prompt_steps)[0])  # fewer than num_steps if it exited
    elif sampler == "speculative":
        out = sampling.generate_speculative(
            config, params, [ids], draft_steps=draft_steps, lookahead=lookahead, kv_share=kv_share or None, **common
        )
        extra["acceptance_rate"] = out.acceptance_rate
    else:
        settings = sampling.ParallelSettings(inner_steps=inner_steps, freeze_threshold=freeze_threshold,
                                             window=window or None, commit=commit, ema_embeds=ema_embeds,
                                             state_noise=state_noise)
        out = sampling.generate_parallel(
            config,
            params,
            [ids],
            settings=settings,
            min_steps=min_steps,
            continuous=continuous,
            **common,
        )
        extra["passes"] = int(out.passes)
    new_ids = out.new_tokens()[0]
    seconds = time.perf_counter() - start
    steps = [int(s) for s in jax.device_get(out.steps_per_token)[0][: len(new_ids)]]
    return Generation(codec.decode(new_ids), new_ids, steps, seconds, extra)


def main(argv):
    if len(argv) > 1:
        cli.fail(f'unexpected arguments {argv[1:]}; pass --prompt="...".')
    g = generate_text(
        _CHECKPOINT.value,
        _PROMPT.value,
        sampler=_SAMPLER.value,
        num_steps=_NUM_STEPS.value,
        exit=_EXIT.value,
        max_new_tokens=_MAX_NEW.value,
        temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value,
        top_p=_TOP_P.value,
        min_p=_MIN_P.value,
        chat=_CHAT.value,
        init_scale=_INIT_SCALE.value,
        seed=_SEED.value,
        kv_share=_KV_SHARE.value,
        min_steps=_MIN_STEPS.value,
        check_every=_CHECK_EVERY.value,
        exit_in_prefill=_EXIT_IN_PREFILL.value,
        continuous=_CONTINUOUS.value,
        dtype=_DTYPE.value,
        draft_steps=_DRAFT_STEPS.value,
        lookahead=_LOOKAHEAD.value,
        inner_steps=_INNER_STEPS.value,
        freeze_threshold=_FREEZE.value,
        window=_WINDOW.value,
        commit=_COMMIT.value,
        ema_embeds=_EMA.value,
        state_noise=_NOISE.value,
        tokenizer=_TOKENIZER.value,
    )
    print(g.text)
    mean = sum(g.steps_per_token) / max(len(g.steps_per_token), 1)
    print(
        f"\n[{len(g.new_ids)} tokens in {g.seconds:.2f}s (compile included); steps per token (mean {mean:.2f}): "
        f"{g.steps_per_token}]"
    )
    for key, value in g.extra.items():
        print(f"[{key}: {value:.3f}]" if isinstance(value, float) else f"[{key}: {value}]")


if __name__ == "__main__":
    cli.run(main, FLAGS, usage=__doc__, required={"checkpoint": "runs/tiny", "prompt": '"def f(x):"'})
