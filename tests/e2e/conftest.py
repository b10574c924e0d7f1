"""The e2e tier's shared recording: every trainer process of the session writes which config leaves it read, and
from which module (`config.dump_reads_at_exit`), into one directory, one file per process named after its test
module. test_train.py's last test checks that every leaf is consumed, and only by its section's owner."""
import os

import pytest


@pytest.fixture(scope="session")
def config_reads(tmp_path_factory):
    return tmp_path_factory.mktemp("config_reads")


@pytest.fixture(scope="module", autouse=True)
def record_config_reads(config_reads, request):
    saved = os.environ.get("SPARK_CONFIG_READS")
    os.environ["SPARK_CONFIG_READS"] = str(config_reads / request.module.__name__.rsplit(".", 1)[-1])
    yield
    if saved is None:
        os.environ.pop("SPARK_CONFIG_READS", None)
    else:
        os.environ["SPARK_CONFIG_READS"] = saved
