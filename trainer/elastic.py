"""Restarted torchrun worker groups must not read the previous round's process-group keys.

torchrun (torch >= 2.6) shares its rendezvous TCPStore with the workers and keeps it across restart rounds.
A restarted rank then reads the dead round's gloo/NCCL addresses from it: "Gloo connectFullMesh failed ...
Connection refused" or a hang (pytorch/pytorch#167288; 2 of 3 `torchrun --max-restarts=1` runs here after a
kill -9 of one rank). The launch scripts set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store per round);
for a plain `torchrun` on one node, the process group gets its own key prefix per restart round instead.
"""

from __future__ import annotations

import datetime
import logging
import os

log = logging.getLogger(__name__)


def round_store(timeout: datetime.timedelta):
    """A store prefixed by the restart round for init_process_group, or None when not needed (not under
    torchrun, no restarts, or torchrun gives every round a fresh store)."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) == 0:
        return None
    if int(env.get("GROUP_WORLD_SIZE", "1")) > 1:
        # Agents on several nodes may count restarts differently (a node that only saw peers fail restarts
        # without counting), so the round is not a shared prefix there.
        if int(env.get("RANK", "0")) == 0:
            log.warning("torchrun shares its rendezvous store across restarts: a restarted worker group may fail "
                        "to connect (pytorch/pytorch#167288). Set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for "
                        "torchrun (launch/multi_node.sh does)")
        return None
    import torch.distributed as dist

    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), int(env["WORLD_SIZE"]), is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"jamba/round{int(env.get('TORCHELASTIC_RESTART_COUNT', '0'))}", store)
