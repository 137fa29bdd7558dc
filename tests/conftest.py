"""Test-wide settings: offline hub, one CPU thread, GPU tests skipped without CUDA; test modules
that define ``start_early(selected)`` / ``stop_early()`` get them called at the end of collection
(with the names of their selected tests) and at the end of the session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run bench/device_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _early_starters(session) -> dict:
    """{module: names of its selected tests} for the collected modules that define start_early."""
    modules: dict = {}
    for item in getattr(session, "items", ()):  # none when collection failed
        module = getattr(item, "module", None)
        if module is not None and hasattr(module, "start_early"):
            modules.setdefault(module, set()).add(getattr(item, "originalname", item.name))
    return modules


def pytest_collection_finish(session):
    # a subprocess that mostly waits (for limits, timeouts) runs beside the tests before its own
    if session.config.option.collectonly:
        return
    for module, selected in _early_starters(session).items():
        module.start_early(selected)


def pytest_sessionfinish(session):
    for module in _early_starters(session):
        module.stop_early()
