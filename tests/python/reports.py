"""Python task code behind Warren's API: a Celery app as a team has it,
with the settings Warren's `runner = "celery"` types need. Run as a
Celery worker consuming the type's queue:

    WARREN_BROKER=amqp://... RUN_LOG=/tmp/runs.log \
        python -m celery -A reports worker -Q <prefix>warren.reports \
        -c 4 -n py@%h --without-gossip --without-mingle

The settings that matter:
- result_backend = "rpc://": results go to the message's reply_to, which
  Warren sets to its own durable reply queue;
- task_track_started = True: Warren records STARTED (and the attempt);
- task_acks_late = True (+ task_reject_on_worker_lost): a worker killed
  mid-task hands the message back, and the task runs again elsewhere;
- result_persistent = True: results survive a broker restart;
- worker_prefetch_multiplier = 1: a slow task holds one message, not four;
- task_create_missing_queue_type = "quorum": `-Q` declares the queue as
  Warren does (x-queue-type only), so the declarations agree.
"""
import os
import time

from celery import Celery

app = Celery("reports", broker=os.environ["WARREN_BROKER"], backend="rpc://")
app.conf.update(
    task_track_started=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    result_persistent=True,
    worker_prefetch_multiplier=1,
    task_create_missing_queue_type=os.environ.get("QUEUE_TYPE", "quorum"),
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

RUN_LOG = os.environ.get("RUN_LOG")


def note(event, task_id):
    """One line per event, so a test can count how often each task ran."""
    if RUN_LOG:
        with open(RUN_LOG, "a", encoding="utf-8") as f:
            f.write(f"{event} {task_id}\n")


@app.task(name="reports.wordcount", bind=True)
def wordcount(self, text, fail=None, pause=0.0):
    """Counts words, reporting progress after each; `fail` raises."""
    note("start", self.request.id)
    words = text.split()
    for done in range(1, len(words) + 1):
        if pause:
            time.sleep(pause)
        self.update_state(state="PROGRESS", meta={"done": done, "total": len(words)})
    if fail:
        raise ValueError(fail)
    note("done", self.request.id)
    return {"words": len(words)}


@app.task(name="multiply")
def multiply(x, y):
    """The Python original of a type Warren now runs in Rust: registered
    here as a team mid-migration has it, never sent here by Warren."""
    note("multiply", "-")
    return x * y
