"""engine.models.heap: large blocks reused inside ``heap_kept``, released after it (glibc only)."""

import resource

import numpy as np
import pytest

from cluster.profiles import LocalProfile
from engine.models import heap

pytestmark = pytest.mark.skipif(heap._LIBC is None, reason="tunes glibc's malloc only")

BLOCK = 64 << 20  # above glibc's largest adaptive mmap threshold (32 MiB)


def page_faults_of_a_block() -> int:
    """Minor page faults while one block is allocated, written and freed (a 3D CNN step's largest array)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.ones(BLOCK, dtype=np.uint8)
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_large_blocks_are_reused_while_kept_and_released_after():
    page_faults_of_a_block()
    fresh = page_faults_of_a_block()  # every block a new mapping: its pages fault in again
    assert fresh >= BLOCK // (2 << 20)  # at least one fault per page, even with 2 MiB pages
    with heap.heap_kept():
        page_faults_of_a_block()  # the heap grows once
        with heap.heap_kept():  # nested (another task's thread): the outer setting stays
            assert page_faults_of_a_block() <= fresh / 8
        assert page_faults_of_a_block() <= fresh / 8
    assert page_faults_of_a_block() >= fresh / 2  # trimmed on leaving: the memory went back to the system


def test_large_blocks_are_reused_in_a_local_workers_task_thread():
    """Dask runs a task in a thread of the worker process; with the workers' environment
    (cluster.running.WORKER_ENVIRONMENT: one malloc arena) ``heap_kept`` works there as in the main thread."""

    def fresh_and_kept_faults():
        import resource

        import numpy as np

        from engine.models import heap

        def faults():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            block = np.ones(64 << 20, dtype=np.uint8)
            del block
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

        faults()
        fresh = faults()
        with heap.heap_kept():
            faults()
            return fresh, faults()

    with LocalProfile(n_workers=1).start() as running:
        fresh, kept = running.client.submit(fresh_and_kept_faults).result()
    assert fresh >= BLOCK // (2 << 20)
    assert kept <= fresh / 8
