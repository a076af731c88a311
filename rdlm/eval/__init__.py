"""Evaluation against the number of test-time iterations r (the command is `python -m rdlm.evaluate`).

- tasks.py     multiple-choice and generation tasks from JSONL, their prompts and lm-eval YAML
- scoring.py   acc / acc_norm, GSM8K strict-match / flexible-extract, bits per byte (lm-eval's definitions)
- engine.py    the model side: tokenisation, length buckets, log-likelihoods and greedy generation at any r
- decoding.py  token-by-token scoring and generation through the KV cache (adaptive exit)
- heldout.py   a run's own data: held-out reasoning accuracy and validation loss (training's final table)
- runner.py    load a checkpoint once, score every task at every r
- report.py    the table, results.json and the plot
- harness.py   the lm-evaluation-harness model `rdlm` (the `eval` extra)
- training_hook.py  eval.tasks during training
- make_tasks.py     regenerates the shipped tasks (data/) from rdlm.data.tasks
"""
