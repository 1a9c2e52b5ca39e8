"""A Celery 5.7 producer with Celery's default routing: no queue named
anywhere, `send_task(name, args)`. The default queue is renamed only so
that tests can run side by side (in production it is `celery`).

    python send_default.py <broker url> <default queue> <task> <json args>
"""
import json
import sys

from celery import Celery

broker, default_queue, task, args = sys.argv[1:5]
app = Celery("producer", broker=broker)
# Celery's default exchange and routing key follow the default queue's name.
app.conf.task_default_queue = default_queue
app.conf.broker_connection_retry_on_startup = False
print(app.send_task(task, args=json.loads(args)).id)
