"""Celery's canvas against Warren workers, as a Celery client writes it:
`link`/`link_error`, a chain, and `chord(header)(body)`. Prints the ids
the client knows, as JSON; the test follows them in Warren.

Celery builds chords only with a result backend that supports them (its
`rpc://` refuses). This client has the database backend Flask teams run
(an in-memory SQLite here; the client never touches it for a chord): Celery then sends
the members, each naming the chord's body, and a `celery.chord_unlock`
message listing the members, from which Warren learns the chord's size.
Warren, not the backend, joins the chord.

    python canvas.py <broker url> <default queue> <chord size>
"""
import json
import sys

from celery import Celery, chain, chord

broker, default_queue, size = sys.argv[1:4]
app = Celery("client", broker=broker, backend="db+sqlite://")
app.conf.task_default_queue = default_queue
app.conf.broker_connection_retry_on_startup = False
sig = app.signature

out = {}
ok = app.send_task("multiply", args=(6, 7), link=sig("echo"), link_error=sig("echo"))
out["linked_ok"] = ok.id
bad = app.send_task("multiply", args=(1e308, 1e308), link=sig("echo"), link_error=sig("echo"))
out["linked_bad"] = bad.id

steps = chain(sig("multiply", args=(2, 3)), sig("multiply", args=(4,)), sig("multiply", args=(5,)))
last = steps.apply_async()
out["chain_last"] = last.id
out["chain_first"] = last.parent.parent.id

body = chord([sig("multiply", args=(i, i)) for i in range(int(size))])(sig("sum"))
out["chord_body"] = body.id

# The same chain from a client with Celery's rpc:// backend: `get()` on the
# last step returns its value (Warren replies for every step of the canvas).
# It queues behind the chord's members above: on a loaded machine (the full
# e2e suite), 30 s was once not enough for them and it.
rpc = Celery("rpc-client", broker=broker, backend="rpc://")
rpc.conf.task_default_queue = default_queue
rpc.conf.broker_connection_retry_on_startup = False
steps = chain(rpc.signature("multiply", args=(2, 3)), rpc.signature("multiply", args=(4,)))
out["rpc_chain_value"] = steps.apply_async().get(timeout=90)
print(json.dumps(out))
