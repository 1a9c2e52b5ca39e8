"""The Celery app an operator points Flower and `celery inspect` at: only
the broker and Celery's exchange names (prefixed in tests).

    WARREN_BROKER=amqp://... EVENT_EXCHANGE=celeryev CONTROL_EXCHANGE=celery \
        python -m celery -A monitor flower --address=127.0.0.1 --port=5555
    ... python -m celery -A monitor inspect ping --json
"""
import os

from celery import Celery

app = Celery("monitor", broker=os.environ["WARREN_BROKER"])
app.conf.event_exchange = os.environ.get("EVENT_EXCHANGE", "celeryev")
app.conf.control_exchange = os.environ.get("CONTROL_EXCHANGE", "celery")
app.conf.broker_connection_retry_on_startup = True
