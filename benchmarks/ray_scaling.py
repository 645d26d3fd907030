"""Ray engine scaling on this machine: answers/s of ``api-prompt eval`` with the local engine and with the
Ray engine at 1 and 2 actors, side by side in one run, in three scenarios:

* ``demo, plain+api``: the in-process demo LLaVA and the demo CLIP, CPU-bound: each actor holds its own
  replica with one torch thread (Ray's default for a 1-CPU actor), the local engine uses all threads;
* ``served, plain+api``: ``tests/mock_openai_server.py`` on 127.0.0.1 answering after a fixed latency (a
  stand-in for a vLLM server), with the demo CLIP maps computed in each actor and ``--concurrency`` calls
  at once per actor (the local engine as many);
* ``served, plain``: the same mock with a longer latency, no maps, ``--io-concurrency`` calls at once per
  actor: pure waiting, the case where more actors (more requests in flight) pay.

Every run asks synthetic POPE questions (``--n`` per split). Ray is started once (``ray.init``, timed
apart), but each Ray run starts its own actors, which import torch and load the models: a fixed cost, paid
again by every run. Two rates are printed: end to end (answers / wall time) and steady (the answers after
the first chunk's, over the time from the first chunk's answers reaching the results log to the last
one's), the rate a long run approaches once the actors are up; "first" is the time to the first chunk.

Run::

    .venv/bin/python benchmarks/ray_scaling.py                       # 24 per split, latencies 0.2 / 0.5 s
    .venv/bin/python benchmarks/ray_scaling.py --json benchmarks/results/ray_scaling_cpu.json
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from bench_utils import environment, write_json

from agents.datasets import synthetic_items
from agents.eval_factories import build_attributor, build_target
from agents.eval_options import EvalOptions
from agents.eval_ray import RayOptions, evaluate_on_ray
from agents.eval_runner import evaluate
from agents.results_log import ResultsLog
from tests.mock_openai_server import MockChatServer

ENGINES: tuple[tuple[str, int], ...] = (("local", 0), ("ray", 1), ("ray", 2))


@dataclass(frozen=True)
class Scenario:
    """One target and workload: its label, target spec, modes, attributor spec and per-actor concurrency."""

    label: str
    target: str
    modes: tuple[str, ...]
    attributor: str | None
    concurrency: int | None


_stamps: list[float] = []
_append = ResultsLog.append


def _stamped_append(self: ResultsLog, record: dict[str, Any]) -> None:
    _append(self, record)
    _stamps.append(time.perf_counter())


ResultsLog.append = _stamped_append  # type: ignore[method-assign]  # when each answer reaches the log


def one_run(scenario: Scenario, engine: str, actors: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Time one evaluation of ``args.n`` questions per POPE split: answers, wall seconds, time to the first
    chunk's answers, end-to-end and steady answers/s."""
    items = synthetic_items("all", args.n)
    options = EvalOptions(progress=False, batch_size=args.batch_size, concurrency=scenario.concurrency)
    shutil.rmtree(out, ignore_errors=True)
    _stamps.clear()
    start = time.perf_counter()
    if engine == "local":
        chat = build_target(scenario.target)
        attributor = build_attributor(scenario.attributor, chat) if scenario.attributor else None
        evaluate(items, chat, out_dir=out, attributor=attributor, modes=scenario.modes, options=options)
    else:
        evaluate_on_ray(
            items, scenario.target, attributor=scenario.attributor, out_dir=out, modes=scenario.modes,
            options=options, ray_options=RayOptions(actors=actors),
        )  # fmt: skip
    wall = time.perf_counter() - start
    first_chunk = args.batch_size * len(scenario.modes)  # answers of the first chunk (all modes of 8 items)
    steady_span = _stamps[-1] - _stamps[first_chunk - 1]
    return {
        "answers": len(_stamps),
        "wall_s": wall,
        "first_chunk_s": _stamps[first_chunk - 1] - start,
        "end_to_end_per_s": len(_stamps) / wall,
        "steady_per_s": (len(_stamps) - first_chunk) / steady_span if steady_span > 0 else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=24, help="questions per POPE split (3 splits)")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the mock server takes per answer")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=8, help="served plain+api: most calls at once per actor")
    parser.add_argument("--io-latency", type=float, default=0.5, help="served plain: seconds per answer")
    parser.add_argument("--io-concurrency", type=int, default=2, help="served plain: most calls at once per actor")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()

    start = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, object_store_memory=256 * 1024**2, log_to_driver=False)
    ray_init = time.perf_counter() - start
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="ray-scaling-"))
    try:
        with (
            MockChatServer(latency=args.latency, lifetime=3600) as server,
            MockChatServer(latency=args.io_latency, lifetime=3600) as io_server,
        ):
            io_served = f"openai:mock@{io_server.openai_url}"
            served = f"openai:mock@{server.openai_url}"
            scenarios = (
                Scenario("demo, plain+api", "demo", ("plain", "api"), "demo", None),
                Scenario(f"served {args.latency:g} s, plain+api", served, ("plain", "api"), "demo", args.concurrency),
                Scenario(f"served {args.io_latency:g} s, plain", io_served, ("plain",), None, args.io_concurrency),
            )
            for scenario in scenarios:
                for engine, actors in ENGINES:
                    result = one_run(scenario, engine, actors, args, scratch / f"{engine}{actors}")
                    rows.append({"scenario": scenario.label, "engine": engine, "actors": actors or None, **result})
                    name = f"{engine} ({actors} actor{'s' if actors > 1 else ''})" if actors else engine
                    print(
                        f"{scenario.label:26s} {name:16s} {result['answers']:4d} answers"
                        f" | wall {result['wall_s']:6.1f} s | first chunk {result['first_chunk_s']:5.1f} s"
                        f" | end to end {result['end_to_end_per_s']:6.2f}/s | steady {result['steady_per_s']:6.2f}/s",
                        flush=True,
                    )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        ray.shutdown()
    print(f"ray.init (local, {args.cpus} CPUs): {ray_init:.1f} s")
    write_json(
        args.json,
        {"environment": environment(), "args": vars(args), "ray_init_s": ray_init, "rows": rows},
    )


if __name__ == "__main__":
    main()
