"""Thin gRPC servicers: translate protos to records, call the Director, translate back."""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator

from fedjax_core import pki, serde
from fedjax_core import records as r
from fedjax_core.director import limits, metric_stream, paging
from fedjax_core.director.callers import Caller, Refusals, check_envoy_identity
from fedjax_core.director.concurrency import MAX_LONG_POLL_S, Flow
from fedjax_core.director.core import Director
from fedjax_core.director.uploads import Spooled
from fedjax_core.errors import FedError, InvalidRequestError, PermissionDeniedError
from fedjax_core.transport import SMALL_UPDATE_BYTES, maps_errors
from fedjax_proto import envoy_service_pb2 as env_pb
from fedjax_proto import envoy_service_pb2_grpc as env_grpc
from fedjax_proto import federation_service_pb2 as fed_pb
from fedjax_proto import federation_service_pb2_grpc as fed_grpc
from fedjax_proto import tensors_pb2 as t_pb

log = logging.getLogger("fedjax.director")
BUNDLE_CHUNK = 1 << 20
INLINE_MODELS_KEPT = 8  # round models whose inline messages are kept made (one a round per running experiment)
MAX_EVENT_BATCH_BYTES = 1 << 20  # a StreamMetricBatches message holds events up to this size (one at least)


def _update_chunks(messages: Iterable) -> Iterator[r.TensorChunk]:
    """The tensor chunks of an update's messages after its header."""
    for msg in messages:
        if not msg.HasField("chunk"):
            raise InvalidRequestError("only tensor chunks may follow the update header")
        yield from serde.unpacked_chunks(msg.chunk)


class EnvoyServicer(env_grpc.EnvoyServiceServicer):
    """Plain methods are short calls, run on the server's thread pool; coroutines wait or transfer through
    ``flow`` (see :mod:`fedjax_core.director.concurrency`)."""

    def __init__(self, director: Director, flow: Flow, refusals: Refusals | None = None):
        self.director = director
        self.flow = flow
        self.refusals = refusals or Refusals(director.audit)
        self._keeps = flow.batches(self._keep, "director-keeper")  # small uploads' group commit
        self._inline_protos: dict[int, tuple[list[r.TensorChunk], list[t_pb.TensorChunk]]] = {}

    def _check_identity(self, caller: Caller, envoy_name: str) -> None:
        check_envoy_identity(caller, envoy_name, self.refusals)

    @maps_errors
    def RegisterEnvoy(self, request, context):
        caller = Caller.of(context)
        self._check_identity(caller, request.envoy_name)
        info = serde.shard_info_from_proto(request.shard_info)
        try:
            period = self.director.register_envoy(request.envoy_name, info, request.instance_id)
        except PermissionDeniedError:
            raise  # audited by the refusal itself
        except FedError as exc:
            self.director.audit.refused(caller.common_name, caller.peer, call="RegisterEnvoy",
                                        envoy=request.envoy_name, reason=str(exc))
            raise
        self.director.audit.record(r.AuditAction.REGISTER, caller.common_name, caller.peer, envoy=request.envoy_name,
                                   train_size=info.train_size, valid_size=info.valid_size, hostname=info.hostname)
        return env_pb.RegisterEnvoyResponse(health_check_period_s=period)

    @maps_errors
    async def Heartbeat(self, request, context):
        self._check_identity(Caller.of(context), request.envoy_name)
        if self.director.heartbeat_in_memory(request.envoy_name, request.instance_id):  # most: no thread, no wait
            return env_pb.HeartbeatResponse(known=True)
        known = await self.flow.heartbeat(self.director.heartbeat, request.envoy_name, request.instance_id)
        return env_pb.HeartbeatResponse(known=known)

    @maps_errors
    async def WaitExperiment(self, request, context):
        envoy = request.envoy_name
        self._check_identity(Caller.of(context), envoy)
        async with self.flow.waiting(context):
            sent: set[str] = set()
            while not self.director.closed:
                # its own key: an experiment starts (or the director closes) with a change for everyone, so the
                # envoy's own changes (each report, upload, heartbeat) need not wake this stream
                names = await self.flow.poll(("experiments", envoy),
                                             lambda: self.director.workers.experiment_for(envoy, sent),
                                             lambda found: bool(found) or self.director.closed, MAX_LONG_POLL_S)
                for name in names:
                    sent.add(name)
                    submitter, sha256, running = await self.flow.short(self._describe, envoy, name)
                    yield env_pb.WaitExperimentResponse(experiment_name=name, submitter=submitter,
                                                        bundle_sha256=sha256, running=running)

    def _describe(self, envoy: str, name: str) -> tuple[str, str, list[str]]:
        catalog = self.director.catalog
        return catalog.experiment_submitter(name), catalog.experiment_bundle_sha256(name), catalog.working_on(envoy)

    @maps_errors
    async def GetExperimentBundle(self, request, context):
        self._check_identity(Caller.of(context), request.envoy_name)
        path = await self.flow.short(self.director.workers.experiment_bundle, request.envoy_name, request.experiment_name)

        def chunks() -> Iterator[env_pb.BundleChunk]:
            size = path.stat().st_size
            with open(path, "rb") as f:
                while data := f.read(BUNDLE_CHUNK):
                    yield env_pb.BundleChunk(data=data, total_size=size)

        await self.flow.send(context, "GetExperimentBundle", chunks())

    @maps_errors
    async def WaitTask(self, request, context):
        envoy, experiment = request.envoy_name, request.experiment_name
        self._check_identity(Caller.of(context), envoy)
        if math.isnan(request.max_wait_s):  # min/max pass NaN through, and a NaN timeout never expires
            raise InvalidRequestError(f"max_wait_s is NaN; give the seconds to wait (0 to {MAX_LONG_POLL_S:g})")
        wait = min(max(request.max_wait_s, 0.0), MAX_LONG_POLL_S)
        async with self.flow.waiting(context):
            return await self._next_task(envoy, experiment, wait, request.inline_model)

    async def _next_task(self, envoy: str, experiment: str, wait: float, inline: bool) -> env_pb.WaitTaskResponse:
        """``envoy``'s next task in ``experiment`` (with its round's model when ``inline`` and small), waiting up to
        ``wait`` seconds for one; the caller holds a waiting slot."""
        workers = self.director.workers
        task, model = await self.flow.poll(
            envoy, lambda: workers.task_with_model(envoy, experiment, inline),
            lambda found: found[0].kind != r.TaskKind.NONE or self.director.closed, wait,
            peek=lambda: workers.task_in_memory(envoy, experiment, inline))
        response = serde.task_to_proto(task)
        if model is not None:
            response.model.extend(self._model_protos(model))
            response.model_inline = True
        return response

    def _model_protos(self, model: list[r.TensorChunk]) -> list[t_pb.TensorChunk]:
        """The messages of a round's inline model, made once for all its participants: the model cache hands
        each of them the same list."""
        made = self._inline_protos.get(id(model))
        if made is None or made[0] is not model:
            made = (model, list(serde.chunk_protos(model)))
            self._inline_protos[id(model)] = made  # holding ``model`` keeps its id from being reused
            while len(self._inline_protos) > INLINE_MODELS_KEPT:
                self._inline_protos.pop(next(iter(self._inline_protos)))
        return made[1]

    @maps_errors
    async def GetRoundModel(self, request, context):
        self._check_identity(Caller.of(context), request.envoy_name)
        messages = self.director.workers.round_model(request.envoy_name, request.experiment_name, request.round)
        await self.flow.send(context, "GetRoundModel", messages)

    @maps_errors
    def ReportMetrics(self, request, context):
        self._check_identity(Caller.of(context), request.envoy_name)
        self.director.workers.report_metrics(request.envoy_name, request.experiment_name, request.round, request.stage,
                                     serde.metrics_from_proto(request.metrics), request.sample_count)
        return env_pb.ReportMetricsResponse()

    @maps_errors
    async def UploadUpdate(self, request_iterator, context):
        caller = Caller.of(context)
        stored = []  # the header of the update consume() or here() stored

        def consume(requests: Iterator) -> int:
            first = next(requests, None)
            if first is None or not first.HasField("header"):
                raise InvalidRequestError("an update stream must start with its header")
            h = first.header
            self._check_identity(caller, h.envoy_name)
            stored.append(h)
            return self.director.uploads.accept_update(h.envoy_name, h.experiment_name, h.round, h.train_sample_count,
                                                       _update_chunks(requests), (h.clip_norm, h.noise_std),
                                                       [serde.stage_report_from_proto(m) for m in h.reports])

        def here(messages: list) -> Awaitable[int] | None:  # read whole: spooled on the loop, kept with others
            if not messages or not messages[0].HasField("header"):
                return None  # consume says what is wrong
            h = messages[0].header
            self._check_identity(caller, h.envoy_name)
            spooled = self.director.uploads.spool_here(
                h.envoy_name, h.experiment_name, h.round, h.train_sample_count, _update_chunks(messages[1:]),
                (h.clip_norm, h.noise_std), [serde.stage_report_from_proto(m) for m in h.reports])
            if spooled is None:
                return None
            stored.append(h)
            return self._keeps.run(spooled)

        def admit(first) -> None:  # who and whether, before the upload takes a slot
            if first.HasField("header"):
                h = first.header
                self._check_identity(caller, h.envoy_name)
                self.director.uploads.check_upload(h.envoy_name, h.experiment_name, h.round,
                                                   [serde.stage_report_from_proto(m) for m in h.reports])

        def admit_here(first) -> bool:  # the same from memory, on the loop, when it can tell at once
            if not first.HasField("header"):
                return False
            h = first.header
            self._check_identity(caller, h.envoy_name)
            return self.director.uploads.admit_upload_in_memory(
                h.envoy_name, h.experiment_name, h.round, [serde.stage_report_from_proto(m) for m in h.reports])

        received = await self.flow.receive(context, "UploadUpdate", consume, admit=admit, admit_here=admit_here,
                                           here=here)
        response = env_pb.UploadUpdateResponse(bytes_received=received)
        if stored and stored[0].next_task_wait_s > 0:  # NaN is not: answered at once, as an older director would
            response.next_task.CopyFrom(await self._task_after_upload(stored[0]))
        return response

    @maps_errors
    async def UploadSmallUpdate(self, request, context):
        h = request.header
        self._check_identity(Caller.of(context), h.envoy_name)
        unpacked = [c for m in request.chunks for c in serde.unpacked_chunks(m)]
        size = sum(len(c.data) for c in unpacked)
        if size > SMALL_UPDATE_BYTES:
            raise InvalidRequestError(f"a small update holds at most {SMALL_UPDATE_BYTES >> 10} KiB of tensors, this "
                                      f"one {size >> 10} KiB: send it with UploadUpdate's stream")
        uploads = self.director.uploads
        args = (h.envoy_name, h.experiment_name, h.round, h.train_sample_count)
        chunks = lambda: iter(unpacked)  # noqa: E731
        applied, reports = (h.clip_norm, h.noise_std), [serde.stage_report_from_proto(m) for m in h.reports]
        async with self.flow.upload_slot():
            spooled = uploads.spool_here(*args, chunks(), applied, reports)
            if spooled is not None:
                received = await self._keeps.run(spooled)
            else:  # only accept_update can tell: on a thread, as a streamed upload
                received = await self.flow.transfer(uploads.accept_update, *args, chunks(), applied, reports)
        response = env_pb.UploadUpdateResponse(bytes_received=received)
        if h.next_task_wait_s > 0:  # NaN is not
            response.next_task.CopyFrom(await self._task_after_upload(h))
        return response

    def _keep(self, spooled: list[Spooled]) -> list[int | BaseException]:
        """On the keeper thread: keep a batch of spooled uploads; a round one of them completes closes on the
        transfer pool, so that the next batch need not wait for it."""
        answers = self.director.uploads.keep_spooled(spooled)
        for item, answer in zip(spooled, answers):
            if not isinstance(answer, BaseException) and answer[1]:
                self.flow.spawn(f"closing round {item.round} of {item.run.name!r}", self.director.after,
                                item.run, answer[1])
        return [answer if isinstance(answer, BaseException) else answer[0] for answer in answers]

    async def _task_after_upload(self, h) -> env_pb.WaitTaskResponse:
        """The next task a stored upload's header asked for: never an error now that the update is kept (the
        worker would retry an upload that succeeded), but NONE when it cannot wait or look, and it calls WaitTask."""
        if not self.flow.has_room():
            return env_pb.WaitTaskResponse()
        try:
            async with self.flow.waiting():
                return await self._next_task(h.envoy_name, h.experiment_name, min(h.next_task_wait_s, MAX_LONG_POLL_S),
                                             h.inline_model)
        except Exception:
            log.warning("the next task of %r after its upload could not be looked up; it will ask for it",
                        h.envoy_name, exc_info=True)
            return env_pb.WaitTaskResponse()

    @maps_errors
    def SecAgg(self, request, context):
        self._check_identity(Caller.of(context), request.envoy_name)
        step = request.WhichOneof("step")
        if step is None:
            raise InvalidRequestError("a SecAgg request carries keys, shares or reveal")
        items = dict(getattr(request, step).items) if step in ("shares", "reveal") else None
        keys = serde.secagg_keys_from_proto(request.keys) if step == "keys" else None
        limits.check_secagg(items)
        self.director.workers.secure_step(request.envoy_name, request.experiment_name, request.round, step, keys,
                                          items)
        return env_pb.SecAggResponse()

    @maps_errors
    def ReportFailure(self, request, context):
        self._check_identity(Caller.of(context), request.envoy_name)
        self.director.workers.report_failure(request.envoy_name, request.experiment_name, request.error,
                                     request.round if request.HasField("round") else None, request.worker_lost,
                                     request.refused)
        return env_pb.ReportFailureResponse()

    @maps_errors
    def CheckIn(self, request, context):
        self._check_identity(Caller.of(context), request.envoy_name)
        upload = self.director.workers.check_in(request.envoy_name, request.experiment_name, request.round,
                                        request.divergence)
        return env_pb.CheckInResponse(upload=upload)


class FederationServicer(fed_grpc.FederationServiceServicer):
    def __init__(self, director: Director, flow: Flow, submitters: frozenset[str] = frozenset({"api"}),
                 refusals: Refusals | None = None):
        self.director = director
        self.flow = flow
        self.submitters = submitters
        self.refusals = refusals or Refusals(director.audit)

    def _check_submitter(self, caller: Caller, submitting: bool = False) -> None:
        """Under mTLS only the certificates named in settings.submitters (and, except to submit, those of role
        admin) may use the notebook API."""
        if submitting or caller.role != pki.ADMIN:
            self._check_named(caller)

    def _check_named(self, caller: Caller) -> None:
        if caller.common_name is not None and caller.common_name not in self.submitters:
            self.refusals.refuse(caller.peer, caller.common_name, PermissionDeniedError(
                f"the client certificate {caller.common_name!r} may not use the notebook API; this director allows "
                f"{', '.join(sorted(self.submitters))} (settings.submitters in its config)"))

    @maps_errors
    def GetDatasetInfo(self, request, context):
        self._check_submitter(Caller.of(context))
        sample, target = self.director.catalog.dataset_info()
        return fed_pb.GetDatasetInfoResponse(sample_shape=list(sample), target_shape=list(target))

    @maps_errors
    def GetShardRegistry(self, request, context):
        self._check_submitter(Caller.of(context))
        limit = paging.page_size(request.page_size)
        entries = self.director.catalog.shard_registry(paging.name_token(request.page_token), limit + 1)
        page, token = paging.fill(((e.name, serde.envoy_entry_to_proto(e)) for e in entries), limit)
        return fed_pb.GetShardRegistryResponse(envoys=page, next_page_token=token)

    @maps_errors
    async def SubmitExperiment(self, request_iterator, context):
        caller = Caller.of(context)
        self._check_submitter(caller, submitting=True)

        def consume(requests: Iterator) -> int:
            first = next(requests, None)
            if first is not None and first.HasField("spec"):
                spec = serde.experiment_spec_from_proto(first.spec)
            elif first is not None and first.HasField("header"):  # a fedjax-core 0.1.0 notebook
                spec = serde.spec_from_legacy_header(first.header)
            else:
                raise InvalidRequestError("an experiment submission must start with its spec")
            if caller.common_name is not None:  # under mTLS the certificate names the submitter, not the client
                spec = dataclasses.replace(spec, submitter=caller.common_name)
            submitted["spec"] = spec
            pending: list = []

            def bundle() -> Iterator[bytes]:
                for msg in requests:
                    if msg.HasField("bundle_data"):
                        yield msg.bundle_data
                    elif msg.HasField("chunk"):
                        pending.extend(serde.unpacked_chunks(msg.chunk))
                        return
                    else:
                        raise InvalidRequestError("a second spec in one submission")

            def chunks() -> Iterator:
                yield from pending
                for msg in requests:
                    if not msg.HasField("chunk"):
                        raise InvalidRequestError("bundle data must come before the model's tensor chunks")
                    yield from serde.unpacked_chunks(msg.chunk)

            return self.director.submit_experiment(spec, bundle(), chunks())

        submitted: dict = {}
        audit = self.director.audit
        try:
            position = await self.flow.receive(context, "SubmitExperiment", consume, submission=True)
        except PermissionDeniedError:
            raise
        except FedError as exc:
            spec = submitted.get("spec")
            await self.flow.short(functools.partial(
                audit.refused, caller.common_name or getattr(spec, "submitter", ""), caller.peer,
                getattr(spec, "name", ""), call="SubmitExperiment", reason=str(exc)))
            raise
        spec = submitted["spec"]
        sha256 = await self.flow.short(self.director.catalog.experiment_bundle_sha256, spec.name)
        await self.flow.short(functools.partial(
            audit.record, r.AuditAction.SUBMIT, spec.submitter, caller.peer, spec.name, owner=spec.submitter,
            bundle_sha256=sha256,
            envoys=list(spec.envoys) or "every online envoy", rounds=spec.rounds, queue_position=position))
        return fed_pb.SubmitExperimentResponse(queue_position=position)

    @maps_errors
    def ListExperiments(self, request, context):
        caller = Caller.of(context)
        self._check_submitter(caller)
        limit = paging.page_size(request.page_size)
        rows = self.director.catalog.experiments(caller.viewer, paging.sequence_token(request.page_token), limit + 1)
        page, token = paging.fill(((str(seq), serde.status_to_proto(s)) for seq, s in rows), limit)
        return fed_pb.ListExperimentsResponse(experiments=page, next_page_token=token)

    @maps_errors
    def GetExperimentStatus(self, request, context):
        caller = Caller.of(context)
        self._check_submitter(caller)
        return serde.status_to_proto(self.director.catalog.experiment_status(request.name, caller.viewer))

    @maps_errors
    async def StreamMetrics(self, request, context):
        """Every event of the experiment so far, then new ones as they come, then a final 'done' event."""
        async for events in self._event_lists(request, context):
            for event in events:
                yield serde.metric_event_to_proto(event)

    @maps_errors
    async def StreamMetricBatches(self, request, context):
        """StreamMetrics' events, those of each look together (up to MAX_EVENT_BATCH_BYTES a message): with
        hundreds of envoys reporting, one message a look instead of one an event."""
        async for events in self._event_lists(request, context):
            for batch in serde.metric_event_batches(events, MAX_EVENT_BATCH_BYTES):
                yield batch

    async def _event_lists(self, request, context) -> AsyncIterator[list[r.MetricEvent]]:
        """The experiment's events look by look (``metric_stream.event_lists``), once the caller may see it."""
        caller = Caller.of(context)
        self._check_submitter(caller)
        name = request.experiment_name
        await self.flow.short(self.director.catalog.experiment_status, name, caller.viewer)  # NOT_FOUND before anything
        async for events in metric_stream.event_lists(self.director, self.flow, name, request.snapshot, context):
            yield events

    @maps_errors
    def CancelExperiment(self, request, context):
        caller = Caller.of(context)
        self._check_submitter(caller)
        status = self.director.cancel_experiment(request.name, by=caller.viewer)
        self.director.audit.record(r.AuditAction.CANCEL, caller.common_name, caller.peer, request.name,
                                   owner=status.submitter, state=status.state)
        return serde.status_to_proto(status)

    @maps_errors
    async def GetModel(self, request, context):
        caller = Caller.of(context)
        self._check_submitter(caller)
        chunks = self.director.catalog.model_chunks(request.experiment_name, request.which, by=caller.viewer)
        owner = await self.flow.short(self.director.catalog.experiment_submitter, request.experiment_name)
        await self.flow.short(functools.partial(self.director.audit.record, r.AuditAction.DOWNLOAD,
                                                caller.common_name, caller.peer, request.experiment_name,
                                                owner=owner, which=request.which))
        await self.flow.send(context, "GetModel", serde.chunk_messages(chunks))

    @maps_errors
    def GetAuditLog(self, request, context):
        caller = Caller.of(context)
        self._check_submitter(caller)
        if not math.isfinite(request.since):
            raise InvalidRequestError(f"since is {request.since}; give a Unix time (0: from the start)")
        viewer = None if caller.viewer in self.director.catalog.admins else caller.viewer  # settings.admins
        entries, more = self.director.audit.entries(viewer, request.since, max(request.after_id, 0),
                                                    paging.page_size(request.page_size))
        return fed_pb.GetAuditLogResponse(entries=[serde.audit_entry_to_proto(e) for e in entries], more=more)
