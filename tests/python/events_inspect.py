"""What Flower and `celery events`/`celery inspect` see of a Warren worker,
read with Celery's own receiver, state machine and remote control. Prints
JSON.

    python events_inspect.py <broker url> <default queue> <event exchange>
                             <control exchange> <worker hostname>
"""
import json
import sys
import threading
import time

from celery import Celery

broker, default_queue, event_exchange, control_exchange, hostname = sys.argv[1:6]
app = Celery("client", broker=broker, backend="rpc://")
app.conf.task_default_queue = default_queue
app.conf.event_exchange = event_exchange
app.conf.control_exchange = control_exchange
app.conf.broker_connection_retry_on_startup = False

# Flower keeps exactly this: Celery's event state, fed every event.
state = app.events.State()
seen = []  # (type, uuid) of this worker's events, in order
lock = threading.Condition()


def on_event(event):
    if event.get("hostname") != hostname:
        return  # another test's worker on the same broker
    with lock:
        state.event(event)
        seen.append((event["type"], event.get("uuid")))
        lock.notify_all()


def wait_for(what, timeout=30):
    deadline = time.monotonic() + timeout
    with lock:
        while not what():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"events seen: {seen}")
            lock.wait(left)


connection = app.connection()
receiver = app.events.Receiver(connection, handlers={"*": on_event})
thread = threading.Thread(
    target=lambda: receiver.capture(limit=None, timeout=None, wakeup=False),
    daemon=True,
)
thread.start()

out = {}
wait_for(lambda: any(t == "worker-heartbeat" for t, _ in seen))
inspect = app.control.inspect(destination=[hostname], timeout=5)
out["ping"] = inspect.ping()

slow = app.send_task("sleep", args=(1.5,))
wait_for(lambda: ("task-started", slow.id) in seen)
active = inspect.active() or {}
out["active_ids"] = [t["id"] for t in active.get(hostname, [])]
out["stats"] = inspect.stats()
# A command that would steer the worker gets an error reply, nothing else.
out["refused"] = app.control.broadcast(
    "shutdown", destination=[hostname], reply=True, timeout=5
)
slow.get(timeout=30)

ok = app.send_task("multiply", args=(6, 7))
ok.get(timeout=30)
bad = app.send_task("multiply", args=(1e308, 1e308))
bad.get(timeout=30, propagate=False)
wait_for(lambda: ("task-failed", bad.id) in seen and ("task-succeeded", ok.id) in seen)
receiver.should_stop = True

with lock:
    worker = state.workers[hostname]
    out["worker"] = {
        "alive": worker.alive,
        "processed": worker.processed,
        "freq": worker.freq,
        "sw_ident": worker.sw_ident,
    }
    out["events"] = {
        name: [t for t, u in seen if u == task.id]
        for name, task in (("ok", ok), ("bad", bad), ("slow", slow))
    }
    good, failed = state.tasks[ok.id], state.tasks[bad.id]
    out["ok"] = {
        "state": good.state,
        "name": good.name,
        "args": good.args,
        "kwargs": good.kwargs,
        "result": good.result,
        "runtime": good.runtime,
    }
    out["bad"] = {"state": failed.state, "exception": failed.exception}
    out["slow_id"] = slow.id
print(json.dumps(out))
