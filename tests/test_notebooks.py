"""The Colab notebooks (colab/*.ipynb) run end to end with their small settings, and are committed clean.

Each notebook runs in a fresh Jupyter kernel (nbclient; jupyter_client starts the `python3` kernel with this
interpreter, so the venv's), in a temporary working directory, with AEPO_NOTEBOOK_SMALL=1 and matplotlib's
Agg backend; an error in any cell fails the test. A probe cell appended in memory (the committed notebook is
not changed) prints what the notebook computed as JSON; the tests check it and the files the notebook wrote.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLAB = ROOT / "colab"
NOTEBOOKS = ("quickstart.ipynb", "bring_your_qwen3.ipynb", "loss_explorer.ipynb")
CELL_TIMEOUT_S = 300
PROBE = "AEPO_NOTEBOOK_PROBE "


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        AEPO_NOTEBOOK_SMALL="1", MPLBACKEND="Agg", JAX_PLATFORMS="cpu",
        # One CPU device, as a user's machine (conftest gives this process 8). The notebooks' tiny models
        # need no XLA optimisation; compiling without it takes about 40% off their run time on CI.
        XLA_FLAGS="--xla_backend_optimization_level=0")
    env.update(extra)
    return env


def execute(name: str, cwd: pathlib.Path, probe: str, **env: str) -> tuple[nbformat.NotebookNode, dict]:
    """Runs colab/<name> plus a probe cell (code printing `PROBE + json`) in `cwd`; returns the executed
    notebook and the probe's JSON. Raises nbclient's CellExecutionError on any failing cell."""
    nb = nbformat.read(COLAB / name, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(f"import json as _json\n{probe}"))
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}})
    start = time.perf_counter()
    client.execute(env=_env(**env))
    print(f"{name}: {time.perf_counter() - start:.1f} s")
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    lines = [line for line in text.splitlines() if line.startswith(PROBE)]
    assert len(lines) == 1, text
    return nb, json.loads(lines[0][len(PROBE):])


def outputs(nb, output_type: str, mime: str | None = None) -> list:
    found = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
             if o.output_type == output_type]
    return [o for o in found if mime is None or mime in o.get("data", {})]


def stdout(nb) -> str:
    return "".join(o.text for o in outputs(nb, "stream") if o.name == "stdout")


def read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


FIGURES = """
import matplotlib.pyplot as _plt
_figures = [len(_plt.figure(n).axes) for n in _plt.get_fignums()]
"""


# ------------------------------------------------------------------------------------ committed state


def test_notebooks_are_committed_without_outputs():
    found = sorted(p.name for p in COLAB.glob("*.ipynb"))
    assert found == sorted(NOTEBOOKS)
    for name in found:
        nb = nbformat.read(COLAB / name, as_version=nbformat.NO_CONVERT)
        nbformat.validate(nb)
        for i, cell in enumerate(nb.cells):
            where = f"{name} cell {i}"
            if cell.cell_type == "code":
                assert cell.outputs == [], f"{where} has outputs"
                assert cell.execution_count is None, f"{where} has an execution count"
            assert "execution" not in cell.metadata, f"{where} has execution timing metadata"
        assert "widgets" not in nb.metadata, f"{name} carries widget state"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_each_notebook_has_a_small_settings_switch_and_an_install_cell(name):
    nb = nbformat.read(COLAB / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    parameters = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1 and parameters[0] is code[0], "the first code cell is the parameters cell"
    assert 'SMALL = os.environ.get("AEPO_NOTEBOOK_SMALL", "0") == "1"' in parameters[0].source
    install = [c for c in code if "pip" in c.source and "REPO = " in c.source]
    assert len(install) == 1 and 'find_spec("aepo_jax") is None' in install[0].source


# ------------------------------------------------------------------------------------------ quickstart


@pytest.mark.slow
def test_quickstart(tmp_path):
    nb, probe = execute("quickstart.ipynb", tmp_path, FIGURES + f"""
_runs = {{name: [row["step"] for row in rows] for name, rows in metrics.items()}}
print({PROBE!r} + _json.dumps({{"figures": _figures, "shown": len(shown), "small": SMALL, "runs": _runs}}))
""")
    assert probe["small"] is True
    assert "aepo_jax is already installed" in stdout(nb)  # the install cell did not pip install
    work = tmp_path / "workdir" / "colab_quickstart"
    assert {"config.json", "model.safetensors"} <= {p.name for p in (work / "sft_model").iterdir()}
    for run in ("aepo", "grpo"):
        rows = read_jsonl(work / run / "metrics" / "metrics.jsonl")
        rl = [r for r in rows if "rl/reward/mean" in r]
        assert [r["step"] for r in rl] == [1, 2, 3], run
        assert [r["step"] for r in rows if "rl/eval/pass@1" in r] == [0, 3], run  # start, then eval_every=3
        for r in rl:
            assert -1.0 <= r["rl/reward/mean"] <= 1.1 and 0.0 <= r["rl/accuracy"] <= 1.0
            assert r["rl/entropy"] > 0 and r["rl/rollout/tool_calls_per_traj"] >= 0
        branches = [r["rl/rollout/branches_per_question"] for r in rl]
        if run == "grpo":
            assert branches == [0.0] * 3  # --rollout=grpo never branches
        dumps = read_jsonl(work / run / "trajectories.jsonl")
        assert [d["step"] for d in dumps] == [s for s in (1, 2, 3) for _ in range(2 * 4)]  # 2 questions x k=4
    assert probe["runs"] == {"AEPO": [0, 1, 2, 3], "GRPO": [0, 1, 2, 3]}
    assert probe["figures"] == [4, 2]  # the four curves, the entropy side by side
    html = [o["data"]["text/html"] for o in outputs(nb, "display_data", "text/html")]
    assert probe["shown"] >= 1 and len(html) == probe["shown"] and all("<pre" in h for h in html)
    assert len(outputs(nb, "display_data", "text/markdown")) == 1  # the AEPO / GRPO summary table


# ------------------------------------------------------------------------------------ bring your qwen3

QUESTIONS = [{"question": "What is the capital of Atlantis?", "answers": ["Poseidonia"]},
             {"question": "How many moons does Pyrrha have?", "answers": ["3", "three"]},
             {"question": "Who founded the Order of the Lantern?", "answers": ["Mira Voss"]},
             {"question": "In which year was the Lantern Bridge built?", "answers": ["1871"]}]
CORPUS = [{"id": "d1", "title": "Atlantis", "text": "Atlantis is an island. Its capital is Poseidonia."},
          {"id": "d2", "title": "Pyrrha", "text": "Pyrrha is a planet with three moons."},
          {"id": "d3", "title": "Order of the Lantern",
           "text": "The Order of the Lantern was founded by Mira Voss."},
          {"id": "d4", "title": "Lantern Bridge", "text": "The Lantern Bridge was built in 1871."}]


def write_user_files(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """What a user brings: a tiny random HF Qwen3 with an HF tokenizer in its directory (a byte-level BPE with
    the agent's tags as single tokens and <|im_end|> as EOS), questions and a search corpus (JSONL)."""
    import transformers
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    from aepo_jax.data import world
    from aepo_jax.data.tokenizer import TOOL_TAGS
    from tests.reference import write_hf_qwen3

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [world.render_prompt(q["question"]) for q in QUESTIONS] + [d["text"] for d in CORPUS]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.add_tokens([AddedToken(tag, normalized=False) for tag in TOOL_TAGS])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                                     pad_token="<|endoftext|>")
    paths = {"ckpt": root / "Qwen3-tiny", "data": root / "questions.jsonl", "corpus": root / "corpus.jsonl",
             "export": root / "export" / "Qwen3-tiny-aepo"}
    write_hf_qwen3(paths["ckpt"], vocab_size=len(tokenizer), max_position_embeddings=512)
    tokenizer.save_pretrained(paths["ckpt"])
    for key, rows in (("data", QUESTIONS), ("corpus", CORPUS)):
        paths[key].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths


@pytest.mark.slow
def test_bring_your_qwen3(tmp_path):
    import jax
    import torch
    import transformers

    from aepo_jax.data.tokenizer import load_tokenizer
    from aepo_jax.models import qwen3

    files = write_user_files(tmp_path / "user")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    nb, probe = execute(
        "bring_your_qwen3.ipynb", run_dir,
        f'print({PROBE!r} + _json.dumps({{"records": len(records), "logit_error": EXPORT_LOGIT_ERROR, '
        f'"small": SMALL}}))',
        AEPO_NOTEBOOK_CKPT=str(files["ckpt"]), AEPO_NOTEBOOK_DATA=str(files["data"]),
        AEPO_NOTEBOOK_CORPUS=str(files["corpus"]), AEPO_NOTEBOOK_EXPORT=str(files["export"]))
    assert probe["small"] is True and probe["records"] == len(QUESTIONS)
    assert probe["logit_error"] < 1e-4
    assert "aepo_jax is already installed" in stdout(nb)
    assert len(outputs(nb, "display_data", "text/html")) == 2  # two chats with tools

    work = run_dir / "workdir" / "colab_bring_your_qwen3"
    rows = read_jsonl(work / "metrics" / "metrics.jsonl")
    assert [r["step"] for r in rows if "rl/reward/mean" in r] == [1, 2]  # two AEPO steps (--rl_steps=2)
    questions = {q["question"] for q in QUESTIONS}
    assert {d["question"] for d in read_jsonl(work / "trajectories.jsonl")} <= questions

    # The export: a complete HF directory (weights, config, tokenizer) that transformers loads, with the
    # logits of the trained model as this library computes them.
    export = files["export"]
    config = lambda path: qwen3.Qwen3Config.from_hf_dict(json.loads((path / "config.json").read_text()))
    assert config(export) == config(files["ckpt"])  # the same architecture as the checkpoint brought in
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32,
                                                                 local_files_only=True).eval()
    ours = qwen3.load_pretrained(export)
    source = load_tokenizer(files["ckpt"])
    exported_tokenizer = load_tokenizer(export)
    ids = source.encode(QUESTIONS[0]["question"] + " <search>Atlantis</search>")
    assert exported_tokenizer.encode(QUESTIONS[0]["question"]) == source.encode(QUESTIONS[0]["question"])
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids])).logits.double().numpy()
    with jax.default_matmul_precision("highest"):
        got = np.asarray(ours(np.asarray([ids], np.int32)), np.float64)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


# -------------------------------------------------------------------------------------- loss explorer


@pytest.mark.slow
def test_loss_explorer(tmp_path):
    nb, probe = execute("loss_explorer.ipynb", tmp_path, FIGURES + f"""
import sys as _sys
_at_one = {{f"{{n}} {{a}}": [float(v[int(np.argmin(np.abs(ratios - 1.0)))]) for v in curves[n, a]]
           for n, a in curves}}
print({PROBE!r} + _json.dumps({{"figures": _figures, "prefix": _sys.prefix, "points": len(ratios),
                                "at_one": _at_one, "table": [[*k, v] for k, v in GRAD_TABLE.items()]}}))
""")
    assert probe["prefix"] == sys.prefix  # the kernel runs this environment's python
    assert probe["figures"] == [10, 10]  # gradient and loss grids: 2 advantages x 5 losses
    assert 50 <= probe["points"] <= 200  # the small settings' sweep
    # At r = 1 every loss is -A r with gradient -A.
    assert len(probe["at_one"]) == 10
    for key, (loss, grad) in probe["at_one"].items():
        advantage = float(key.split()[1])
        assert (loss, grad) == (pytest.approx(-advantage, abs=1e-6), pytest.approx(-advantage, abs=1e-6)), key
    # The gradient weight per clip region as docs/losses.md tabulates it (el / eh / c: the entries' defaults).
    eh = {"grpo": 0.2, "dapo": 0.28, "gppo": 0.2, "cispo": 0.28, "aepo": 0.2}
    expected = {
        (1.5, 1.0): {"grpo": 0.0, "dapo": 0.0, "gppo": -(1 + eh["gppo"]), "cispo": -(1 + eh["cispo"]),
                     "aepo": -(1 + eh["aepo"])},
        (0.5, 1.0): dict.fromkeys(eh, -0.5),                                        # A > 0 below: unclipped
        (1.5, -1.0): {"grpo": 1.5, "dapo": 1.5, "gppo": 1.5, "cispo": 1 + eh["cispo"], "aepo": 1.5},
        (0.5, -1.0): {"grpo": 0.0, "dapo": 0.0, "gppo": 1 - 0.2, "cispo": 0.5, "aepo": 0.0},  # cispo: el = 1
        (3.5, -1.0): {"grpo": 0.0, "dapo": 0.0, "gppo": 0.0, "cispo": 1 + eh["cispo"], "aepo": 0.0},  # r > c
    }
    table = {(name, r, a): g for name, r, a, g in probe["table"]}
    for (r, a), per_loss in expected.items():
        for name, value in per_loss.items():
            assert table[name, r, a] == pytest.approx(value, abs=1e-5), (name, r, a)
    assert len(outputs(nb, "display_data", "text/markdown")) == 1  # the region table
