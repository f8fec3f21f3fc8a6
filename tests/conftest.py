import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def shapes16(tmp_path_factory):
    """A small rendered shapes dataset at 16 px, shared by the session."""
    from datamodules.shapes import write_shapes_shards

    root = str(tmp_path_factory.mktemp("shapes16"))
    write_shapes_shards(root, resolution=16, num_train=600, num_val=64, seed=0, shard_size=100)
    return root
