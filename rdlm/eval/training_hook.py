"""Scores `eval.tasks` at every `eval.num_steps` during training, as metrics for metrics.jsonl and TensorBoard."""

import jax

from rdlm.data import pipeline
from rdlm.eval import runner
from rdlm.eval.engine import Engine
from rdlm.sampling.text import sentencepiece_codec as codec_of


class TaskHook:
    """Loads the tasks and compiles their programs once; each call scores the current params."""

    def __init__(self, config, model_config, mesh, rules):
        if jax.process_count() > 1:
            raise ValueError(f"eval.tasks={config.eval.tasks!r} runs in single-process training only; set it to '' "
                             "and score the checkpoints with python -m rdlm.evaluate.")
        which, self.tasks = runner.split_tasks(str(config.eval.tasks).split(","))
        if which:
            raise ValueError(f"eval.tasks={config.eval.tasks!r}: {which} are logged by eval.every_steps already "
                             "(validation loss) or only at the end; list shipped or JSONL tasks.")
        tokenizer = pipeline.load_tokenizer(config)
        if tokenizer is None:
            raise ValueError("eval.tasks needs the run's tokenizer: set data.tokenizer.")
        self.num_steps = [int(r) for r in config.eval.num_steps]
        self.engine = Engine(model_config, None, codec_of(tokenizer), mesh=mesh, rules=rules,
                             batch_size=config.eval.batch_size, init_scale=config.eval.init_scale,
                             seed=config.eval.seed, max_steps=max(self.num_steps))

    def __call__(self, params) -> dict[str, float]:
        """{"eval/<task>/<metric>_r<r>": score} for every task, metric and r."""
        self.engine.params = params
        out = {}
        for r in self.num_steps:
            for task, scores in runner.score_tasks(self.engine, self.tasks, r).items():
                out.update({f"eval/{task}/{metric}_r{r}": v for metric, v in scores.items() if metric != "mean_iterations"})
        return out
