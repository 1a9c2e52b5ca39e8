"""`result.get()` with Celery's rpc:// backend against Warren workers, as a
Celery team calls it: the value, what a failure raises, and every state
the client was told, in order (`on_message` sees each reply). Prints JSON.

    python rpc_get.py <broker url> <default queue>
"""
import json
import sys

from celery import Celery

broker, default_queue = sys.argv[1:3]
app = Celery("client", broker=broker, backend="rpc://")
app.conf.task_default_queue = default_queue
app.conf.broker_connection_retry_on_startup = False


def states_of(result, propagate=True):
    seen = []
    value = result.get(
        timeout=30,
        propagate=propagate,
        on_message=lambda meta: seen.append(meta["status"]),
    )
    return value, seen


def failure_of(result):
    try:
        result.get(timeout=30)
    except Exception as e:  # noqa: BLE001: what a user's `except` sees
        return {"type": type(e).__name__, "message": str(e)}
    return None


out = {}
ok = app.send_task("multiply", args=(6, 7))
out["value"], out["states"] = states_of(ok)
out["state"] = ok.state

bad = app.send_task("multiply", args=(1e308, 1e308))
out["failure"] = failure_of(bad)
out["failure_state"] = bad.state

# Three planned failures and max_retries = 3 in the test config: every
# attempt fails, the last one for good.
flaky = app.send_task("flaky", args=(1000,))
_, out["flaky_states"] = states_of(flaky, propagate=False)
out["flaky_state"] = flaky.state

print(json.dumps(out))
