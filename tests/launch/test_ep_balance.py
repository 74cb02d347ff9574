"""launch/ep_balance.py: what each EP size would make of a run's routing, from metrics.jsonl's `moe_counts`
(hand-computed cases; the trainer's real records are checked in tests/trainer/test_trainer_e2e.py)."""

import json

import pytest

import math

from launch.ep_balance import busiest_rank_loads, chance_loads, expected_max_normal, main, read_counts, summarise


def write_metrics(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_busiest_rank_over_the_mean_per_layer():
    counts = [[10, 10, 10, 10],   # balanced at any ep
              [30, 10, 0, 0],     # ep=2: ranks (40, 0) -> 2.0; ep=4: 30 over 10 -> 3.0
              [20, 0, 20, 0],     # ep=2: (20, 20) -> 1.0 although the experts are not balanced
              [0, 0, 0, 0]]       # routed nothing: left out
    assert busiest_rank_loads(counts, 2) == [1.0, 2.0, 1.0]
    assert busiest_rank_loads(counts, 4) == [1.0, 3.0, 2.0]
    assert busiest_rank_loads(counts, 1) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="--ep 3 must divide the number of experts"):
        busiest_rank_loads(counts, 3)


def test_summary_over_the_records_after_skip(tmp_path):
    f = write_metrics(tmp_path / "metrics.jsonl", [
        {"step": 4, "moe_counts": [[40, 0, 0, 0]]},                  # the routing's start: skipped
        {"step": 8, "moe_counts": [[10, 10, 10, 10], [30, 10, 0, 0]]},  # ep=2: layers 1.0, 2.0 -> mean 1.5
        {"step": 8, "val_loss": 3.0},                                 # validation records carry no counts
        {"step": 12, "moe_counts": [[12, 8, 10, 10], [10, 10, 10, 10]]},  # ep=2: 1.0, 1.0 -> 1.0
    ])
    records = read_counts(tmp_path, skip=4)  # a run directory or the file itself
    assert [r["step"] for r in records] == [8, 12] == [r["step"] for r in read_counts(f, skip=4)]
    (row,) = summarise(records, [2])
    chance = row.pop("chance_load")  # every layer routed 40 copies: 20 per rank
    assert chance == pytest.approx(1 + 1 / math.sqrt(math.pi) / math.sqrt(20), rel=1e-6)
    # pooled: layer 0 sums to [22, 18, 20, 20] -> ranks (40, 40) -> 1.0; layer 1 [40, 20, 10, 10] -> (60, 20) -> 1.5
    assert row == {"ep": 2, "experts_per_rank": 2, "records": 2, "mean_load_median": 1.25, "mean_load_mean": 1.25,
                   "mean_load_worst": 1.5, "worst_layer": 2.0, "pooled_load": 1.25}


def test_chance_floor_matches_uniform_routing():
    """The closed form against known values and against simulated uniform top-k routing (a seeded generator)."""
    assert expected_max_normal(1) == 0.0
    assert expected_max_normal(2) == pytest.approx(1 / math.sqrt(math.pi), rel=1e-6)
    assert expected_max_normal(4) == pytest.approx(1.029375, rel=1e-5)  # tabulated order-statistic means
    assert expected_max_normal(8) == pytest.approx(1.423600, rel=1e-5)
    import torch
    gen = torch.Generator().manual_seed(0)
    tokens, experts, draws = 2048, 8, 1500
    for top_k in (1, 2):
        # each token's k distinct experts: the top-k of uniform scores; counts (draws, experts)
        picks = torch.rand(draws, tokens, experts, generator=gen).topk(top_k, dim=-1).indices
        counts = torch.nn.functional.one_hot(picks, experts).sum((1, 2)).tolist()
        for ep in (2, 4, 8):
            simulated = [load for row in counts for load in busiest_rank_loads([row], ep)]
            (predicted,) = chance_loads([[tokens * top_k / experts] * experts], ep, expected_max_normal(ep), top_k)
            # the simulation's standard error is under 3% of the excess over 1 at these sizes; at top-2 the
            # excess is 7% below the independent copies' (sqrt(6/7)), which a 5% tolerance tells apart
            assert sum(simulated) / draws - 1 == pytest.approx(predicted - 1, rel=0.05), (top_k, ep)


def test_cli_prints_a_table_and_names_bad_input(tmp_path, capsys):
    f = write_metrics(tmp_path / "metrics.jsonl", [{"step": 1, "moe_counts": [[3, 1, 2, 2]]}])
    with f.open("a") as fh:
        fh.write('{"step": 2, "moe_counts": [[1, 1')  # torn by a kill: left out, as trainer.plot does
    out_json = tmp_path / "balance.json"
    assert main([str(tmp_path), "--json", str(out_json)]) == 0  # every EP size dividing the 4 experts
    table = capsys.readouterr().out
    assert "| 2 | 2 | 1.000 / 1.000 / 1.000 | 1.00 | 1.000 | 1.282 | 1 |" in table and "| 4 | 1 | 1.500" in table
    assert [r["ep"] for r in json.loads(out_json.read_text())["rows"]] == [2, 4]
    # top-k from the run's config.yaml (train.py writes it): 2 of 4 experts per token shrink chance's excess
    (tmp_path / "config.yaml").write_text("model:\n  num_experts_per_tok: 2\n")
    assert main([str(tmp_path), "--ep", "2"]) == 0
    assert f"| 1.000 | {1 + 0.282095 * math.sqrt(2 / 3):.3f} | 1 |" in capsys.readouterr().out
    (tmp_path / "config.yaml").write_text("model: [unclosed\n")  # damaged: a note, then top-1
    assert main([str(tmp_path), "--ep", "2"]) == 0
    captured = capsys.readouterr()
    assert "could not read" in captured.err and "| 1.282 | 1 |" in captured.out
    (tmp_path / "config.yaml").unlink()
    assert main([str(tmp_path), "--ep", "4,2,4"]) == 0 and capsys.readouterr().out.count("\n| ") == 2  # 2 and 4, once each
    assert main([str(tmp_path), "--ep", "2,3"]) == 0  # sizes that do not divide the experts are left out, said so
    captured = capsys.readouterr()
    assert "leaving out --ep [3]: an EP size must divide the number of experts (4)" in captured.err
    assert captured.out.count("\n| ") == 1
    assert main([str(tmp_path), "--ep", "3"]) == 2
    assert main([str(tmp_path), "--skip", "5"]) == 2
    assert "no record after step 5" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no metrics file"):
        main([str(tmp_path / "nowhere")])


def test_cli_refuses_mixed_models_and_empty_routing(tmp_path, capsys):
    write_metrics(tmp_path / "metrics.jsonl", [{"step": 1, "moe_counts": [[3, 1, 2, 2]]},
                                               {"step": 2, "moe_counts": [[3, 1]]}])
    with pytest.raises(SystemExit, match=r"count \[2, 4\] experts per layer"):
        main([str(tmp_path)])
    write_metrics(tmp_path / "metrics.jsonl", [{"step": 1, "moe_counts": [[3, 1, 2, 2]]},
                                               {"step": 2, "moe_counts": [[3, 1, 2, 2], [1, 1, 1, 1]]}])
    with pytest.raises(SystemExit, match=r"count \[1, 2\] MoE layers"):
        main([str(tmp_path)])
    assert main([str(tmp_path), "--skip", "1"]) == 0  # past the other model's records
    write_metrics(tmp_path / "metrics.jsonl", [{"step": 1, "moe_counts": [[0, 0, 0, 0]]}])
    capsys.readouterr()
    assert main([str(tmp_path)]) == 2 and "routed no tokens" in capsys.readouterr().err
