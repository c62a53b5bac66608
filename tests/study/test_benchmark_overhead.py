"""study/benchmarks/overhead.py, cost_table.py and gpu_cost.sh run end to end on tiny shapes (no timing assertion),
and the cost table of docs/cost.md is the one cost_table.py makes from study/results/cost/overhead.json."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
REGULARIZERS = ["none", "weight_decay", "spectral_norm", "igpen", "jacobian", "dreg"]


def _load(name):
    sys.path.insert(0, str(ROOT / "study" / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "study" / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _check_result(result, shape, regularizers, steps):
    assert result["shape"] == shape and result["steps"] == steps
    assert sorted(result["step_s"]) == sorted(["plain", *regularizers])
    assert all(len(times) == steps for times in result["step_s"].values())
    assert result["fused"] and result["recompiles_timed"] == 0
    if torch.__version__ >= "2.13":  # torch 2.13 traces every site as one region (2.11 does not: docs/cost.md)
        assert result["untraceable_regions"] == []
    assert len(result["load_before"]) == 3 and len(result["load_after"]) == 3
    rows = result["regularizers"]
    assert list(rows) == regularizers
    for row in rows.values():
        assert all(row[k] > 0 for k in ("time_ratio", "cpu_ratio", "saved_ratio", "peak_ratio", "total_peak_ratio"))
        low, high = row["time_ratio_interval"]
        assert low <= row["time_ratio"] <= high
    return rows


def test_llm_shape_smoke_and_its_table(tmp_path):
    """The fast check: tiny Gemma-2 with LoRA, dreg only, one round, in this process (no subprocess probe)."""
    overhead, cost_table = _load("overhead"), _load("cost_table")
    output = tmp_path / "overhead.json"
    overhead.main(["--shapes", "gemma2-tiny-lora:2x8", "--regularizers", "none,dreg", "--steps", "1", "--warmup", "1",
                   "--no-rss", "--output", str(output)])
    data = json.loads(output.read_text())
    (result,) = data["results"]
    rows = _check_result(result, "gemma2-tiny-lora", ["none", "dreg"], 1)
    assert (result["batch"], result["seq"], result["lora"], result["dreg_sites"]) == (2, 8, True, 2)
    assert 0 < result["trainable_parameters"] < result["parameters"]
    assert rows["none"]["saved_ratio"] == 1.0  # a second plain model keeps exactly what plain keeps
    assert "rss_step_ratio" not in rows["dreg"] and result["rss_kb"] == {}
    text = cost_table.main([str(output)])
    lines = text.splitlines()
    assert lines[0].startswith("| shape (batch x seq, rounds) | regularizer | time / plain |")
    assert lines[2].startswith("| tiny Gemma-2, LoRA r=8 (2 x 8, 1 rounds) | none (noise floor) | ")
    assert lines[3].startswith("| | **dreg** | **") and lines[3].endswith("| - |")  # no RSS measured
    assert re.search(r"\| \*\*\d\.\d\d-\d\.\d\d\*\* \|", lines[3])  # the interval of the median
    assert any(line.startswith("- tiny Gemma-2, LoRA r=8 (2 x 8): load ") and "2 DREG sites" in line for line in lines)


def test_shapes_and_sizes_are_parsed():
    overhead = _load("overhead")
    name, shape = overhead.parse_shape("gemma2-lora:1x1024")
    assert name == "gemma2-lora" and (shape.batch, shape.seq, shape.lora) == (1, 1024, True)
    assert overhead.parse_shape("minilm")[1].batch == 16
    with pytest.raises(ValueError, match="unknown shape"):
        overhead.parse_shape("gemma3")
    with pytest.raises(ValueError, match="BATCHxSEQ"):
        overhead.parse_shape("minilm:16")
    layered = overhead.parse_shape("tiny:2x16:8")[1]
    assert layered.config["num_hidden_layers"] == 8 and "8 layers" in layered.label
    assert overhead.parse_shape("tiny:2x16")[1].config["num_hidden_layers"] == 2  # the shape's own depth stays
    with pytest.raises(ValueError, match="NAME:BATCHxSEQ:LAYERS"):
        overhead.parse_shape("tiny:2x16:x")
    # the Gemma-2 shapes are Gemma-2-2B's layer, scaled: GeGLU, 8 heads, 4 KV heads; the 2B one is the real size
    small, big = overhead.SHAPES["gemma2"].config, overhead.SHAPES["gemma2-2b-lora"].config
    assert (small["hidden_size"], small["intermediate_size"], small["num_hidden_layers"]) == (512, 2048, 4)
    assert (big["hidden_size"], big["intermediate_size"], big["num_hidden_layers"], big["vocab_size"]) == (2304, 9216, 26, 256000)


def test_readme_cost_table_is_the_one_made_from_the_results():
    """docs/cost.md (linked from the README's cost summary) holds the table, in its CPU part, before the GPU section."""
    cost_table = _load("cost_table")
    sources = [ROOT / "study" / "results" / "cost" / "overhead.json"]
    expected = cost_table.table(cost_table.merge(sources))
    page = (ROOT / "docs" / "cost.md").read_text()
    assert page.startswith("# Cost\n")
    section = page.split("# Cost\n", 1)[1].split("\n## ", 1)[0]
    table_lines = [line for line in expected.splitlines() if line.startswith("|")]
    assert "\n".join(table_lines) in section, "regenerate with: python study/benchmarks/cost_table.py study/results/cost/overhead.json"


def test_gpu_cost_script_runs_on_cpu_with_a_tiny_shape(tmp_path):
    """study/benchmarks/gpu_cost.sh, with its device and shapes overridden: bf16 weights on the CPU, JSON and table."""
    env = {**os.environ, "OUT": str(tmp_path), "DREG_COST_DEVICE": "cpu", "DREG_COST_SHAPES": "gemma2-tiny-lora:2x8",
           "DREG_COST_STEPS": "1", "DREG_COST_WARMUP": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "study" / "benchmarks" / "gpu_cost.sh"), "--no-rss"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    data = json.loads((tmp_path / "gpu_cost.json").read_text())
    assert data["meta"]["dtype"] == "bfloat16" and data["meta"]["device"] == "cpu"
    (result,) = data["results"]
    families = ["dreg@triton", "dreg@compiled", "dreg@eager"]  # every kernel family (triton: interpreted here)
    _check_result(result, "gemma2-tiny-lora", ["none", *families], 1)
    assert result["dtype"] == "bfloat16"
    table = (tmp_path / "gpu_cost.md").read_text()
    assert all(f"| | **{name}** |" in table for name in families) and "Measured on cpu, bfloat16" in table
    assert (tmp_path / "gpu_cost.log").exists()


@pytest.mark.slow
def test_overhead_benchmark_prints_a_row_per_regularizer(tmp_path):
    output = tmp_path / "overhead.json"
    cmd = [sys.executable, str(ROOT / "study" / "benchmarks" / "overhead.py"), "--shapes", "tiny:4x16,gemma2-tiny", "--steps", "2",
           "--warmup", "1", "--threads", "1", "--output", str(output)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("| shape (batch x seq, rounds) |") for line in lines), done.stdout
    rows = [line for line in lines if line.startswith("| ") and " | " in line and not line.startswith("| shape") and "---" not in line]
    names = [re.sub(r"\*|\(.*\)", "", row.split("|")[2]).strip() for row in rows]
    assert names == REGULARIZERS + ["none", "dreg"]  # by default every regularizer on BERT, none and dreg on LLMs
    assert all(row.count("x |") + row.count("x** |") == 5 for row in rows)  # time, CPU, saved, peak, peak RSS
    assert all(re.search(r"\| (\*\*)?\d\.\d\d-\d\.\d\d(\*\*)? \|", row) for row in rows)  # time's interval

    results = json.loads(output.read_text())
    tiny, gemma = results["results"]
    rows = _check_result(tiny, "tiny", REGULARIZERS, 2)
    assert (tiny["batch"], tiny["seq"], tiny["dreg_sites"]) == (4, 16, 2)
    assert rows["none"]["saved_ratio"] == 1.0
    assert rows["igpen"]["saved_ratio"] > 1.0 and rows["jacobian"]["saved_ratio"] > 1.0  # double backward's graph
    assert rows["dreg"]["reg_lambda"] == pytest.approx(10**-2.5)
    assert set(tiny["rss_kb"]) == {"plain", *REGULARIZERS}
    assert all(v["rss_step_kb"] > 0 for v in tiny["rss_kb"].values())
    _check_result(gemma, "gemma2-tiny", ["none", "dreg"], 2)
    assert results["meta"]["threads"] == 1


@pytest.mark.slow  # about a minute on 2 cores (a graph per model); the GPU's compile pass of gpu_cost.sh runs this
def test_overhead_under_torch_compile_runs_each_models_own_graph_with_dregs_hooks(tmp_path):
    """--torch_compile: every contender's forward compiled (aot_eager here: the same tracing, no code generation),
    DREG's hooks inside each DREG model's graph (a graph of the plain model, reused, would run none of them and
    the penalty would have no site: an error), and the other regularizers refused before anything runs; and
    gpu_cost.sh's compile pass, on the CPU."""
    env = {**os.environ, "OUT": str(tmp_path), "DREG_COST_DEVICE": "cpu", "DREG_COST_SHAPES": "tiny:2x8", "DREG_COST_STEPS": "1",
           "DREG_COST_WARMUP": "1", "DREG_COST_COMPILE_BACKEND": "aot_eager", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "study" / "benchmarks" / "gpu_cost.sh"), "compile", "--no-rss"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    data = json.loads((tmp_path / "gpu_cost_compile.json").read_text())
    assert data["meta"]["torch_compile"] == "aot_eager" and set(data["results"][0]["regularizers"]) == {"none", "dreg"}
    assert "torch_compile=True, backend aot_eager" in (tmp_path / "gpu_cost_compile.md").read_text()
    overhead = _load("overhead")
    output = tmp_path / "compiled.json"
    (result,) = overhead.main(["--shapes", "tiny:2x8", "--regularizers", "none,dreg@eager,dreg@compiled", "--steps", "2",
                               "--warmup", "1", "--threads", "1", "--no-rss", "--torch_compile", "aot_eager", "--output", str(output)])
    assert result["compiled_graphs_warmup"] >= 4  # plain, none and both DREG models: a graph each
    assert set(result["regularizers"]) == {"none", "dreg@eager", "dreg@compiled"}
    assert json.loads(output.read_text())["meta"]["torch_compile"] == "aot_eager"
    cmd = [sys.executable, str(ROOT / "study" / "benchmarks" / "overhead.py"), "--shapes", "tiny", "--regularizers", "igpen,dreg",
           "--torch_compile"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "drop ['igpen']" in done.stderr


def test_overhead_benchmark_rejects_an_unknown_regularizer(tmp_path):
    cmd = [sys.executable, str(ROOT / "study" / "benchmarks" / "overhead.py"), "--shapes", "tiny", "--regularizers", "dropout"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "unknown regularizer(s) ['dropout']" in done.stderr


def test_profile_step_counts_what_dreg_adds_to_the_plain_step(tmp_path):
    """study/benchmarks/profile_step.py on the CPU: DREG's variants add operators to the plain step (its own
    fused kernels: dynamo-compiled regions; eager: more elementwise operators than fused), and the JSON
    and text reports are written."""
    profile_step = _load("profile_step")
    (result,) = profile_step.main(["--shapes", "tiny:2x8", "--rounds", "1", "--warmup", "1", "--out", str(tmp_path)])
    ops = result["operators_per_step"]
    assert ops["dreg-eager"] > ops["dreg-fused"] > ops["plain"]
    added = dict(result["added_over_plain"]["dreg-fused"])
    assert added.get("TorchDynamo Cache Lookup", 0) > 0  # the fused path really runs compiled kernels
    assert "TorchDynamo Cache Lookup" not in dict(result["added_over_plain"]["dreg-eager"])
    assert result["sync_stacks"] == {}  # no CUDA here
    # per site: the triton family calls no compiled region and launches its kernels; the compiled family is regions
    assert result["compiled_calls_per_site"]["dreg-triton"] == 0 and result["triton_launches_per_site"]["dreg-triton"] >= 2
    assert result["compiled_calls_per_site"]["dreg-fused"] >= 1 and result["triton_launches_per_site"]["dreg-fused"] == 0
    assert result["compiled_calls_per_site"]["dreg-eager"] == 0
    # host time per site in plain operators: measured for the timed families, not for the interpreted Triton
    equivalents = result["op_equivalents_per_site"]
    assert equivalents["dreg-triton"] is None
    assert all(isinstance(equivalents[n], float) for n in ("dreg-eager", "dreg-fused", "dreg-parts"))
    assert json.loads((tmp_path / "profile.json").read_text()) == json.loads(json.dumps([result]))
    assert "dreg-fused" in (tmp_path / "profile.txt").read_text()


def test_glue_ablation_times_each_part_removed_and_puts_everything_back(tmp_path, monkeypatch):
    """study/benchmarks/glue_ablation.py on a tiny Gemma-2 with LoRA: every variant timed, the report written, the
    patched functions restored afterwards; without the interpreter it refuses with the variable to set."""
    pytest.importorskip("peft")
    from hf_dreg.modeling import hooks

    ablation = _load("glue_ablation")
    before = (hooks.penalty_weight_rows, hooks.DREGHandle._site_stats, hooks.DREGHandle._product_mlp)
    result = ablation.main(["--shape", "gemma2-tiny-lora:2x8:1", "--rounds", "2", "--warmup", "1", "--out", str(tmp_path)])
    assert (hooks.penalty_weight_rows, hooks.DREGHandle._site_stats, hooks.DREGHandle._product_mlp) == before
    assert list(result["variants"]) == list(ablation.VARIANTS) and result["sites"] == 1
    assert all(isinstance(row["ratio"], float) and row["ratio"] > 0 for row in result["variants"].values())
    assert json.loads((tmp_path / "ablation.json").read_text()) == json.loads(json.dumps(result))
    assert "stats-constant" in (tmp_path / "ablation.txt").read_text()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SystemExit) as refused:
        ablation.main(["--out", str(tmp_path / "no")])
    assert refused.value.code == 2
