"""`result.get()` with Celery's rpc:// backend against Warren workers:
the value and the final state. Prints JSON.

    python rpc_get.py <broker url> <default queue>
"""
import json
import sys

from celery import Celery

broker, default_queue = sys.argv[1:3]
app = Celery("client", broker=broker, backend="rpc://")
app.conf.task_default_queue = default_queue
app.conf.broker_connection_retry_on_startup = False

out = {}
ok = app.send_task("multiply", args=(6, 7))
out["value"] = ok.get(timeout=15)
out["state"] = ok.state

print(json.dumps(out))
