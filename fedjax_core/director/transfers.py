"""Transfers: what streams in and out of the director, spooled to disk and checked as it arrives.

A submission (code bundle + initial model) is staged and installed whole or not at all; an
update is spooled, checked (names, dtypes, shapes, finite values) and decoded from its codec
into the model's dtypes; a round's model is encoded once per round when downloads are
compressed. Nothing here holds the director's lock.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from fedjax_core import codecs
from fedjax_core import records as r
from fedjax_core.director.files import ExperimentFiles, write_bundle
from fedjax_core.director.rounds import Run
from fedjax_core.errors import InvalidRequestError, StorageError, is_disk_full
from fedjax_core.personal import check_not_personal
from fedjax_core.spec import ExperimentSpec
from fedjax_core.tensors import TensorError
from fedjax_core.model_file import ModelFile, ModelFileWriter


def store_submission(files: ExperimentFiles, spec: ExperimentSpec, bundle: Iterable[bytes],
                     chunks: Iterable[r.TensorChunk]) -> tuple[int, str]:
    """Stage the bundle and the initial model, then install both: ``(bundle bytes, its hex sha256)``.
    On any error nothing stays behind."""
    staging = files.staging_dir(spec.name)
    digest = hashlib.sha256()

    def hashed() -> Iterator[bytes]:  # hashed as it streams in: envoys check their download against it
        for piece in bundle:
            digest.update(piece)
            yield piece

    try:
        size = write_bundle(staging / "bundle.bin", hashed())
        if size != spec.bundle_size:
            raise InvalidRequestError(f"bundle is {size} bytes but the spec announced {spec.bundle_size}")
        with ModelFileWriter(staging / files.model(spec.name, 0).name,
                             expected={t.name: t for t in spec.model_spec}) as writer:
            for chunk in chunks:
                writer.add_chunk(chunk)
            writer.commit()
        files.install(staging, spec.name)
    except BaseException as exc:
        files.drop_staging(staging)
        if isinstance(exc, TensorError):
            raise InvalidRequestError(f"initial model of {spec.name!r}: {exc}") from None
        if is_disk_full(exc):
            raise StorageError(f"the director's disk is full ({exc.strerror}, under {files.state_dir}): experiment "
                               f"{spec.name!r} was not stored; free space there and submit again") from None
        raise
    return size, digest.hexdigest()


def receive_update(files: ExperimentFiles, run: Run, envoy: str, round_: int,
                   chunks: Iterable[r.TensorChunk], sync: bool = True) -> tuple[Path, int]:
    """Spool an envoy's streamed update and check it: ``(spool in the model's dtypes, bytes received)``.
    ``sync=False`` leaves the spool's data unsynced (the caller syncs it before keeping it). The caller
    removes the spool unless it keeps it."""
    expected = {t.name: t for t in run.spec.model_spec if t.name in run.upload}
    spool = files.spool_path(envoy)
    # a spare for a streamed update (sync): never on the event loop's path, whose small updates gain nothing from one
    spare = files.take_spare(run.name) if sync else None
    try:
        with ModelFileWriter(spool, expected=expected, finite_only=True, reuse=spare) as writer:  # one NaN poisons it
            for chunk in chunks:
                check_not_personal(run.personal, envoy, chunk.name)
                writer.add_chunk(chunk)
            specs = writer.commit(sync_folder=False, sync=sync)  # kept by a rename into the round's folder
        return _decoded(files, run, envoy, spool, specs), writer.bytes_written
    except TensorError as exc:
        _discard(spool, spare)
        raise InvalidRequestError(f"update from {envoy!r} for round {round_}: {exc}") from None
    except BaseException:
        _discard(spool, spare)
        raise


def _discard(spool: Path, spare: Path | None) -> None:
    spool.unlink(missing_ok=True)
    if spare is not None:  # still there if its writer never took it
        spare.unlink(missing_ok=True)


def _decoded(files: ExperimentFiles, run: Run, envoy: str, spool: Path, specs: list[r.TensorSpec]) -> Path:
    """An upload in the model's dtypes: a compressed or delta one (``specs``: as written) is checked against the
    experiment's settings and decoded into a new spool file (the received one is removed)."""
    codecs.check_update_encodings(specs, run.spec.communication.compression, run.spec.communication.send_deltas)
    if all(spec.encoding is None for spec in specs):
        return spool
    encoded = ModelFile(spool)
    decoded = files.spool_path(envoy)
    try:
        codecs.decode_model(encoded, decoded, ModelFile(files.model(run.name, run.round)), finite_only=True)
    except BaseException:
        decoded.unlink(missing_ok=True)
        raise
    finally:
        spool.unlink(missing_ok=True)
    return decoded


def download_path(files: ExperimentFiles, run: Run, path: Path) -> Path:
    """The file a worker downloads for ``run``'s round: the model, or under compress_downloads its
    encoding, made once per round (the final model is validated exact)."""
    if not (run.spec.communication.compress_downloads and run.state.kind == r.TaskKind.TRAIN):
        return path
    encoded = files.download(run.name, run.round, run.spec.communication.compression)
    with run.download_lock:
        if not encoded.exists():
            encoded.parent.mkdir(parents=True, exist_ok=True)
            codecs.encode_model(ModelFile(path), encoded, run.spec.communication.compression, sorted(run.upload))
    return encoded
