"""Every parallel layout reproduces the single-process run (tiny model, float64, gloo on CPU).

Two torchrun launches share the work (2 and 4 processes); each runs several layouts in turn
(tests/parallel/dist_worker.py). The reference is computed here, in the test process, on the whole
global batch. Compared: the loss of each of 3 AdamW steps, every gradient after the first backward
(this checks by value that expert gradients are reduced over the expert-data-parallel ranks only and
scaled like the dense ones) and every parameter after the 3 steps.

Everything runs in float64, so the comparison measures the layout and not the CPU's fp32 kernels. In
fp32 the same layouts differed from one process by up to 1.6e-5 relative on AVX512 CPUs (and less on
AVX2): sharded matmuls and all-reduces sum in another order (~1e-7), and AdamW's normalised update
m / (sqrt(v) + eps) turns that into a much larger parameter difference for near-zero gradients.

Tolerance 1e-9 relative (norm of the difference / norm of the reference): float64 rounding (1.1e-16)
through the same amplification stays below 1e-13 (measured: at most 2e-14 over every layout here), so
1e-9 leaves four orders of margin on any CPU, while a real bug shows far above it:
`test_a_broken_layout_fails` runs a layout whose rank 0 scales its loss by 1 + 1e-6 (a gradient off by
5e-7 relative) and requires the same checks to reject it.
"""

import re
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import dist_worker  # noqa: E402
import torchrun_worker  # noqa: E402
from torchrun_worker import run_worker  # noqa: E402

SP = "+sequence_parallel=true"
BROKEN = "dp_shard=2+fault=1e-6"  # rank 0 scales its loss by 1 + 1e-6: must fail the checks
PADDED = "+ep_exchange=padded"  # EP's fixed-size exchange (no host sync)
STARVE = "+starve=1"  # fixed expert biases route every token to rank 0's experts: rank 1's compute nothing
EXPERTS_ONLY = "+train=experts"  # all but the experts frozen: the first MoE layer's rows need no gradient
OVERLAP = "+ep_exchange=overlap"  # EP's all-to-alls under the experts' GEMMs (own backward, split weight gradient)
OWN_GROUP = "+ep_overlap_sms=8"  # the overlap on a group of its own (EP ranks {0,2}, {1,3} with tp=2)
ROOT_HEAD = "dp_shard=2+fsdp_lm_head_unit=false"  # lm_head in the root FSDP unit, as before the option
LAYOUTS_2 = ["dp_shard=2", ROOT_HEAD, "dp_replicate=2+dp_shard=1", "tp=2", "ep=2", "ep=2" + PADDED, "ep=2" + OVERLAP,
             "ep=2" + OVERLAP + "+ac=moe", "ep=2" + STARVE, "ep=2" + OVERLAP + STARVE,
             "ep=2" + OVERLAP + EXPERTS_ONLY, "tp=2+kv=1",
             "tp=2+kv=1" + SP]
LAYOUTS_4 = ["dp_shard=4+ep=2", "tp=2+ep=2", "tp=2+ep=2" + PADDED, "dp_shard=4+ep=2" + OVERLAP,
             "dp_shard=4+ep=4" + OVERLAP, "tp=2+ep=2" + OVERLAP + OWN_GROUP, "tp=2+dp_shard=2", "tp=2+ep=2" + SP,
             "dp_replicate=2+dp_shard=2+ep=2"]
INIT = "tp=2+ep=2"  # parallel.init_weights on a meta-built model in this layout
RESHARD = ["dp_shard=4+ep=2", "dp_shard=4", "tp=2"]  # save in the first, resume step 3 in the others
TOL = 1e-9
FLOOR = 1e-12  # norm floor of the relative differences

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layouts")
    results = run_worker("dist_worker.py", 2, tmp / "w2.pt", "layouts=" + ",".join(LAYOUTS_2 + [BROKEN]),
                         timeout=400)
    results.update(run_worker("dist_worker.py", 4, tmp / "w4.pt", "layouts=" + ",".join(LAYOUTS_4),
                              f"reshard={tmp / 'ckpt'}", "reshard_layouts=" + ",".join(RESHARD), f"init={INIT}",
                              timeout=400))
    torch.set_num_threads(1)
    refs = {"": dist_worker.reference({}), "kv=1": dist_worker.reference({"num_key_value_heads": 1}),
            "starve=1": dist_worker.reference({"moe_router_bias_update_rate": 0.01, "_starve": True}),
            "train=experts": dist_worker.reference({"_only_experts": True})}
    return results, refs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return torchrun_worker.rel(a, b, FLOOR)


def _ref_for(spec, refs):
    return next((refs[k] for k in ("kv=1", "starve=1", "train=experts") if k in spec), refs[""])


def check_matches(spec, got, ref, tol=TOL):
    torchrun_worker.check_matches(spec, got, ref, tol, FLOOR)
    # the logged per-expert counts are global (summed over the data-parallel ranks)
    assert torch.equal(got["expert_counts"], ref["expert_counts"])


@pytest.mark.parametrize("spec", LAYOUTS_2 + LAYOUTS_4)
def test_layout_matches_single_process(runs, spec):
    results, refs = runs
    assert results[spec]["params"]["lm_head.weight"].dtype == torch.float64
    check_matches(spec, results[spec], _ref_for(spec, refs))


def test_each_ep_layout_ran_its_exchange(runs):
    """The padded layouts went through the padded exchange, every step's MoE layers (2 per forward, 3 steps), the
    overlapped ones through the overlap (also the experts-only layout, whose first MoE layer's rows need no
    gradient; but not MoE layers under activation checkpointing, which fall back to the sized exchange), and the
    others through the sized one: equal results above are not one path tested twice."""
    results, _ = runs
    for spec in LAYOUTS_2 + LAYOUTS_4:
        ex = results[spec]["exchanges"]
        if not re.search(r"(^|\+)ep=[2-9]", spec):
            expected = "none"
        elif PADDED in spec:
            expected = "padded"
        elif OVERLAP in spec and "ac=moe" not in spec:
            expected = "overlap"
        else:
            expected = "sized"
        for kind, n in ex.items():
            assert (n >= 6) if kind == expected else (n == 0), (spec, expected, ex)
        if expected == "overlap":  # parallel.ep_overlap_sms > 0: a group of its own over the same ranks
            assert results[spec]["overlap_on_mesh_group"] == [OWN_GROUP not in spec], spec


def test_lm_head_is_its_own_fsdp_unit_unless_turned_off(runs):
    units = runs[0]["dp_shard=2"]["fsdp_units"]
    assert "lm_head" in units and "" in units and "model.layers.0" in units, units
    assert "lm_head" not in runs[0][ROOT_HEAD]["fsdp_units"]


def test_a_broken_layout_fails(runs):
    """The checks are not blind: a loss scaled by 1 + 1e-6 on one rank fails them, by far."""
    results, refs = runs
    got, ref = results[BROKEN], refs[""]
    with pytest.raises(AssertionError, match="off by"):
        check_matches(BROKEN, got, ref)
    worst = max(rel(got["params"][n], p) for n, p in ref["params"].items())
    assert worst > 100 * TOL, worst


def test_expert_gradients_would_differ_without_ep_scaling(runs):
    """Guard that the gradient check can fail: the EP layouts' expert gradients are the reference ones,
    and the reference expert gradients are far from what a sum over ep ranks (x2) would give."""
    results, refs = runs
    name = "model.layers.1.feed_forward.experts.gate_proj"
    for spec in ("ep=2", "ep=2" + PADDED, "dp_shard=4+ep=2", "tp=2+ep=2"):
        g, ref = results[spec]["grads"][name], refs[""]["grads"][name]
        assert rel(g, ref) <= TOL and rel(2 * g, ref) > 0.5


@pytest.mark.parametrize("target", RESHARD[1:])
def test_checkpoint_reshards(runs, target):
    """DCP checkpoint (model + AdamW state) saved after 2 steps with dp_shard=4 x ep=2, loaded with another
    layout: step 3 gives the reference loss and parameters."""
    results, refs = runs
    got, ref = results[f"reshard:{RESHARD[0]}->{target}"], refs[""]
    assert abs(got["loss"] - ref["losses"][2]) <= TOL * abs(ref["losses"][2])
    for name, p in ref["params"].items():
        assert rel(got["params"][name], p) <= TOL, f"{target}: {name} off by {rel(got['params'][name], p):.2e}"


def test_init_weights_after_sharding(runs):
    """meta -> parallelize -> to_empty -> parallel.init_weights: "full" mode reproduces the single-process
    init exactly; "local" mode (bounded memory) keeps replicated shards identical across ranks."""
    results, _ = runs
    got = results[f"init:{INIT}"]
    torch.manual_seed(0)
    ref = dist_worker.JambaForCausalLM(dist_worker.model_config())
    ref.init_weights(seed=dist_worker.SEED)
    for name, p in ref.named_parameters():
        assert torch.equal(got["full"]["params"][name], p), name
    assert got["full"]["inconsistent"] == [] and got["local"]["inconsistent"] == []
    # local mode draws different values (per-rank seeds) from the same rules
    assert not torch.equal(got["local"]["params"]["model.layers.0.mamba.in_proj.weight"],
                           ref.get_parameter("model.layers.0.mamba.in_proj.weight"))
