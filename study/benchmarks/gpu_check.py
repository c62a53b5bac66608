"""The checks that need a GPU machine: bf16, FSDP and DDP exactness of DREG on the Trainer's own collator.

    python study/benchmarks/gpu_check.py --out DIR                 # every check this machine can run
    python study/benchmarks/gpu_check.py --out DIR --checks bf16   # one of: bf16, fsdp, ddp

Each check trains a small BERT classifier (random weights, no download) on texts of unequal length
padded by the Trainer's DataCollatorWithPadding, one or two SGD steps, and compares the result with
an independent run:

- ``bf16``: bf16 autocast, 2 x 4 accumulation against one batch of 8 (both bf16), and the bf16 update
  against the float32 update (the penalty is computed in float32 whatever the autocast dtype);
- ``fsdp``: FSDP2 (fully sharded, wrapped per BertLayer, its default ``reshard_after_forward: true``)
  against the same training without FSDP, weights after two steps, float32; launched with torchrun (one
  process per GPU; several processes with default resharding are tests/modeling/test_sharded.py's, on CPU,
  outside the Trainer, which runs FSDP only on accelerators);
- ``ddp``: 2 processes x 4 against 1 process x 8 (needs two GPUs; with one GPU it says so and skips);
- ``kernels``: the triton kernel family (compiled by triton for this GPU, not interpreted) against the eager
  one: the Trainer's float32 update of the BERT classifier, and the penalty and gradients of a tiny Gemma-2
  with LoRA (gated sites, row statistics from the factors) in float32 and in bf16 (on a CPU only under
  ``TRITON_INTERPRET=1``).

Writes ``gpu_check.json`` (one entry per check: the measured relative differences, the tolerance,
pass/fail, or why it was skipped) and prints it. On a CPU machine the bf16 check runs on the CPU
(autocast bf16), so the script itself is tested without a GPU (tests/study/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile

import torch

WORDS = [f"w{i}" for i in range(200)]
WORD_COUNTS = [38, 21, 30, 17, 1, 6, 3, 9, 25, 2, 14, 8, 1, 33, 4, 7]
# bf16 tolerances: measured on CPU autocast 1.6e-3 (accumulation) and 3.1e-3 (against float32)
TOLERANCE = {"bf16_accumulation": 1e-2, "bf16_vs_fp32": 2e-2, "fsdp": 1e-5, "ddp": 1e-5,
             "triton_trainer_fp32": 1e-5, "triton_lora_fp32": 1e-5, "triton_lora_bf16": 1e-2}


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")


def dataset(tok, n: int = 8):
    from datasets import Dataset

    rng = random.Random(0)
    counts = WORD_COUNTS[:n]
    data = Dataset.from_dict({"text": [" ".join(rng.choice(WORDS) for _ in range(c)) for c in counts], "labels": [rng.randrange(3) for _ in counts]})
    return data.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])


def model(vocab_size: int, hidden: int = 64):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=4 * hidden, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    return tf.BertForSequenceClassification(config)


def train(out_dir, batch, accumulation, steps=1, n=8, **overrides):
    """DREGTrainer, plain SGD: returns (trainer, weights after training, initial weights)."""
    from hf_dreg import DREGTrainer, DREGTrainingArguments

    tok = tokenizer()
    net = model(tok.vocab_size)
    initial = {k: v.detach().clone().cpu() for k, v in net.state_dict().items()}
    kwargs = dict(
        output_dir=out_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=steps,
        optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, dreg_lambda=100.0,
        dreg_kernels="eager", train_sampling_strategy="sequential", report_to=[], save_strategy="no", disable_tqdm=True,
        logging_steps=1, seed=0,
    )  # fmt: skip
    kwargs.update(overrides)
    trainer = DREGTrainer(model=net, args=DREGTrainingArguments(**kwargs), train_dataset=dataset(tok, n), processing_class=tok)
    trainer.train()
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    state = unwrapped.state_dict()
    if any(hasattr(v, "full_tensor") for v in state.values()):  # FSDP2 DTensors
        state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}
    return trainer, {k: v.detach().float().cpu() for k, v in state.items()}, initial


def relative(a: dict, b: dict, initial: dict) -> float:
    """||(a - init) - (b - init)|| / ||b - init|| over the trained parameters (the updates)."""
    num = den = 0.0
    for k in b:
        if k not in initial or not torch.is_floating_point(b[k]):
            continue
        ua, ub = a[k].double() - initial[k].double(), b[k].double() - initial[k].double()
        num += float((ua - ub).norm()) ** 2
        den += float(ub.norm()) ** 2
    return math.sqrt(num / den)


def check_bf16(device: str, tmp: str) -> dict:
    use_cpu = device == "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    _, full, init = train(f"{tmp}/bf16-8x1", 8, 1, bf16=True, use_cpu=use_cpu)
    _, accumulated, _ = train(f"{tmp}/bf16-4x2", 4, 2, bf16=True, use_cpu=use_cpu)
    _, fp32, _ = train(f"{tmp}/fp32-8x1", 8, 1, use_cpu=use_cpu)
    _, fp32_accumulated, _ = train(f"{tmp}/fp32-4x2", 4, 2, use_cpu=use_cpu)
    results = {
        "bf16_accumulation": relative(accumulated, full, init),
        "bf16_vs_fp32": relative(full, fp32, init),
        "fp32_accumulation": relative(fp32_accumulated, fp32, init),
    }
    tolerance = dict(TOLERANCE, fp32_accumulation=1e-5)
    return {"device": device, "relative_difference": results, "tolerance": {k: tolerance[k] for k in results},
            "passed": all(results[k] <= tolerance[k] for k in results)}  # fmt: skip


def _gemma2_lora(device: str, dtype: torch.dtype):
    import peft
    import transformers as tf

    config = tf.Gemma2Config(vocab_size=99, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, pad_token_id=0)  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    net = tf.Gemma2ForCausalLM(config).eval()
    lora = peft.LoraConfig(target_modules=["gate_proj", "up_proj", "down_proj"], r=4, lora_dropout=0.0, init_lora_weights=False)
    return peft.get_peft_model(net, lora).to(device=device, dtype=dtype)


def _penalty_grads(net, kernels: str, device: str):
    import hf_dreg

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 99, (4, 33), generator=g).to(device)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    mask[3, 5:] = 0
    net.zero_grad(set_to_none=True)
    with hf_dreg.attach(net, kernels=kernels) as handle:
        out = net(input_ids=ids, attention_mask=mask)
        penalty = handle.penalty()
        (out.logits.float().pow(2).mean() + penalty).backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in net.named_parameters() if p.grad is not None}
    return float(penalty), grads


def check_kernels(device: str, tmp: str) -> dict:
    if device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return {"skipped": "no CUDA device (the triton family runs on a CPU only under TRITON_INTERPRET=1)"}
    use_cpu = device == "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    _, triton, init = train(f"{tmp}/triton", 8, 1, dreg_kernels="triton", use_cpu=use_cpu)
    _, eager, _ = train(f"{tmp}/eager", 8, 1, use_cpu=use_cpu)
    results = {"triton_trainer_fp32": relative(triton, eager, init)}
    penalties = {}
    for dtype, key in ((torch.float32, "triton_lora_fp32"), (torch.bfloat16, "triton_lora_bf16")):
        net = _gemma2_lora(device, dtype)
        p_eager, g_eager = _penalty_grads(net, "eager", device)
        p_triton, g_triton = _penalty_grads(net, "triton", device)
        zero = {k: torch.zeros_like(v) for k, v in g_eager.items()}
        results[key] = max(abs(p_triton - p_eager) / abs(p_eager), relative(g_triton, g_eager, zero))
        penalties[key] = {"eager": p_eager, "triton": p_triton}
    tolerance = {k: TOLERANCE[k] for k in results}
    return {"device": device, "relative_difference": results, "tolerance": tolerance, "penalties": penalties,
            "passed": all(results[k] <= tolerance[k] for k in results)}  # fmt: skip


def _torchrun(nproc: int, role: str, out: str, extra_env=None) -> None:
    env = dict(os.environ, **(extra_env or {}))
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "29611",
               os.path.abspath(__file__), "--worker", role, "--out", out]  # fmt: skip
    subprocess.run(command, env=env, check=True, timeout=900)


def worker(role: str, out: str) -> None:
    """One process of a distributed run (started by torchrun): trains and, on rank 0, saves the weights."""
    if role == "fsdp":
        overrides = dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"], "reshard_after_forward": True})
        batch = 8
    else:  # ddp
        overrides, batch = {"ddp_backend": "nccl"}, 4
    trainer, weights, initial = train(os.path.join(out, role), batch, 1, steps=2, n=16, **overrides)
    if trainer.args.process_index == 0:
        torch.save({"weights": weights, "initial": initial, "log_history": trainer.state.log_history}, os.path.join(out, f"{role}.pt"))


def check_distributed(role: str, tmp: str) -> dict:
    gpus = torch.cuda.device_count()
    nproc = 1 if role == "fsdp" else 2
    if gpus < nproc:
        return {"skipped": f"needs {nproc} GPU(s), this machine has {gpus}"}
    torch.backends.cuda.matmul.allow_tf32 = False
    _torchrun(nproc, role, tmp, {"NVIDIA_TF32_OVERRIDE": "0"})
    run = torch.load(os.path.join(tmp, f"{role}.pt"))
    _, single, init = train(f"{tmp}/single", 8, 1, steps=2, n=16)
    difference = relative(run["weights"], single, init)
    dreg_logged = [e["dreg"] for e in run["log_history"] if "dreg" in e]
    return {"processes": nproc, "relative_difference": difference, "tolerance": TOLERANCE[role], "dreg_logged": dreg_logged,
            "passed": difference <= TOLERANCE[role] and len(dreg_logged) == 2}  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Folder for gpu_check.json.")
    parser.add_argument("--checks", default="bf16,fsdp,ddp,kernels", help="Comma-separated: bf16, fsdp, ddp, kernels.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.out)
        return {}
    os.makedirs(args.out, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__}
    for name in [c.strip() for c in args.checks.split(",") if c.strip()]:
        if name not in ("bf16", "fsdp", "ddp", "kernels"):
            raise SystemExit(f"Unknown check {name!r}: choose from bf16, fsdp, ddp, kernels.")
        with tempfile.TemporaryDirectory(prefix=f"gpu_check_{name}_") as tmp:
            try:
                if name == "bf16":
                    report[name] = check_bf16(device, tmp)
                elif name == "kernels":
                    report[name] = check_kernels(device, tmp)
                elif device != "cuda":
                    report[name] = {"skipped": "no CUDA device (the Trainer runs FSDP only in distributed GPU training)"}
                else:
                    report[name] = check_distributed(name, tmp)
            except Exception as error:  # record it and go on with the next check
                report[name] = {"error": f"{type(error).__name__}: {error}", "passed": False}
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
