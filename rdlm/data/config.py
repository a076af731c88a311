"""The `data` config section: every field the data package reads, with its default."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Returns the default `data` section (the built-in corpus, no download)."""
    data = ml_collections.ConfigDict()
    data.source = "builtin"  # 'builtin' | 'arrayrecord' | 'parquet'.
    data.paths = ""  # Training files: a glob, comma-separated globs, or a list (file sources).
    data.eval_paths = ""  # Held-out files; '' holds out the first data.eval_documents documents.
    data.eval_documents = 256  # Documents held out from data.paths when data.eval_paths is ''.
    data.eval_batches = 8  # Validation batches per evaluation, the same fixed ones every time.
    data.seq_len = 256  # Tokens per row (rows hold seq_len + 1 tokens before the shift).
    data.parquet_column = "input_ids"  # Parquet column of token-id lists.
    data.tokenizer = ""  # SentencePiece .model; '' = metadata.json beside the shards / trained for built-in.
    data.bos_id = -1  # BOS id; -1 takes it from the tokenizer (set it for id-only corpora).
    data.eos_id = -1  # EOS id; -1 takes it from the tokenizer.
    data.pad_id = -1  # Padding id; -1 takes it from the tokenizer.
    # A record that cannot be read or holds an id outside the vocabulary: 'error' stops with one sentence
    # naming the file and record; 'skip' leaves it out, logs it and counts it (metrics: data_bad_records).
    data.on_bad_record = "error"
    data.append_eos = True  # End every document with EOS, so the model learns to stop.
    data.num_epochs = 0  # Passes over the training documents; 0 repeats forever.
    data.worker_count = 0  # grain worker processes; 0 packs in the training process.
    data.worker_buffer_size = 2  # Batches each worker prepares ahead.
    data.read_threads = 2  # Threads reading file sources ahead (in-memory sources use none).
    data.cache_dir = "~/.cache/rdlm"  # Where the built-in tokenizer is cached.

    data.builtin = ml_collections.ConfigDict()
    data.builtin.vocab_size = 4096  # Tokenizer vocabulary (at most the model's vocab_size).
    data.builtin.seed = 0  # Seed of the generated problems (training; held-out ones differ).
    data.builtin.tasks = ""  # Comma-separated task names from rdlm.data.tasks; '' = all.
    data.builtin.difficulties = tuple(range(1, 9))  # Problem difficulties to train on.
    # Held-out problem difficulties (evaluation); () = the training ones. Larger ones test extrapolation.
    data.builtin.heldout_difficulties = ()
    data.builtin.task_fraction = 0.2  # Share of training tokens that are problems; 0 = code only.
    data.builtin.mask_prompt = True  # Keep problem prompts out of the loss (answers only).
    data.builtin.heldout_code_percent = 5.0  # Percent of stdlib files held out for validation.
    data.builtin.heldout_problems = 64  # Held-out problems per task (validation and eval).
    data.builtin.code_max_mb = 0.0  # Cap on training code in MB of text; 0 = the whole stdlib.
    data.builtin.code_dir = ""  # Directory of .py files for the code documents; '' = this interpreter's stdlib.
    data.builtin.tokenizer_train_mb = 2.0  # MB of text the tokenizer is trained on.
    return data


def data_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Returns `config.data` for a full training config, or `config` if it is the section itself."""
    return config.data if "data" in config else config
