"""`archifactory export format=deepseek_v3`: a trained all-mla run as a native transformers DeepSeek-V3
folder, loaded by `AutoModelForCausalLM` with no ArchiFactory class, computes our logits and our greedy
continuation; what DeepSeek-V3 cannot express is one error line and no folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from archifactory.cli.main import main
from archifactory.core.errors import ArchiFactoryError
from archifactory.generate.export import export_run
from archifactory.generate.sampling import generate
from archifactory.hf import deepseek
from archifactory.hf.deepseek import check_exportable
from archifactory.runs import layout
from archifactory.runs.load import load_run
from tests.helpers import compose_config
from tests.run_helpers import train_tiny_run, write_small_corpus

# q_lora_rank 0 (a direct q_proj) under positional=rope, the default latent eps and an untied head; then a
# query latent under positional=none (MLA's own rotary, another theta), a large latent eps (where moving it
# into the down-projections shows) and tied embeddings
RUNS = {
    "mla_q0": ["mixin=mla", "mixin.kv_lora_rank=24", "positional.theta=500"],
    "mla_q16": [
        "mixin=mla", "mixin.q_lora_rank=16", "mixin.kv_lora_rank=24", "mixin.qk_rope_head_dim=8",
        "mixin.norm_eps=0.01", "mixin.rope_theta=300", "positional=none", "model.tie_embeddings=true",
        "model.norm_eps=1e-6",
    ],
    # DeepSeek's MoE: a dense first layer, a trained selection bias, no shared expert; then every layer MoE
    # with a shared expert and unnormalised top-k weights
    "mla_moe_dense_first": [
        "mixin=mla", "ffn=moe", "ffn.score_func=sigmoid", "ffn.num_experts=4", "ffn.moe_every=2",
        "ffn.bias_update_rate=0.05",
    ],
    "mla_moe_shared": [
        "mixin=mla", "mixin.q_lora_rank=16", "ffn=moe", "ffn.score_func=sigmoid", "ffn.num_experts=4",
        "ffn.num_shared_experts=1", "ffn.renormalize=false",
    ],
    "gqa": ["mixin=gqa"],
}  # fmt: skip
# a few steps: enough to move every weight (norms and the MoE selection bias included) off its init
SHORT = [
    "trainer.max_steps=4",
    "trainer.warmup_steps=1",
    "trainer.eval_every=4",
    "trainer.checkpoint_every=4",
]
MLA_RUNS = [name for name in RUNS if name.startswith("mla")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("work")
    corpus = write_small_corpus(root / "corpus")
    for name, overrides in RUNS.items():
        train_tiny_run(root / "outputs" / name, corpus, root / "cache", *overrides, *SHORT)
    return {name: root / "outputs" / name for name in RUNS}


@pytest.mark.parametrize("name", MLA_RUNS)
def test_deepseek_v3_folder_computes_our_logits(
    runs: dict[str, Path], tmp_path: Path, capsys, name: str
) -> None:
    run, out = runs[name], tmp_path / "ds"
    assert main(["export", f"run={run}", f"out={out}", "format=deepseek_v3"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    ours = load_run(run)
    theirs = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(theirs) is transformers.DeepseekV3ForCausalLM  # transformers' own class, not our wrapper

    config, mla = theirs.config, ours.model.blocks[0].mixin
    dense = [i for i, block in enumerate(ours.model.blocks) if not getattr(block.ffn, "is_moe", False)]
    assert dense == list(range(len(dense)))  # DeepSeek-V3's dense layers come first
    assert (config.model_type, config.rope_interleave, config.first_k_dense_replace) == (
        "deepseek_v3", True, len(dense),
    )  # fmt: skip
    last = ours.model.blocks[-1].ffn  # an MoE layer if the run has any
    assert config.n_routed_experts == (last.num_experts if getattr(last, "is_moe", False) else 0)
    assert config.q_lora_rank == (mla.q_lora_rank or None)
    assert (config.kv_lora_rank, config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim) == (
        mla.kv_lora_rank, mla.nope_dim, mla.rope_dim, mla.v_dim,
    )  # fmt: skip
    assert config.rms_norm_eps == ours.config.model.norm_eps
    assert config.tie_word_embeddings == ours.config.model.tie_embeddings
    rope = ours.config.positional.theta if ours.config.positional.name == "rope" else mla.own_rope.theta
    assert config.rope_parameters["rope_theta"] == rope  # positional.theta, else mixin.rope_theta
    assert "auto_map" not in json.loads((out / "config.json").read_text())

    text = "the king sat on the mat. the red bird sang to her"
    ids = torch.tensor([ours.tokenizer.encode(text)])
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        expected = ours.model(ids).logits
        torch.testing.assert_close(theirs(ids).logits, expected, atol=1e-5, rtol=1e-5)
        greedy = theirs.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)[0, ids.shape[1] :]
    assert greedy.tolist() == generate(ours.model, ids, max_new_tokens=6)[0].tokens
    if ours.config.ffn.name == "moe":
        return  # transformers' expert kernel (torch._grouped_mm) takes no fp64
    with torch.no_grad():  # fp64 on both sides, each still norming and building rotary tables in fp32
        torch.testing.assert_close(
            theirs.double()(ids).logits, ours.model.double()(ids).logits, atol=2e-6, rtol=1e-6
        )


def test_the_default_folder_sits_beside_model(runs: dict[str, Path]) -> None:
    run = runs["mla_q16"]
    ours_before = (run / layout.MODEL / "config.json").read_bytes()
    out = export_run(run, export_format="deepseek_v3")
    assert out == run / layout.MODEL_DEEPSEEK_V3
    assert json.loads((out / "config.json").read_text())["architectures"] == ["DeepseekV3ForCausalLM"]
    assert (run / layout.MODEL / "config.json").read_bytes() == ours_before  # our own folder untouched


def test_the_moe_runs_route_as_deepseek_does(runs: dict[str, Path]) -> None:
    """What the MoE comparisons above rest on: a layer of each kind, a selection bias that is not zero."""
    blocks = load_run(runs["mla_moe_dense_first"]).model.blocks
    assert [block.ffn.is_moe for block in blocks] == [False, True]
    assert blocks[1].ffn.router.expert_bias.abs().sum() > 0


def test_other_architectures_are_one_line(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "ds"
    assert main(["export", f"run={runs['gqa']}", f"out={out}", "format=deepseek_v3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "mixin=gqa" in err[0] and "format=hf" in err[0]
    assert not out.exists()


MLA = ["mixin=mla"]
MOE = ["mixin=mla", "ffn=moe", "ffn.score_func=sigmoid"]


@pytest.mark.parametrize(
    "base,changes,named",
    [
        (MOE, {"ffn.score_func": "softmax"}, "ffn.score_func=softmax"),
        (MOE, {"ffn.capacity_factor": 1.0}, "ffn.capacity_factor=1.0"),
        (MOE, {"ffn.moe_every": 2}, "ffn.moe_every=2"),  # 4 layers: MoE at 1 and 3
        (MLA, {"ffn.name": "geglu"}, "ffn=geglu"),
        (MLA, {"ffn.bias": True}, "ffn.bias=true"),
        (MLA, {"positional.name": "alibi"}, "positional=alibi"),
        (MLA, {"residual.name": "hyper"}, "residual=hyper"),
        (MLA, {"model.norm": "layernorm"}, "model.norm=layernorm"),
        (MLA, {"model.value_residual": True}, "model.value_residual=true"),
        (MLA, {"model.weights": "hyper"}, "model.weights=hyper"),
        (MLA, {"model.attention_every": 2}, "hybrid"),
    ],
)
def test_what_deepseek_v3_cannot_express_is_named(base: list[str], changes: dict, named: str) -> None:
    cfg = compose_config(base)  # composed once per base; the check reads names and options only
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value)
    check_exportable(compose_config(base))  # the base itself maps
    with pytest.raises(ArchiFactoryError, match="format=hf") as refused:
        check_exportable(cfg)
    assert named in str(refused.value) and "\n" not in str(refused.value)


def test_a_failed_export_leaves_no_folder(runs: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    def broken(folder: Path, tokenizer) -> None:
        (folder / "tokenizer.json").write_text("{")
        raise OSError("disk full")

    monkeypatch.setattr(deepseek, "write_tokenizer_files", broken)
    with pytest.raises(OSError, match="disk full"):
        export_run(runs["mla_q0"], tmp_path / "ds", export_format="deepseek_v3")
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_format_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["export", "format=bogus"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "format='bogus' is not an export format" in err[0]
        and "format=deepseek_v3" in err[0]
    )
