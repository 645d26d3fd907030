"""The Ray engine of ``api-prompt eval`` (``--engine ray``): the same run as the local engine, spread over
the actors of a Ray cluster (Ray Data batch inference).

How it runs:

* The pending questions become a Ray Dataset, one block per chunk of ``--batch-size`` questions (so every
  chunk, and the maps computed for it in one ``attribute_batch`` call, is the local engine's).
* ``map_batches`` runs the chunks on a pool of actors (:class:`EvalActor`). Each actor builds one replica
  of the models once: the attributor (``num_gpus`` per actor on a GPU cluster, CPU actors otherwise) and
  the target, which is either an in-process model (``demo``, a local directory; with ``self`` the
  attributor is that same model) or a client of a served endpoint (``openai:``/``ollama:``), called with
  at most ``--concurrency`` requests at once per actor (default: the batch size).
* The driver is the only writer: the actors return their records (and thumbnails), and the driver appends
  them to the same resumable ``results.jsonl`` as the local engine as each chunk finishes, in whatever
  order the chunks finish (a slow chunk holds back nothing; the reports sort by dataset order).
  A run killed at any point (SIGKILL of the driver included) resumes with ``--resume`` on either engine:
  what is in the log is never asked again, and nothing is lost or written twice.
* Reports, metrics and gallery are the local engine's (:func:`agents.eval_runner.run_evaluation`); the
  report adds the actor layout and a served target's request and token counts.

Ray: with no address a local Ray is started for the run (all CPUs, no dashboard, a small object store) and
shut down after; with ``--ray-address`` (``HOST:PORT`` of the head, ``auto`` on a cluster node, or
``ray://HOST:10001``) the existing cluster is joined unchanged. A process that already joined a Ray keeps
using it. On a cluster, every node needs this package installed and the images readable at the same paths
(a shared file system; ``scene:`` items need nothing).

Example:
    >>> from agents.datasets import synthetic_items
    >>> report = evaluate_on_ray(synthetic_items("all", 100), "demo", attributor="demo", out_dir="eval-ray",
    ...                          modes=("plain", "api"), ray_options=RayOptions(actors=2))  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from types import ModuleType
from typing import Any

from langchain_core.language_models import BaseChatModel
from PIL import Image

from agents.datasets import EvalItem
from agents.eval_factories import AttributorFactory, TargetFactory, attributor_factory, target_factory
from agents.eval_options import EvalOptions
from agents.eval_reports import EvalReport, store_thumbnail, thumbnail_file
from agents.eval_runner import (
    ChunkRunner,
    PendingRun,
    ProgressBar,
    add_usage,
    describe_error,
    failed_run_error,
    run_evaluation,
)
from agents.served import ServedChatModel
from api_tool import errors
from api_tool.errors import ApiPromptingError, EngineUnavailableError, EvalRunError, InvalidParameterError

LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2
"""Object store of a local Ray started for a run: rows are JSON text, so a small one is plenty."""
_THUMB_NAME = re.compile(r"^thumbs/[0-9a-f]+\.jpg$")
_PACKAGE_ERROR = re.compile(r"api_tool\.errors\.(\w+): (.+)")


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray engine runs.

    Attributes:
        address: a Ray cluster to join (``HOST:PORT``, ``auto``, ``ray://HOST:10001``); ``None`` starts a
            local Ray for the run.
        actors: size of the actor pool; ``None``: as many as the cluster's GPUs (or CPUs) fit, at most one
            per chunk.
        gpus_per_actor: GPUs each actor reserves; ``None``: 1 on a cluster with GPUs, else 0.
        cpus_per_actor: CPUs each actor reserves (also its torch threads).
        local_cpus: CPUs of a local Ray started here (``None``: all of this machine's).
    """

    address: str | None = None
    actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float = 1.0
    local_cpus: int | None = None

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise InvalidParameterError(f"actors must be at least 1, got {self.actors}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise InvalidParameterError(f"gpus_per_actor must be at least 0, got {self.gpus_per_actor}")
        if self.cpus_per_actor <= 0:
            raise InvalidParameterError(f"cpus_per_actor must be positive, got {self.cpus_per_actor}")
        if self.local_cpus is not None and self.local_cpus < 1:
            raise InvalidParameterError(f"local_cpus must be at least 1, got {self.local_cpus}")


def _import_ray() -> ModuleType:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise EngineUnavailableError(
            "--engine ray needs Ray Data: pip install 'langchain-api-prompting[ray]' (or 'ray[data]')"
        ) from exc
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a ``HOST:PORT`` nobody listens on (``ray.init`` would wait much longer)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise EngineUnavailableError(
            f"cannot reach the Ray cluster at {address} ({exc}); set --ray-address to the head's HOST:PORT "
            "(what `ray start --head` printed), 'auto' on a cluster node, or leave it out for a local Ray"
        ) from None


@contextmanager
def ray_session(options: RayOptions) -> Iterator[ModuleType]:
    """Ray for the block: the Ray this process already joined, else the cluster at ``options.address``,
    else a local Ray started now and shut down after the block.

    Raises ``EngineUnavailableError`` when Ray is not installed or the cluster cannot be joined.
    """
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    if options.address:
        _check_reachable(options.address)
        try:
            ray.init(address=options.address, **quiet)
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError or ValueError here
            raise EngineUnavailableError(
                f"cannot join the Ray cluster at {options.address} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); check --ray-address"
            ) from None
    else:
        ray.init(
            num_cpus=options.local_cpus,
            include_dashboard=False,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            **quiet,
        )
    try:
        yield ray
    finally:
        ray.shutdown()


class EvalActor:
    """One replica of the models (built once, in the actor), answering one chunk of questions per call.

    A call gets a batch of rows (``item``, ``modes``, ``plain``: JSON text) and returns rows of ``kind``
    and ``payload`` (JSON text): ``thumb`` (a thumbnail to write), ``record`` (a result, in answer order),
    ``usage`` (a served target's counts for the chunk), ``failure`` (the chunk's first failed question,
    after the answers obtained before it).
    """

    def __init__(
        self,
        make_target: TargetFactory,
        make_attributor: AttributorFactory | None,
        options: EvalOptions,
        identity: dict[str, Any],
    ) -> None:
        self.target: BaseChatModel = make_target()
        self.attributor = make_attributor(self.target) if make_attributor is not None else None
        self.options = options
        self.identity = identity

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        """Answer one chunk (see the class docstring)."""
        chunk = [
            (EvalItem(**json.loads(item)), json.loads(modes)) for item, modes in zip(batch["item"], batch["modes"])
        ]
        plain = {
            item.id: answer for (item, _), answer in zip(chunk, map(json.loads, batch["plain"])) if answer is not None
        }
        records: list[dict[str, Any]] = []
        thumbs: dict[str, bytes] = {}

        def thumbnail(image: Image.Image) -> str:
            name, data = thumbnail_file(image, self.options.thumb_side)
            thumbs[name] = data
            return name

        runner = ChunkRunner(self.target, self.attributor, self.options, records, thumbnail, self.identity)
        failures: list[tuple[str, str, str]] = []
        try:
            runner.run_chunk(chunk, plain)
        except EvalRunError:
            failures = [(item_id, mode, describe_error(exc)) for item_id, mode, exc in runner.failures]
        except Exception as exc:  # an attributor or image failure: reported like a failed question
            failures = [(chunk[0][0].id, "-", describe_error(exc))]
        rows: list[tuple[str, Any]] = [
            ("thumb", {"name": name, "jpeg": base64.b64encode(data).decode("ascii")}) for name, data in thumbs.items()
        ]
        rows += [("record", record) for record in records]
        if isinstance(self.target, ServedChatModel):
            rows.append(("usage", self.target.take_usage()))
        if failures:
            item_id, mode, error = failures[0]
            rows.append(("failure", {"count": len(failures), "id": item_id, "mode": mode, "error": error}))
        return {
            "kind": [kind for kind, _ in rows],
            "payload": [json.dumps(payload, ensure_ascii=False) for _, payload in rows],
        }


def _chunk_rows(chunk: Sequence[tuple[EvalItem, list[str]]], plain: dict[str, str]) -> dict[str, list[str]]:
    return {
        "item": [json.dumps(asdict(item), ensure_ascii=False) for item, _ in chunk],
        "modes": [json.dumps(modes) for _, modes in chunk],
        "plain": [json.dumps(plain.get(item.id), ensure_ascii=False) for item, _ in chunk],
    }


def _fitting_actors(ray: ModuleType, gpus: float, cpus: float) -> int:
    resources = ray.cluster_resources()
    if gpus > 0:
        return max(1, int(resources.get("GPU", 0) // gpus))
    return max(1, int(resources.get("CPU", 1) // cpus))


def _ray_failure(exc: BaseException) -> ApiPromptingError:
    """The package's own error inside a Ray error (a model an actor could not load...), else an
    ``EvalRunError`` naming the Ray error.

    An actor that fails in its constructor reaches the driver as ``ActorDiedError``, which keeps only the
    text of the actor's traceback: the package's error is rebuilt from its last line.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ApiPromptingError):
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
    raised = _PACKAGE_ERROR.findall(str(exc))
    if raised:
        name, message = raised[-1]
        kind = getattr(errors, name, None)
        if isinstance(kind, type) and issubclass(kind, ApiPromptingError):
            return kind(message)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return EvalRunError(
        f"the Ray run failed ({type(exc).__name__}: {first}); the answers obtained so far are saved, "
        "rerun with --resume to continue"
    )


def _consume(rows: Iterator[dict[str, Any]], run: PendingRun) -> None:
    """Write what the actors return, as it streams in: thumbnails, then each record to the log."""
    progress = ProgressBar(sum(len(modes) for _, modes in run.pending), run.options.progress)
    try:
        for row in rows:
            kind, payload = row["kind"], json.loads(row["payload"])
            if kind == "record":
                run.log.append(payload)
                progress.step(str(payload["mode"]))
            elif kind == "thumb" and _THUMB_NAME.match(payload["name"]):
                store_thumbnail(run.out_dir, payload["name"], base64.b64decode(payload["jpeg"]))
            elif kind == "usage":
                add_usage(run.usage, payload)
            elif kind == "failure":
                raise failed_run_error(payload["count"], payload["id"], payload["mode"], payload["error"])
    finally:
        progress.close()


def run_on_ray(
    make_target: TargetFactory, make_attributor: AttributorFactory | None, options: RayOptions, run: PendingRun
) -> None:
    """The Ray engine (see the module docstring): ask ``run.pending`` on a pool of :class:`EvalActor`
    and append every answer to ``run.log`` as it streams back. Nothing starts when nothing is pending."""
    if not run.pending:
        run.engine = {"engine": "ray", "actors": 0, "gpus_per_actor": 0, "cpus_per_actor": options.cpus_per_actor}
        return
    size = run.options.batch_size
    chunks = [run.pending[start : start + size] for start in range(0, len(run.pending), size)]
    with ray_session(options) as ray:
        import pyarrow as pa

        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        gpus = options.gpus_per_actor if options.gpus_per_actor is not None else (1.0 if has_gpus else 0.0)
        actors = min(len(chunks), options.actors or _fitting_actors(ray, gpus, options.cpus_per_actor))
        run.engine = {
            "engine": "ray",
            "actors": actors,
            "gpus_per_actor": gpus,
            "cpus_per_actor": options.cpus_per_actor,
            "ray_address": options.address or "local",
        }
        context = ray.data.DataContext.get_current()
        saved = (context.execution_options.preserve_order, context.enable_progress_bars)
        context.execution_options.preserve_order = False  # each chunk's records reach the log when it is done
        context.enable_progress_bars = False
        try:
            dataset = ray.data.from_arrow([pa.table(_chunk_rows(chunk, run.plain)) for chunk in chunks])
            answers = dataset.map_batches(
                EvalActor,
                fn_constructor_args=(make_target, make_attributor, run.options, run.identity),
                batch_size=None,  # one block = one chunk = one call
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=options.cpus_per_actor,
                num_gpus=gpus,
            )
            try:
                _consume(answers.iter_rows(), run)
            except (ApiPromptingError, KeyboardInterrupt):
                raise
            except Exception as exc:
                raise _ray_failure(exc) from exc
        finally:
            context.execution_options.preserve_order, context.enable_progress_bars = saved


def _factory_name(factory: object) -> str:
    return str(getattr(factory, "__qualname__", None) or repr(factory))


def evaluate_on_ray(
    items: Sequence[EvalItem],
    target: str | TargetFactory,
    *,
    out_dir: str | os.PathLike[str],
    attributor: str | AttributorFactory | None = None,
    modes: Sequence[str] = ("plain", "api"),
    resume: bool = False,
    options: EvalOptions | None = None,
    ray_options: RayOptions | None = None,
    target_name: str | None = None,
    attributor_name: str | None = None,
    data_name: str = "items",
    max_tokens: int | None = None,
    device: str | None = None,
) -> EvalReport:
    """:func:`agents.eval_runner.evaluate` on Ray: same arguments, results log, resume and reports, but the
    models are built in the actors, so they are given as specs or picklable factories.

    Args:
        target: a target spec (``demo``, a local directory, ``openai:MODEL@BASE_URL``,
            ``ollama:MODEL@HOST``; a served one is checked here, once) or a picklable function that
            builds the chat model.
        attributor: an attributor spec (``demo``, ``clip:...``, ``self``...) or a picklable function of the
            target that builds it; ``None`` when no mode needs maps.
        ray_options: where and how wide to run (:class:`RayOptions`).
        max_tokens, device: for targets and attributors built from specs.
        items, out_dir, modes, resume, options, target_name, attributor_name, data_name: as
            :func:`agents.eval_runner.evaluate` (names default to the specs).

    A run of either engine resumes on the other: both keep the same log and names.

    Raises what :func:`agents.eval_runner.evaluate` raises, plus ``EngineUnavailableError`` (no Ray, or a
    cluster that cannot be joined) and ``TargetUnavailableError`` (a served target that is misconfigured
    or unreachable), both before anything is asked.

    Example:
        >>> evaluate_on_ray(items, "openai:qwen@http://127.0.0.1:8000/v1", attributor="demo",
        ...                 out_dir="eval-qwen", modes=("plain", "api", "verify"))  # doctest: +SKIP
    """
    _import_ray()
    make_target = target_factory(target, max_tokens=max_tokens, device=device) if isinstance(target, str) else target
    make_attributor = attributor_factory(attributor, device=device) if isinstance(attributor, str) else attributor
    if attributor_name is None and attributor is not None:
        attributor_name = attributor if isinstance(attributor, str) else _factory_name(attributor)
    return run_evaluation(
        items,
        partial(run_on_ray, make_target, make_attributor, ray_options or RayOptions()),
        out_dir=out_dir,
        modes=modes,
        resume=resume,
        options=options,
        target_name=target_name or (target if isinstance(target, str) else _factory_name(target)),
        attributor_name=attributor_name,
        has_attributor=make_attributor is not None,
        data_name=data_name,
    )
