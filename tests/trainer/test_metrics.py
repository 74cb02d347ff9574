"""trainer/metrics.py helpers: the MoE load figures logged with each training record."""

def test_moe_balance_rank_load_groups_experts_by_ep_rank():
    import torch

    from trainer.metrics import moe_balance

    # 2 MoE layers, 4 experts; ep=2: rank 0 holds experts 0-1, rank 1 experts 2-3
    counts = torch.tensor([[10.0, 10.0, 10.0, 10.0],   # balanced
                           [30.0, 10.0, 0.0, 0.0]])    # rank 0 gets all 40 of the layer's rows
    out = moe_balance(counts, ep=2)
    assert out["moe_load_max"] == 3.0 and out["moe_load_min"] == 0.0
    assert out["moe_rank_load_max"] == 2.0  # 40 over the mean of (40, 0)
    assert out["moe_counts"] == [[10, 10, 10, 10], [30, 10, 0, 0]]  # as they are, for launch.ep_balance
    assert "moe_rank_load_max" not in moe_balance(counts, ep=1)
    # experts 0 and 2 busy: balanced over ep ranks although the experts are not
    assert moe_balance(torch.tensor([[20.0, 0.0, 20.0, 0.0]]), ep=2)["moe_rank_load_max"] == 1.0
