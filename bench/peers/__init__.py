"""Peer systems gc-fabric is measured against: raw AMQP, Celery and Parsl HTEX."""
