"""`charter worker` with fake_job.py as each job's process, for tests that need worker processes.

    PYTHONPATH=. DATABASE_URL=… python -m tests.service.worker_proc

The same code path as `charter worker` (cli.run_worker: signals, logging, the claim loop);
only the job command differs.
"""

import sys

from charter import cli
from charter.settings import Settings
from tests.service.helpers import fake_command

if __name__ == "__main__":
    sys.exit(cli.run_worker(Settings.from_env(), job_command=fake_command))
