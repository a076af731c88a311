"""Data: tokenizer, sources, packing, the built-in corpus and the grain input pipelines.

Import the modules themselves (`from rdlm.data import pipeline`); this file imports nothing, so
that light modules such as `rdlm.data.tasks` do not pull in grain.

- `config`: the `data` config section and its defaults.
- `tokenizer`: picklable SentencePiece wrapper, in-memory training, `check_vocab`.
- `sources`: ArrayRecord and parquet document sources, path globbing, the record format.
- `packing`: packs documents into rows with segment ids, positions and loss weights.
- `builtin`: the no-download corpus (stdlib code + generated reasoning problems).
- `pipeline`: `make_train_iterator`, `make_eval_batches`, `load_tokenizer`, `special_ids`.
- `prepare`: `python -m rdlm.data.prepare` turns text/JSONL into ArrayRecord shards.
"""
