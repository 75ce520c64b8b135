"""services.common.heap: objects alive at startup are never scanned by the collector again."""

from __future__ import annotations

import subprocess
import sys
import textwrap

PROBE = textwrap.dedent(
    """
    import gc
    import services.predictor.app  # torch, onnxruntime, FastAPI: the predictor's startup heap
    from services.common.heap import freeze_startup_heap

    tracked_before = len(gc.get_objects())
    freeze_startup_heap()
    # Everything that survived startup is frozen: a full collection has (almost) nothing old left
    # to walk.
    assert gc.get_freeze_count() >= tracked_before // 2, (gc.get_freeze_count(), tracked_before)
    assert len(gc.get_objects()) < 1_000, len(gc.get_objects())

    # Objects made afterwards are still collected: a reference cycle is freed by a collection.
    class Node:
        pass

    first, second = Node(), Node()
    first.other, second.other = second, first
    del first, second
    assert gc.collect() >= 2
    print("ok", tracked_before, gc.get_freeze_count())
    """
)


def test_freeze_startup_heap_exempts_startup_objects_but_still_collects_new_cycles() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok ")
