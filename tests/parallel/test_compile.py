"""parallel.compile.apply_compile: compiled decoder layers give the eager model's loss and gradients, with
and without activation checkpointing; the module tree and parameter names are unchanged."""

import pytest
import torch

from jamba.config import get_preset
from jamba.model import JambaForCausalLM
from parallel.compile import apply_compile


def _loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(ids, targets=labels).loss  # aligned targets (rolled ids), as the trainer passes them
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(compiled, eager, ids, labels):
    """fp32: the compiled model's loss and every gradient equal eager's up to rounding."""
    l0, g0 = _loss_and_grads(eager, ids, labels)
    l1, g1 = _loss_and_grads(compiled, ids, labels)
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6, msg=n)


def _pair(ac, device="cpu", dtype=torch.float32, **overrides):
    cfg = get_preset("tiny", num_hidden_layers=4, layer_pattern="MD AE ME MD", activation_checkpointing=ac,
                     **overrides)
    torch.manual_seed(0)
    eager = JambaForCausalLM(cfg).to(device=device, dtype=dtype)
    torch.manual_seed(0)
    compiled = JambaForCausalLM(cfg).to(device=device, dtype=dtype)
    compiled.load_state_dict(eager.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 24), device=device)
    labels = torch.roll(ids, -1, dims=1)
    return eager, compiled, ids, labels


@pytest.mark.parametrize("ac,overrides", [([], {}), (["all"], {}), (["moe"], {"moe_token_chunk": 16})])
def test_compiled_layers_match_eager(ac, overrides):
    """Also with activation checkpointing and with token-chunked MoE layers (checkpoints inside the graph)."""
    eager, compiled, ids, labels = _pair(ac, **overrides)
    names = [n for n, _ in compiled.named_parameters()]
    apply_compile(compiled, backend="aot_eager")  # traces through Dynamo + AOTAutograd, no C++ toolchain
    assert [n for n, _ in compiled.named_parameters()] == names
    for _ in range(2):  # second call: the cached graphs
        _assert_same(compiled, eager, ids, labels)


def test_compiled_layers_follow_a_sequence_length_change():
    """A curriculum stage changes the sequence length: the layers recompile (or go dynamic) and stay exact."""
    eager, compiled, ids, labels = _pair([])
    apply_compile(compiled, backend="aot_eager")
    for length in (24, 12, 20):
        _assert_same(compiled, eager, ids[:, :length], labels[:, :length])


def test_compile_twice_is_refused():
    _, compiled, _, _ = _pair([])
    apply_compile(compiled, backend="aot_eager")
    with pytest.raises(ValueError, match="compiled already"):
        apply_compile(compiled, backend="aot_eager")


@pytest.mark.gpu
def test_inductor_compiled_layers_match_eager_bf16_cuda():
    """Inductor on CUDA in bf16 is as close to the fp32 model as eager bf16 is: for the loss and for every
    gradient, the compiled error against fp32 is at most 1.5x eager's (+ a small floor); both differ from
    each other by bf16 rounding only (a direct bf16-vs-bf16 tolerance would test noise)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ref, _, ids, labels = _pair([], device="cuda", dtype=torch.float32)
    eager, compiled, _, _ = _pair([], device="cuda", dtype=torch.bfloat16)
    apply_compile(compiled)
    lr, gr = _loss_and_grads(ref, ids, labels)
    l0, g0 = _loss_and_grads(eager, ids, labels)
    l1, g1 = _loss_and_grads(compiled, ids, labels)
    assert abs(float(l1) - float(lr)) <= 1.5 * abs(float(l0) - float(lr)) + 1e-3 * abs(float(lr))

    def err(g, n):
        return float((g[n].float() - gr[n]).norm() / gr[n].norm().clamp_min(1e-12))

    worst = max(gr, key=lambda n: err(g1, n) / (err(g0, n) + 1e-2))
    assert err(g1, worst) <= 1.5 * err(g0, worst) + 1e-2, (worst, err(g1, worst), err(g0, worst))


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_compiled_layers_under_fsdp_tp_ep_match_single_process(tmp_path):
    """Dynamo traces the layers with FSDP2's hooks, DTensor (tensor parallel) and the experts' all-to-all
    in place: 3 AdamW steps on 2 gloo processes equal the eager single-process run."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import dist_worker
    from torchrun_worker import check_matches, run_worker

    layouts = ["dp_shard=2+compile=aot_eager", "tp=2+compile=aot_eager", "ep=2+compile=aot_eager"]
    results = run_worker("dist_worker.py", 2, tmp_path / "w2.pt", "layouts=" + ",".join(layouts), timeout=400)
    torch.set_num_threads(1)
    ref = dist_worker.reference({})
    for spec in layouts:
        # float64 on both sides (dist_worker), so the tolerance of test_parallel_layouts.py applies
        check_matches(spec, results[spec], ref, tol=1e-9, floor=1e-12)
