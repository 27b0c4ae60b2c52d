"""Collects the messages of Prefect's flow- and task-run loggers while a flow runs in the test process."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextmanager
def run_log_lines() -> Iterator[list[str]]:
    """The run loggers' messages, as a list that fills while the block runs."""
    handler = LogLines()
    loggers = [logging.getLogger(n) for n in RUN_LOGGERS]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield handler.lines
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
