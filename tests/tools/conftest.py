"""The tools' short digits runs, made once per test session."""
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.tools.cli import train_evaluate_resume

SCRIPTS = ("train_net.py", "plain_train_net.py")


@pytest.fixture(scope="session")
def tool_runs(tmp_path_factory):
    """``{script: train_evaluate_resume(...)}`` for both tools, run side by side (each one single-threaded)."""
    with ThreadPoolExecutor(len(SCRIPTS)) as pool:
        futures = {s: pool.submit(train_evaluate_resume, s, tmp_path_factory.mktemp(s[: -len(".py")])) for s in SCRIPTS}
        return {s: f.result() for s, f in futures.items()}
