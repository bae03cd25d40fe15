"""Progress events: what a suite reports while it runs, typed, so the CLI can render each kind its own way
without parsing text.

An event is a ``str`` (the line as printed) that also carries its fields: a plain ``progress`` callback
(``print``, ``list.append``) keeps working, and a renderer dispatches on the type (``clbench.cli`` draws
:class:`RunStarted` as a rule and explains the accuracy columns before the first :class:`TaskDone`). Events of one
run are prefixed with ``[LABEL seed S]`` by :meth:`Event.within`, keeping their type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Progress = Callable[[str], None]  # the reporter protocol: called with each event (a str)


class Event(str):
    """A progress line with its fields as attributes (``fields``)."""

    fields: dict[str, Any]

    def __new__(cls, text: str, **fields: Any) -> Event:
        event = super().__new__(cls, text)
        event.fields = fields
        for name, value in fields.items():
            setattr(event, name, value)
        return event

    def within(self, prefix: str) -> Event:
        """The same event, its line prefixed (a run's ``[LABEL seed S] ``)."""
        event = Event.__new__(type(self), prefix + str(self), **self.fields)
        return event


class Note(Event):
    """Any other line: what happens, in words."""


class RunStarted(Event):
    """Run ``index`` of ``total`` of this invocation starts: ``label`` seed ``seed``."""

    def __new__(cls, index: int, total: int, label: str, seed: int) -> RunStarted:
        return super().__new__(cls, f"run {index} of {total}: {label} seed {seed}", index=index, total=total,
                               label=label, seed=seed)


class TaskDone(Event):
    """Task ``task`` (from 0) of ``num_tasks`` is trained and evaluated: CIL and TIL accuracy over the seen tasks,
    seconds of training and of the method's task-level hooks."""

    def __new__(cls, task: int, num_tasks: int, acc: float, acc_til: float, train_seconds: float,
                method_seconds: float) -> TaskDone:
        return super().__new__(cls, f"task {task + 1}/{num_tasks} done: acc {acc:.2f} (til {acc_til:.2f}) "
                               f"train {train_seconds:.1f}s method {method_seconds:.1f}s", task=task,
                               num_tasks=num_tasks, acc=acc, acc_til=acc_til, train_seconds=train_seconds,
                               method_seconds=method_seconds)


def within(event: str, prefix: str) -> str:
    """``event`` prefixed, keeping its type when it is an :class:`Event`."""
    return event.within(prefix) if isinstance(event, Event) else prefix + event
