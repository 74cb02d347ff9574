"""launch/bench_staging.py on CPU: the state it stages is the preset's weights and two AdamW moments (fp32),
and both methods report a first and later stage times."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bench_staging_cpu_smoke(tmp_path):
    from jamba.config import get_preset
    from jamba.flops import param_counts

    out = tmp_path / "staging.json"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "launch.bench_staging", "--preset", "tiny", "--device", "cpu",
                        "--repeats", "1", "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["bytes"] == 3 * 4 * param_counts(get_preset("tiny"))["total"]
    assert not res["pinned"]
    for method in ("ours", "torch"):
        assert res[method]["first_s"] > 0 and len(res[method]["later_s"]) == 1
