"""How the compiled decoder's kernels are chosen, so that a busy machine cannot freeze a slow
choice, and the check that the compiled step is as fast as it should be.

Inductor's ``max_autotune`` times each matmul's candidate kernels once (the median of 100 ms of
runs) and keeps the fastest; the choice is built into the package, which the cache keeps for
good. A first start on a busy machine once picked the eager kernel for 3 of 5 shapes on
visibly distorted timings. Here every candidate is timed in ``ROUNDS`` interleaved rounds and
judged by its minimum (load only ever adds time); Inductor's own cache of autotune results is
not used, so a re-tune times afresh. After compiling, the compiled step is timed against the
same Program run eagerly on the same weights. Both go into the package's tuning record
(``<package>.tuning.json``), and a compiled step that gains less than ``MIN_GAIN`` over eager
logs a warning naming ``textgen pull --retune``, then and at every start.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from textgen.models.cache import record_path

log = logging.getLogger(__name__)

ROUNDS = 3
# A compiled one-row step slower than the same program run eagerly has a bad kernel choice.
# How much faster it should be depends on the model: 2.3-4x for the small ones (the fused small
# operations weigh most), 1.1-1.3x for TinyLlama and phi-2, whose int4 matmuls take the same
# time either way at one row (bench/RESULTS.md, "The seeds' models").
MIN_GAIN = 1.0
STEP_REPEATS = 10
RETUNE = "textgen pull --retune"


class Tuning:
    """The timings of one compile: each autotuned matmul's candidates, round by round."""

    def __init__(self) -> None:
        self.matmuls: list[dict[str, Any]] = []
        # Each matmul's best timings (in its candidates' order), by its inputs and candidates.
        self.seen: dict[Any, list[float]] = {}

    def timed(self, rounds: list[dict[str, float]], shapes: list[list[int]]) -> dict[str, float]:
        """Record a matmul's rounds of timings (ms by candidate); the minimum of each."""
        best = {name: min(r[name] for r in rounds) for name in rounds[0]}
        first = min(rounds[0], key=rounds[0].__getitem__)
        chosen = min(best, key=best.__getitem__)
        self.matmuls.append(
            {
                "shapes": shapes,
                "rounds_ms": {name: [round(r[name], 4) for r in rounds] for name in rounds[0]},
                "chosen": chosen,
                # The first round alone would have chosen otherwise: timings distorted by load.
                "first_round_disagreed": first != chosen,
            }
        )
        return best

    @contextmanager
    def robust(self) -> Iterator[None]:
        """While Inductor compiles: every candidate timed in ROUNDS rounds, judged by its
        minimum, and recorded here (Inductor's autotune cache not consulted or written)."""
        from torch._inductor import config
        from torch._inductor.select_algorithm import AlgorithmSelectorCache as Selector

        descriptor = Selector.__dict__["benchmark_choices"]  # a classmethod
        original = descriptor.__func__
        tuning = self

        def benchmark_choices(cls: Any, choices: Any, autotune_args: Any, **kwargs: Any) -> Any:
            names = {choice: kernel_name(choice, i) for i, choice in enumerate(choices)}
            inputs = autotune_args.extern.input_tensors
            # The same matmul in every layer is timed once per compile (Inductor's own cache,
            # bypassed, did that too): 5 shapes, not 121 matmuls, in the embedded model.
            key = (
                tuple((tuple(t.shape), t.stride(), str(t.dtype)) for t in inputs),
                tuple(kernel_key(choice) for choice in choices),
            )
            if key not in tuning.seen:  # timings in the order of the choices
                rounds = [original(cls, choices, autotune_args, **kwargs) for _ in range(ROUNDS)]
                by_name = [{names[c]: t for c, t in r.items()} for r in rounds]
                best = tuning.timed(by_name, [list(t.shape) for t in inputs])
                tuning.seen[key] = [best[names[choice]] for choice in choices]
            return dict(zip(choices, tuning.seen[key], strict=True))

        # Inductor picks the candidate with the least time in what this returns.
        Selector.benchmark_choices = classmethod(benchmark_choices)  # type: ignore[method-assign,assignment]
        try:
            with config.patch(autotune_local_cache=False, autotune_remote_cache=False):
                yield
        finally:
            Selector.benchmark_choices = descriptor  # type: ignore[method-assign]


def kernel_name(choice: Any, index: int) -> str:
    """A candidate's name, unique among its matmul's candidates."""
    return f"{index}:{getattr(choice, 'name', type(choice).__name__)}"


def kernel_key(choice: Any) -> str:
    """What identifies a candidate's kernel across matmuls (its name carries a counter)."""
    try:
        return str(choice.hash_key())
    except (AttributeError, NotImplementedError):
        return type(choice).__name__


def step_ms(run: Callable[[], Any]) -> float:
    """The minimum of STEP_REPEATS timed runs of a step, in ms (after one untimed run)."""
    with torch.inference_mode():
        run()
        times = []
        for _ in range(STEP_REPEATS):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
    return min(times) * 1000


def check(
    compiled_step: Callable[[], Any], eager_step: Callable[[], Any]
) -> dict[str, float | bool]:
    """The compiled step against the eager one, timed alternately; whether it gains enough."""
    compiled_ms, eager_ms = [], []
    for _ in range(2):
        compiled_ms.append(step_ms(compiled_step))
        eager_ms.append(step_ms(eager_step))
    fast, slow = min(compiled_ms), min(eager_ms)
    return {
        "compiled_step_ms": round(fast, 3),
        "eager_step_ms": round(slow, 3),
        "gain": round(slow / fast, 2),
        "ok": slow / fast >= MIN_GAIN,
    }


def write_record(package: Path, tuning: Tuning, result: dict[str, Any]) -> dict[str, Any]:
    """The tuning record beside ``package`` (written whole, then renamed)."""
    distorted = sum(matmul["first_round_disagreed"] for matmul in tuning.matmuls)
    if distorted:
        log.info(
            "kernel timings disagreed between rounds for %d of %d matmuls (a busy machine): "
            "each was chosen by its fastest of %d rounds",
            distorted, len(tuning.matmuls), ROUNDS,
        )  # fmt: skip
    record = {
        "package": package.name,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "check": result,
        "matmuls": tuning.matmuls,
    }
    target = record_path(package)
    staging = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(record, indent=1))
    os.replace(staging, target)
    return record


def warn_if_slow(package: Path, record: dict[str, Any] | None = None) -> None:
    """Log a warning when a package's check found its step too slow (at compile time, and at
    every start from its record)."""
    if record is None:
        try:
            record = json.loads(record_path(package).read_text())
        except (OSError, ValueError):
            return
    check_result = record.get("check", {})
    if check_result.get("ok", True):
        return
    log.warning(
        "the compiled decoder %s runs a step in %.2f ms against %.2f ms uncompiled (%.2fx, "
        "expected %.2fx or more): its kernels were probably chosen on a busy machine. Run `%s` "
        "when the machine is quiet (the timings are in %s)",
        package.name, check_result.get("compiled_step_ms"), check_result.get("eager_step_ms"),
        check_result.get("gain"), MIN_GAIN, RETUNE, record_path(package).name,
    )  # fmt: skip
