"""tools/convert_checkpoint.py: HF -> native (Orbax) -> HF round trip keeps every logit."""

import subprocess
import sys

import numpy as np
import pytest
import transformers

from tests.reference import hf_logits, write_hf_qwen3


def _convert(*args):
    return subprocess.run([sys.executable, "tools/convert_checkpoint.py", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_round_trip_through_native_format(tmp_path):
    hf = write_hf_qwen3(tmp_path / "hf", seed=11, tie_word_embeddings=True)
    done = _convert("hf_to_native", "--src", tmp_path / "hf", "--dst", tmp_path / "native")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "native" / "params").is_dir()
    done = _convert("native_to_hf", "--src", tmp_path / "native", "--dst", tmp_path / "back")
    assert done.returncode == 0, done.stderr
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"), local_files_only=True)
    ids = np.random.default_rng(0).integers(0, 97, size=(2, 9))
    np.testing.assert_array_equal(hf_logits(back.eval(), ids), hf_logits(hf, ids))
    # A second conversion onto the same destination is refused without --overwrite.
    again = _convert("native_to_hf", "--src", tmp_path / "native", "--dst", tmp_path / "back")
    assert again.returncode != 0 and "not empty" in again.stderr


def test_missing_source_is_named(tmp_path):
    done = _convert("native_to_hf", "--src", tmp_path / "nothing", "--dst", tmp_path / "out")
    assert done.returncode != 0 and "config.json" in done.stderr
