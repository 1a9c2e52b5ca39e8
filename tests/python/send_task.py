"""A Celery 5.7 producer as a team has it today: `send_task` to a named
queue, Celery declaring that queue with its own arguments. Prints the id.

    python send_task.py <broker url> <queue> <quorum|classic> <task> <json args>
"""
import json
import sys

from celery import Celery

broker, queue, queue_type, task, args = sys.argv[1:6]
app = Celery("producer", broker=broker)
app.conf.task_default_queue_type = queue_type
# A queue named in send_task(queue=...) is one Celery "creates if missing":
# its type comes from this setting (Celery 5.6+), not the default queue's.
app.conf.task_create_missing_queue_type = queue_type
app.conf.broker_connection_retry_on_startup = False
result = app.send_task(task, args=json.loads(args), queue=queue)
print(result.id)
