"""The GPU benchmark's small version runs on a CPU and its numbers are consistent."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_scale_small_measures_throughput_flops_and_mfu(capsys):
    from benchmarks.gpu_scale import main

    rows = main(["--small", "--checkpointing", "off,on", "--peak-tflops", "1.0"])
    plain, saving = rows
    assert not plain["checkpointing"] and saving["checkpointing"]
    for r in rows:
        assert r["img_s"] > 0 and r["step_ms"] > 0 and r["gflop_step"] > 0
        assert r["mfu"] == pytest.approx(r["tflops"] / 1.0)
    # checkpointing recomputes the forward in the backward: more FLOPs, at most one more forward
    assert plain["gflop_step"] < saving["gflop_step"] < 1.5 * plain["gflop_step"]
    assert "| shards_gpu.yaml | 2 | 32-true |" in capsys.readouterr().out
