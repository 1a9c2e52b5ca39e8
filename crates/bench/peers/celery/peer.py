"""Celery 5.7 as a peer of `warren-bench peers`: a no-op task whose result
Celery stores through its database backend (SQLAlchemy on PostgreSQL).

    python peer.py publish N     queues N tasks
    celery -A peer worker ...    runs them (the benchmark starts it)

Configured from the environment: PEER_BROKER (an amqp:// URL), PEER_BACKEND
(a db+postgresql:// URL), PEER_QUEUE.
"""

import os
import sys

from celery import Celery

app = Celery("peer", broker=os.environ["PEER_BROKER"], backend=os.environ["PEER_BACKEND"])
app.conf.update(
    task_default_queue=os.environ["PEER_QUEUE"],
    # Celery's defaults, written down: acks before running, results stored.
    task_acks_late=False,
    task_ignore_result=False,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    # No remote control: its `celery.pidbox` exchange has no per-run name
    # and would stay on the broker after the benchmark.
    worker_enable_remote_control=False,
)


@app.task(name="noop")
def noop():
    return None


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "publish":
        sys.exit("usage: peer.py publish N")
    with app.producer_pool.acquire(block=True) as producer:
        for _ in range(int(sys.argv[2])):
            noop.apply_async(producer=producer)
