"""A real worker process for the kill -9 tests: `charter worker`'s loop, with the job process
started without the worker's vLLM pool (the spec names the judge, CHARTER_POLICY_URL the policy).

    python worker_process.py DATABASE_URL ARTIFACT_ROOT WORKER_ID LEASE_SECONDS
"""

import signal
import sys
import threading
from pathlib import Path

from charter.service.store import JobStore
from charter.service.worker import Worker
from charter.settings import Settings
from tests.faults.jobs import real_job_command

db, root, worker_id, lease = sys.argv[1], Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
settings = Settings(home=root.parent, database_url=db, artifact_root=root, lease_seconds=lease, heartbeat_seconds=0.5)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
Worker(JobStore.from_settings(settings), settings, worker_id=worker_id, job_command=real_job_command).run_forever(stop)
