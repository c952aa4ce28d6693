"""pytest's fixtures and hooks; what the tests share is in helpers.py."""
import os
import shutil

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read once, when `datasets` is imported: never the Hub

import datasets
import pytest
from helpers import SUITE_TMP, tiny_model


def pytest_unconfigure(config):
    shutil.rmtree(SUITE_TMP, ignore_errors=True)


@pytest.fixture(autouse=True, scope="session")
def private_caches(tmp_path_factory):
    """GGUF conversions and datasets' Arrow files go to fresh caches, never the user's ~/.cache."""
    os.environ["LISATUNE_CACHE"] = str(tmp_path_factory.mktemp("model-cache"))
    arrow = tmp_path_factory.mktemp("datasets-cache")
    os.environ["HF_DATASETS_CACHE"] = str(arrow)
    datasets.config.HF_DATASETS_CACHE = arrow  # datasets read the variable at import
    datasets.config.DOWNLOADED_DATASETS_PATH = arrow / datasets.config.DOWNLOADED_DATASETS_DIR
    datasets.config.EXTRACTED_DATASETS_PATH = arrow / datasets.config.EXTRACTED_DATASETS_DIR


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture
def cli_main():
    """lisatune.cli.main in this process; the logging levels it sets are put back afterwards."""
    import logging
    from lisatune.cli import main
    lisatune = logging.getLogger("lisatune")
    level = lisatune.level
    yield main
    lisatune.setLevel(level)
