"""Models patched by Liger Kernel (fused GEGLU/SwiGLU MLPs, no activation module called) get DREG.

Liger's own kernels use libdevice functions that triton's CPU interpreter cannot run, so here the patched
model is only run with DREG attached (hf_dreg's kernels replace Liger's MLP function) and compared with the
same model unpatched: the same sites, penalty, logits and gradients; detach() puts Liger's forward back.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

import hf_dreg
from hf_dreg.modeling.sites import FUSED_MLP, GATED, NoSitesError

liger = pytest.importorskip("liger_kernel.transformers", reason="liger-kernel is in the test extra: pip install -e '.[test]'")
FAMILIES = ["eager", pytest.param("triton", marks=pytest.mark.skipif(not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1", reason="no GPU, no TRITON_INTERPRET"))]


def _gemma2():
    config = tf.Gemma2Config(vocab_size=99, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=8, pad_token_id=0)  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return tf.Gemma2ForCausalLM(config).eval()


def _llama():
    config = tf.LlamaConfig(vocab_size=99, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=2, pad_token_id=0)  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(config).eval()


@pytest.fixture
def patched(monkeypatch):
    """(unpatched model, the same weights patched by apply_liger_kernel_to_<family>(model=...), activations)."""
    from transformers.models.gemma2 import modeling_gemma2
    from transformers.models.llama import modeling_llama

    # apply_liger_kernel_to_* also replaces the MLP classes of transformers for models built later: undone after the test
    monkeypatch.setattr(modeling_gemma2, "Gemma2MLP", modeling_gemma2.Gemma2MLP)
    monkeypatch.setattr(modeling_llama, "LlamaMLP", modeling_llama.LlamaMLP)
    off = dict(rope=False, rms_norm=False, cross_entropy=False, fused_linear_cross_entropy=False)

    def build(family):
        base = _gemma2() if family == "gemma2" else _llama()
        fused = copy.deepcopy(base)
        if family == "gemma2":
            liger.apply_liger_kernel_to_gemma2(geglu=True, model=fused, **off)
        else:
            liger.apply_liger_kernel_to_llama(swiglu=True, model=fused, **off)
        return base, fused, "gelu" if family == "gemma2" else "silu"

    return build


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 99, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _run(model, activations, kernels):
    model.zero_grad(set_to_none=True)
    with hf_dreg.attach(model, activations=activations, kernels=kernels) as handle:
        out = model(**_inputs())
        penalty = handle.penalty()
        per_site = handle.per_site()
        (out.logits.pow(2).mean() + penalty).backward()
    return out.logits.detach(), penalty.detach(), per_site, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kernels", FAMILIES)
@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_a_liger_patched_model_gets_the_penalty_of_the_unpatched_one(patched, family, kernels):
    base, fused, activations = patched(family)
    mlp = fused.model.layers[0].mlp
    liger_forward = mlp.forward.__func__
    assert liger_forward.__module__.startswith("liger_kernel")  # the patch really replaced the MLP's forward

    base_sites = hf_dreg.find_sites(base, activations=activations)
    fused_sites = hf_dreg.find_sites(fused, activations=activations)
    assert {s.kind for s in base_sites} == {GATED} and {s.kind for s in fused_sites} == {FUSED_MLP}
    assert [s.name for s in fused_sites] == [s.name.rpartition(".")[0] for s in base_sites]  # the MLP, not its unused act_fn
    assert [(s.gate, s.up, s.output, s.width, s.mask_key) for s in fused_sites] == [(s.gate, s.up, s.output, s.width, s.mask_key) for s in base_sites]

    logits0, p0, sites0, g0 = _run(base, activations, "eager")
    logits1, p1, sites1, g1 = _run(fused, activations, kernels)
    assert p0 > 0
    assert torch.allclose(logits1, logits0, rtol=1e-5, atol=1e-6)
    assert torch.allclose(p1, p0, rtol=1e-5, atol=0), (p1.item(), p0.item())
    assert list(sites1.values()) == pytest.approx(list(sites0.values()), rel=1e-5)
    assert g0.keys() == g1.keys()
    scale = max(g.abs().max().item() for g in g0.values())
    for name in g0:
        assert torch.allclose(g1[name], g0[name], rtol=1e-5, atol=1e-6 * scale), (name, (g1[name] - g0[name]).abs().max())
    assert mlp.forward.__func__ is liger_forward  # detach() put Liger's forward back
    assert "forward" not in base.model.layers[0].mlp.__dict__


def test_mlps_of_liger_classes_built_in_place_are_sites_too():
    """A model built after apply_liger_kernel_to_* (its MLPs are LigerGEGLUMLP instances, no act_fn at all)."""
    base = _gemma2()
    model = copy.deepcopy(base)
    for layer in model.model.layers:
        mlp = liger.LigerGEGLUMLP(model.config)
        mlp.load_state_dict(layer.mlp.state_dict(), strict=False)
        layer.mlp = mlp
    sites = hf_dreg.find_sites(model)
    assert [s.kind for s in sites] == [FUSED_MLP, FUSED_MLP]
    _, p0, _, _ = _run(base, "gelu", "eager")
    _, p1, _, _ = _run(model, "gelu", "eager")
    assert torch.allclose(p1, p0, rtol=1e-6, atol=0)


def test_lora_on_a_liger_patched_model_equals_lora_on_the_unpatched_one(patched):
    peft = pytest.importorskip("peft")
    base, fused, _ = patched("gemma2")
    config = peft.LoraConfig(target_modules=["gate_proj", "up_proj"], r=2, lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(1)
    base = peft.get_peft_model(base, config)
    torch.manual_seed(1)
    fused = peft.get_peft_model(fused, copy.deepcopy(config))
    _, p0, _, g0 = _run(base, "gelu", "eager")
    _, p1, _, g1 = _run(fused, "gelu", "eager")
    assert torch.allclose(p1, p0, rtol=1e-6, atol=0)
    assert g0.keys() == g1.keys() and any("lora_" in n for n in g0)
    for name in g0:
        assert torch.allclose(g1[name], g0[name], rtol=1e-5, atol=1e-8), name


def test_an_mlp_that_never_calls_its_activation_module_gets_an_error_that_says_so():
    """An unknown fused MLP (its forward computes the activation itself): no site, and the error says why and what to do."""
    model = _gemma2()

    def fused_forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))

    for layer in model.model.layers:
        layer.mlp.forward = types.MethodType(fused_forward, layer.mlp)
    with pytest.raises(NoSitesError) as caught:
        hf_dreg.find_sites(model)
    message = str(caught.value)
    assert "never run" in message and "model.layers.0.mlp.act_fn" in message
    assert "use_liger_kernel=False" in message and "LigerGEGLUMLP" in message


def test_a_trainer_with_use_liger_kernel_trains_with_the_penalty_of_the_unpatched_model(patched, tmp_path):
    """use_liger_kernel=True: the base trainer would patch the model after DREG attached; the DREG trainer patches
    it first, so Liger's MLPs are the sites, and the run logs what the same run without Liger logs. Texts of unequal
    length, tokenized, batched by the language-modelling collator a user passes."""
    from trainer_helpers import lm_data, make_args, sgd, tokenizer

    from hf_dreg import DREGTrainer

    tok = tokenizer()
    data = lm_data(tok)
    collate = tf.DataCollatorForLanguageModeling(tok, mlm=False)
    config = tf.Gemma2Config(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=8, pad_token_id=tok.pad_token_id)  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    base = tf.Gemma2ForCausalLM(config)  # (the `patched` fixture undoes Liger's class-level patches after the test)
    liger_config = {"rope": False, "rms_norm": False, "cross_entropy": False, "fused_linear_cross_entropy": False, "geglu": True}
    logs = {}
    for name, extra in (("plain", {}), ("liger", {"use_liger_kernel": True, "liger_kernel_config": liger_config})):
        model = copy.deepcopy(base).train()
        args = make_args(tmp_path / name, **sgd(per_device_train_batch_size=4, max_steps=2, learning_rate=0.1), dreg_lambda=1.0, **extra)
        trainer = DREGTrainer(model=model, args=args, train_dataset=data, data_collator=collate)
        trainer.train()
        logs[name] = [e[k] for e in trainer.state.log_history if "dreg" in e and "loss" in e for k in ("loss", "dreg")]
        if name == "liger":
            assert {s.kind for s in trainer.dreg_sites} == {FUSED_MLP}
            assert trainer.args.use_liger_kernel is True  # the flag is the user's again after train()
            assert model.model.layers[0].mlp.forward.__func__.__module__.startswith("liger_kernel")
    assert len(logs["plain"]) == 4 and logs["plain"][1] > 0
    assert logs["liger"] == pytest.approx(logs["plain"], rel=1e-4)


def test_sites_that_stop_running_after_dreg_attached_are_reported(tmp_path, caplog):
    """A patch applied after DREG attached (here: layer 0's MLP made to compute its activation itself at the start
    of training) leaves that site without a value: said once, naming it, not silently dropped."""
    from datasets import Dataset
    from trainer_helpers import make_args, sgd
    from transformers import TrainerCallback

    from hf_dreg import DREGTrainer

    class PatchAtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            mlp = model.model.layers[0].mlp
            mlp.forward = types.MethodType(lambda self, x: self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x)), mlp)

    data = Dataset.from_list([{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}] * 4)
    args = make_args(tmp_path, **sgd(per_device_train_batch_size=4, max_steps=1), dreg_lambda=1.0)
    trainer = DREGTrainer(model=_gemma2().train(), args=args, train_dataset=data, callbacks=[PatchAtStart()])
    with caplog.at_level("WARNING"):
        trainer.train()
    said = [r.getMessage() for r in caplog.records if "computed nothing" in r.getMessage()]
    assert len(said) == 1 and "model.layers.0.mlp.act_fn" in said[0] and "1 of 2" in said[0]


def test_a_training_forward_in_which_no_site_ran_is_an_error(tmp_path):
    """Every MLP patched after DREG attached (their activations computed inside the MLP): no site has a value, so
    the penalty would be an empty mean; the step fails saying why and what to do, instead of torch's own error."""
    from datasets import Dataset
    from trainer_helpers import make_args, sgd
    from transformers import TrainerCallback

    from hf_dreg import DREGTrainer

    class PatchAtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            for layer in model.model.layers:
                layer.mlp.forward = types.MethodType(
                    lambda self, x: self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x)), layer.mlp
                )

    data = Dataset.from_list([{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}] * 4)
    args = make_args(tmp_path, **sgd(per_device_train_batch_size=4, max_steps=1), dreg_lambda=1.0)
    trainer = DREGTrainer(model=_gemma2().train(), args=args, train_dataset=data, callbacks=[PatchAtStart()])
    with pytest.raises(RuntimeError, match="No DREG site computed a value.*before building the trainer"):
        trainer.train()
