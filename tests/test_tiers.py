"""The test tiers themselves (tests/helpers.py): `make test-fast` is -m "not process", so a test
that starts a process must carry the mark, set by hand or by conftest for the users of a fixture
that starts one; an unmarked test that tries is failed before anything starts."""
import sys

import pytest

from helpers import PROCESS_FIXTURES, PROCESS_MARK, run_finetune, run_process, spawn


def test_an_unmarked_test_cannot_start_a_process(tmp_path):
    for start in (lambda: run_process([sys.executable, "-c", "pass"]),
                  lambda: spawn([sys.executable, "-c", "pass"]),
                  lambda: run_finetune(tmp_path, "run", ["stages=[prepare]"])):
        with pytest.raises(pytest.fail.Exception, match=r"test_tiers.py::test_an_unmarked_test_cannot_start_a_process "
                                                        r"starts .* but is not marked @pytest.mark.process"):
            start()
    assert list(tmp_path.iterdir()) == []          # nothing ran: no run dir, no log files


@pytest.mark.process
def test_a_marked_test_can(tmp_path):
    proc = run_process([sys.executable, "-c", "print('ran')"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "ran\n"


def test_users_of_process_fixtures_are_marked(request):
    """Every collected test that needs quick_root, reference_run, the MLflow server, ... (directly or
    through another fixture) carries the mark, so -m "not process" leaves it out."""
    users = [item for item in request.session.items if PROCESS_FIXTURES & set(item.fixturenames)]
    assert all(item.get_closest_marker(PROCESS_MARK) for item in users), [
        item.nodeid for item in users if not item.get_closest_marker(PROCESS_MARK)]
    assert request.node.get_closest_marker(PROCESS_MARK) is None
