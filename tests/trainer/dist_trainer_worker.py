"""One rank of the multi-process loop tests (tests/trainer/test_trainer_dist.py): the step loop on the stand-in
model under FSDP2 (gloo, CPU), launched as plain processes with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
(as on separate nodes: no torchrun agent kills the survivors).

    python dist_trainer_worker.py <out_dir> <scenario> <collective_timeout_s>

Scenarios:
  eval_unequal   validation splits of 1 (rank 0) and 3 (rank 1) batches; writes rank<r>.json with the
                 validation loss and this rank's own per-batch losses recomputed on the final full weights
  stop_in_step   rank 1 stops itself (SIGSTOP) in the forward of step 3
  kill_in_step   rank 1 dies (SIGKILL) in the forward of step 3
  stop_in_save   rank 1 stops itself inside the checkpoint save after step 2
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_standins import StandInLM, StandInLoader, build_trainer, small_run_config  # noqa: E402


class FiniteLoader(StandInLoader):
    def __init__(self, n: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.n = n

    def __iter__(self):
        for i, batch in enumerate(super().__iter__()):
            if i == self.n:
                return
            yield batch


def main(out_dir: str, scenario: str, timeout_s: float) -> int:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from trainer import distributed
    from trainer.watchdog import make_watchdog

    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ['RANK']}] %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    world = distributed.world_from_env()
    distributed.init_distributed(world, torch.device("cpu"), timeout_s)
    watchdog = make_watchdog(world.rank, world.world_size, timeout_s)
    out = Path(out_dir)
    try:
        torch.manual_seed(0)
        model = StandInLM()
        mesh = init_device_mesh("cpu", (world.world_size,))
        for sub in (model.up, model.down, model.head):  # own FSDP units: all-gathered in every forward
            fully_shard(sub, mesh=mesh)
        fully_shard(model, mesh=mesh)
        cfg = small_run_config(max_steps=4)
        cfg.train.global_batch_tokens = 64 * world.world_size  # 2 micro-batches of 4 x 8 per rank
        cfg.checkpoint.every = 2 if scenario == "stop_in_save" else 0
        cfg.checkpoint.save_final = False
        if scenario == "eval_unequal":
            cfg.train.eval_every, cfg.train.eval_batches = 4, 8

        def on_batch(pos):  # batches 4, 5 are step 3's
            if world.rank == 1 and pos == 5 and scenario in ("stop_in_step", "kill_in_step"):
                os.kill(os.getpid(), signal.SIGSTOP if scenario == "stop_in_step" else signal.SIGKILL)

        if scenario == "stop_in_save" and world.rank == 1:
            import trainer.checkpoint as ckpt_mod

            real_save = ckpt_mod.dcp.save

            def stopping_save(*args, **kwargs):
                os.kill(os.getpid(), signal.SIGSTOP)
                return real_save(*args, **kwargs)

            ckpt_mod.dcp.save = stopping_save

        trainer = build_trainer(cfg, out / "run", world=world, dp_size=world.world_size, model=model,
                                on_batch=on_batch)
        trainer.watch = watchdog
        n_val = 1 + 2 * world.rank  # unequal validation splits: 1 and 3 batches
        trainer.make_eval_loader = lambda stage: FiniteLoader(n_val, stage.seq_len, stage.micro_batch_size,
                                                              dp_rank=world.rank, split="val")
        assert trainer.fit() == 0
        if scenario == "eval_unequal":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
            plain = StandInLM()
            plain.load_state_dict(full)
            own = []
            with torch.no_grad():
                for b in FiniteLoader(n_val, 8, 4, dp_rank=world.rank, split="val"):
                    own.append(plain(b["input_ids"], targets=b["targets"]).lm_loss.item())
            vals = [json.loads(line)["val_loss"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines()
                    if "val_loss" in line] if world.is_main else []
            (out / f"rank{world.rank}.json").write_text(json.dumps({"own_losses": own, "val": vals}))
        return 0
    finally:
        distributed.destroy_distributed()
        watchdog.close()


if __name__ == "__main__":
    from trainer.distributed import exit_now

    exit_now(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))  # gloo's exit abort: see exit_process
