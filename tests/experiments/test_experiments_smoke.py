"""The research scripts in experiments/ at toy sizes: each still runs on this tree (their figures are in the
dated notes beside them; the numbers here mean nothing)."""

from __future__ import annotations

import json

import pytest

from bench import common


@pytest.mark.slow
def test_alternatives_measures_the_served_forward_beside_the_padded_one(trained_checkpoint, tmp_path):
    from experiments import alternatives

    alt = alternatives.run(model_dir=trained_checkpoint, seconds=0.05, skip=["compile", "onnx"],
                           stream=common.stream_texts(400), agreement_texts=100)
    assert {f"{alt['base']} packed", alt["reference"], "fp32 padded"} <= set(alt["agreement_with_fp32"])
    served = alt["rates_msgs_per_s"]["e2e stream, worker batches"]
    assert served[f"{alt['base']} packed"] > 0 and served[alt["reference"]] > 0
    assert alt["agreement_with_fp32"][f"{alt['base']} packed"] > 0.5
    assert any("packed" in line for line in alternatives.markdown(alt))


def test_gpu_sweep_script_runs_on_cpu(tmp_path):
    """The GPU script itself, on the CPU at toy sizes: it must work the first time it meets an H200."""
    from experiments import gpu_sweep

    out = tmp_path / "gpu.json"
    assert (
        gpu_sweep.main(
            [
                "--device",
                "cpu",
                "--batch-sizes",
                "1,4",
                "--dtypes",
                "bf16,fp32",
                "--seconds-per-point",
                "0.02",
                "--rounds",
                "1",
                "--gemm-tokens",
                "256",
                "--inputs",
                str(tmp_path / "none.json"),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert data["sweep"]["titles"]["bf16"]["4"]["msgs_per_s"] > 0
    assert data["gemm_tflops"]["fp32"] > 0


def test_train_recipes_times_the_trainers_own_steps(tmp_path):
    """bench.train_recipes at one step per recipe: every recipe is stepped by the trainer and timed, and
    the ratios are to R-Drop + FGM + EMA."""
    from experiments import train_recipes

    out = tmp_path / "recipes.json"
    recipes = ("plain", "R-Drop + FGM + EMA", "R-Drop on the FGM pair + EMA")
    assert train_recipes.main(["--steps", "1", "--rounds", "1", "--precisions", "no", "--recipes",
                               ",".join(recipes), "--out", str(out)]) == 0
    timed = json.loads(out.read_text())["precisions"]["no"]
    assert timed["resolved"] == "no"
    assert all(timed["recipes"][name]["examples_per_s"] > 0 for name in recipes)
    assert timed["recipes"]["R-Drop + FGM + EMA"]["vs_reference"] == 1.0
    with pytest.raises(SystemExit):
        train_recipes.main(["--recipes", "plain,nonsense"])


def test_poison_cost_measures_every_case_with_the_worker_s_verdict():
    from experiments import poison_cost
    from bench.common import REPO

    costs = poison_cost.measure(REPO)
    assert set(costs) == set(poison_cost.CASES)
    assert costs["JSON number of 5,000 digits"]["verdict"] == "invalid_json"
    assert costs["escaped lone surrogate"]["verdict"] == "invalid_text"
    assert costs["64 KB of alternating combining marks"]["verdict"] == "output"
    assert all(c["us"] > 0 for c in costs.values())
