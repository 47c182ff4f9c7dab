"""Set-up for the whole test run, before any test starts (test_spp_server.py
holds the tests and their fixtures)."""

import os
import shutil
import tempfile


def pytest_configure(config):
    """Let the tests' Python subprocesses reuse compiled bytecode.

    Most of the suite's time is real `spp_server.py` processes and commands.
    Where PYTHONDONTWRITEBYTECODE is set (as on CI machines and developers'
    shells), every one of them compiles the 8,000-line module afresh: about
    90 ms of CPU each, twice for a server (the script, then the module it
    starts again as).  So the run drops that variable for the processes the
    tests start, and keeps their bytecode under PYTHONPYCACHEPREFIX in a
    directory of its own: no __pycache__ appears in the working tree or next
    to the copies of the module in temporary directories that tests inspect.
    The directory comes from mkdtemp (mode 0700, an unpredictable name), not
    from a fixed path that another user could create first and fill with
    bytecode of their own.  It is made once, here in the main process, and the
    xdist workers, started after this hook, inherit it with the environment."""
    if hasattr(config, "workerinput"):  # an xdist worker: the main process did it
        return
    prefix = tempfile.mkdtemp(prefix="spp-tests-pycache-")
    config.add_cleanup(lambda: shutil.rmtree(prefix, ignore_errors=True))
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = prefix
