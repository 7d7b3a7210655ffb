"""Why a streaming query failed, in one line. Runs on the driver, once, when serve's query has failed.

A failed query's exception is a chain that crosses the JVM and Python more than once: the query's
``StreamingQueryException`` wraps what ``foreachBatch`` raised, which wraps a Spark job failure, which
wraps a task's exception, which for a Python worker is the text of a Python traceback. Printed whole it
is a hundred lines; the line a person needs is the root cause: the innermost Java exception with a
message, or the exception line of the innermost Python traceback. :func:`root_cause` finds it; :func:`one_line` is the
pure text part of that, tested without Spark.
"""

from __future__ import annotations

from typing import Any

from streamhydro.internals import java_exception_of

TRACEBACK = "Traceback (most recent call last):"
# Spark appends the query's description to a StreamingQueryException's message.
QUERY_DESCRIPTION = "\n=== Streaming Query ==="


def one_line(text: str) -> str:
    """The line of an exception's text that names the error: with a Python traceback in it, the exception
    line of the last one (its innermost cause, when tracebacks are nested in messages); else the first
    non-empty line."""
    text = text.split(QUERY_DESCRIPTION, 1)[0]
    if TRACEBACK in text:
        frames = text.rsplit(TRACEBACK, 1)[1].splitlines()
        for line in frames:
            if line.strip() and not line[0].isspace():
                return line.strip()
    return next((line.strip() for line in text.splitlines() if line.strip()), text.strip())


def _java_root(throwable: Any) -> str:
    """``toString()`` of the innermost cause of a py4j Java throwable that has a message (a bare
    ``java.io.EOFException`` under "Python worker exited unexpectedly" says less than its wrapper)."""
    described = throwable
    while throwable.getCause() is not None and not throwable.getCause().equals(throwable):
        throwable = throwable.getCause()
        if (throwable.getMessage() or "").strip():
            described = throwable
    return described.toString()


def root_cause(batch_error: BaseException | None, query_exception: Any | None) -> str:
    """The root cause of a failed query, in one line.

    ``batch_error``: what ``foreachBatch`` raised in this process (a py4j ``Py4JJavaError``, a PySpark
    captured exception, or a plain Python exception), when the failure came from a micro-batch;
    ``query_exception``: the query's Java ``StreamingQueryException`` (:func:`streamhydro.internals.query_exception_chain`),
    for failures outside ``foreachBatch`` (planning, offsets).
    """
    if batch_error is not None:
        java = java_exception_of(batch_error)
        if java is not None:
            return one_line(_java_root(java))
        return one_line(f"{type(batch_error).__module__}.{type(batch_error).__qualname__}: {batch_error}")
    if query_exception is not None:
        return one_line(_java_root(query_exception))
    return "the query stopped without an exception"
