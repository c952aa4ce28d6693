"""The suite leaves nothing in the system temp folder: its processes write under one folder it removes."""
import os
import tempfile
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from helpers import SUITE_TMP, SYSTEM_TMP


def _fail(rank: int) -> None:
    raise RuntimeError("a failing worker")


def test_temp_files_go_to_the_suites_own_folder(tmp_path):
    assert Path(tempfile.gettempdir()) == Path(SUITE_TMP) == Path(os.environ["TMPDIR"])  # subprocesses too
    assert Path(SUITE_TMP).parent == Path(SYSTEM_TMP) and tmp_path.is_relative_to(SUITE_TMP)
    before = set(os.listdir(SYSTEM_TMP))
    with pytest.raises(mp.ProcessRaisedException):  # a failed worker leaves its pytorch-errorfile-*.pickle
        mp.spawn(_fail, nprocs=1)
    assert set(os.listdir(SYSTEM_TMP)) - before == set()
    assert any(n.startswith("pytorch-errorfile-") for n in os.listdir(SUITE_TMP))
