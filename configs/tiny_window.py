"""The extrapolation showcase: the tiny model with a 2-token attention window, solving strings 4x longer than trained.

python -m rdlm.train --config=configs/tiny_window.py --workdir=runs/tiny_window

The main job (configs/tiny.py) is exact Huginn. This config makes one deliberate deviation: every block
attends to a window of 2 tokens (itself and its predecessor), so information moves one position per
layer and a longer bit string needs more iterations of the core. It trains on parity problems of 1-8
bits only and solves 9-32 bits at r >= 32 (docs/miniature-effect.md has the recipe and its seeds).
Everything else (optimizer, mix, evaluation) is the main job's.
"""

from configs import base, tiny


def get_config():
    c = tiny.get_config()
    c.model = base.model_section(
        "tiny", vocab_size=512, n_embd=64, n_heads=4, intermediate_size=128, block_size=128,
        n_layers_in_prelude=1, n_layers_in_recurrent_block=1, n_layers_in_coda=1, attention_window=2,
    )
    c.train.num_steps = 800  # the scan appears between steps 200 and 400: a 2x margin
    c.data.builtin.tasks = "parity"
    c.data.builtin.difficulties = tuple(range(1, 9))  # bits per training problem; 9-32 held out are longer
    return c
