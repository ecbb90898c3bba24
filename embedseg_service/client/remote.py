"""``embedseg remote``: the service's REST API from the command line, on :class:`~embedseg_service.client.Client`.

Global options (before or after the action): ``--server`` (``EMBEDSEG_SERVER``, default
``http://127.0.0.1:8000``), ``--key`` (``EMBEDSEG_API_KEY``), ``--json`` (one JSON document on
standard output), ``--retries``, ``--retry-for``, ``--poll``. Progress bars go to standard error,
only when it is a terminal.

Exit codes: 0 success; 1 a job ended ``failed`` or ``cancelled`` (its error on standard error);
2 bad usage or input, or an error answer of the server (its ``detail`` on standard error);
3 the server could not be reached after the retries (also in the middle of a wait: the job may
still run, waiting again resumes); 4 a wait ran out of time while the job still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from embedseg_service.client.client import Client
from embedseg_service.client.errors import ApiError, ClientError, ConnectionFailed, JobFailed, WaitTimeout
from embedseg_service.client.progress import show_progress
from embedseg_service.client.sources import tiff_files
from embedseg_service.records.schemas import JobOut

SERVER_ENV = "EMBEDSEG_SERVER"
DEFAULT_SERVER = "http://127.0.0.1:8000"
EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TIMEOUT = 0, 1, 2, 3, 4

Action = Callable[[Client, argparse.Namespace], Any]


class Usage(ValueError):
    """A command line that cannot run (exit 2)."""


# --------------------------------------------------------------------------- output


def _plain(value: Any) -> Any:
    """``value`` as JSON-ready data (pydantic rows dumped, paths as strings)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _job_line(job: JobOut) -> str:
    stage = f", {job.stage}" if job.stage and job.status.value == "running" else ""
    line = f"job {job.id} ({job.kind.value}): {job.status.value}{stage}, {job.progress * 100:.0f}%"
    if job.error:
        line += f"\n  error: {job.error}"
    if job.result:
        line += f"\n  result: {json.dumps(job.result, sort_keys=True)}"
    ap = (job.metrics or {}).get("ap")
    if isinstance(ap, dict) and ap.get("thresholds"):
        pairs = ", ".join(f"AP{t:g}={v:.3f}" for t, v in zip(ap["thresholds"], ap.get("ap", [])))
        line += f"\n  {pairs}"
    return line


def _human(value: Any) -> str:
    """The text a person reads for a command's result."""
    if isinstance(value, JobOut):
        return _job_line(value)
    if isinstance(value, dict) and "job" in value:
        lines = [_job_line(value["job"])]
        lines += [f"{item['input']} -> {item['path']}" for item in value.get("outputs", [])]
        return "\n".join(lines)
    if isinstance(value, list):
        return "\n".join(_human(item) for item in value)
    if isinstance(value, BaseModel):
        row = value.model_dump(mode="json")
        fields = ("id", "kind", "name", "shape", "axes", "spatial_dims", "created_at")
        return "\t".join(str(row[field]) for field in fields if field in row)
    return str(value)


def _emit(value: Any, as_json: bool) -> None:
    if as_json:
        json.dump(_plain(value), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(_human(value))


# --------------------------------------------------------------------------- actions


def _ids(values: Sequence[str]) -> list[str]:
    """Ids given as separate words and/or comma-separated."""
    ids = [part.strip() for value in values for part in value.split(",") if part.strip()]
    if not ids:
        raise Usage("give at least one id")
    return ids


def _wait(api: Client, job: JobOut | str, args: argparse.Namespace) -> JobOut:
    return api.wait(job, timeout=getattr(args, "timeout", None), poll_s=args.poll, progress=show_progress(None))


def do_upload(api: Client, args: argparse.Namespace) -> Any:
    """Upload every TIFF of the paths (files, folders, globs); one volume each."""
    paths = tiff_files(args.paths)
    bar = _bar(len(paths), "upload")
    rows = []
    for path in paths:
        rows.append(api.upload(path, kind=args.kind, axes=args.axes, voxel_size=args.voxel_size))
        bar.update(1)
    bar.close()
    return rows


def do_train(api: Client, args: argparse.Namespace) -> Any:
    """Submit a training job; with ``--wait`` wait for it."""
    options = {"dims": args.dims, "epochs": args.epochs, "max_time_minutes": args.max_minutes, "seed": args.seed}
    options["name"] = args.name
    options["callback_url"] = args.callback_url
    job = api.train(_ids(args.images), _ids(args.masks), **{k: v for k, v in options.items() if v is not None})
    return _wait(api, job, args) if args.wait else job


def _outputs(inputs: list[Path], folder: Path) -> list[Path]:
    """One output per input, named as the input, in ``folder``; refuses clashes and overwriting an input."""
    targets = [folder / path.name for path in inputs]
    names = [target.name for target in targets]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise Usage(f"inputs share file names {clashes}; their labels would overwrite each other in {folder}")
    sources = {path.resolve() for path in inputs}
    if any(target.resolve() in sources for target in targets):
        raise Usage(f"--out {folder} holds the inputs; their labels would replace them: choose another folder")
    return targets


def do_predict(api: Client, args: argparse.Namespace) -> Any:
    """Upload the inputs, segment them all in one job, wait, write one label TIFF per input into ``--out``."""
    inputs = tiff_files(args.inputs)
    folder = Path(args.out)
    if folder.exists() and not folder.is_dir():
        raise Usage(f"--out {folder} is a file; give a folder")
    targets = _outputs(inputs, folder)
    api.model(args.model_id)  # a wrong model id fails before anything is uploaded
    volumes = do_upload(api, argparse.Namespace(paths=inputs, kind="image", axes=args.axes, voxel_size=args.voxel_size))
    submitted = api.predict(
        args.model_id, volumes, tta=args.tta, min_size=args.min_size, callback_url=args.callback_url
    )
    job = _wait(api, submitted, args)
    folder.mkdir(parents=True, exist_ok=True)
    outputs = []
    for path, volume, target in zip(inputs, volumes, targets):
        label_id = (job.result or {})["labels"][volume.id]
        api.download(label_id, target)
        outputs.append({"input": str(path), "volume_id": volume.id, "labels_volume_id": label_id, "path": str(target)})
    return {"job": job, "outputs": outputs}


def do_evaluate(api: Client, args: argparse.Namespace) -> Any:
    """Submit an evaluation of predictions against ground truth (paired by position); with ``--wait`` wait."""
    gts, preds = _ids(args.gt), _ids(args.pred)
    if len(gts) != len(preds):
        raise Usage(f"{len(gts)} --gt ids but {len(preds)} --pred ids; give one prediction per ground truth")
    job = api.evaluate(list(zip(gts, preds)), thresholds=args.thresholds, callback_url=args.callback_url)
    return _wait(api, job, args) if args.wait else job


def do_status(api: Client, args: argparse.Namespace) -> Any:
    """A job's current state."""
    return api.job(args.job_id)


def do_wait(api: Client, args: argparse.Namespace) -> Any:
    """Wait for a job to finish (at once when it has)."""
    return _wait(api, args.job_id, args)


def do_download(api: Client, args: argparse.Namespace) -> Any:
    """Write a volume's TIFF to a file or into a folder."""
    return {"volume_id": args.volume_id, "path": str(api.download(args.volume_id, args.path))}


def do_models(api: Client, _args: argparse.Namespace) -> Any:
    """Every model this key sees, newest first."""
    return list(api.models())


def do_export(api: Client, args: argparse.Namespace) -> Any:
    """Write a model's network as TorchScript or ONNX to a file or into a folder (see the API docs of
    GET /models/{id}/export for the input it expects)."""
    path = api.export_model(args.model_id, args.path, format=args.format)
    return {"model_id": args.model_id, "format": args.format, "path": str(path)}


class _NoBar:
    def update(self, _n: int) -> None:
        """Nothing to draw."""

    def close(self) -> None:
        """Nothing to close."""


def _bar(total: int, label: str) -> Any:
    """A tqdm bar on standard error when it is a terminal, else one that draws nothing."""
    if not show_progress(None):
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="file")


# --------------------------------------------------------------------------- running


def _failure(error: BaseException) -> tuple[int, str]:
    """The exit code and message of an error the command ends with."""
    if isinstance(error, JobFailed):
        return EXIT_JOB_FAILED, str(error)
    if isinstance(error, WaitTimeout):
        return EXIT_TIMEOUT, str(error)
    if isinstance(error, ConnectionFailed):
        return EXIT_UNREACHABLE, f"cannot reach the server: {error}"
    if isinstance(error, ApiError):
        return EXIT_USAGE, f"the server answered {error.status}: {error.detail}"
    return EXIT_USAGE, str(error)


def _retry_options(args: argparse.Namespace) -> dict[str, Any]:
    """The client's retry options the command line gives: ``--retry-for`` alone lifts the count."""
    options: dict[str, Any] = {}
    if args.retry_for is not None:
        options["retry_deadline"] = args.retry_for
        options["retries"] = args.retries
    elif args.retries is not None:
        options["retries"] = args.retries
    return options


def run_remote(args: argparse.Namespace) -> int:
    """Run one ``embedseg remote`` action; print its result and return the exit code."""
    action: Action = args.remote_action
    try:
        with Client(args.server, api_key=args.key or None, **_retry_options(args)) as api:
            result = action(api, args)
    except (ClientError, ValueError, OSError) as error:
        code, message = _failure(error)
        job = getattr(error, "job", None)
        if args.json and isinstance(job, JobOut):
            _emit(job, True)
        print(f"embedseg remote {args.remote_command}: error: {message}", file=sys.stderr)
        return code
    _emit(result, args.json)
    return EXIT_OK


def _global_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The options every action takes; ``defaults`` on the ``remote`` parser, absent on its actions
    (so that they may come before or after the action)."""

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    env_server = os.environ.get(SERVER_ENV) or DEFAULT_SERVER
    parser.add_argument(
        "--server", default=default(env_server), help=f"service root URL (env {SERVER_ENV}; default {DEFAULT_SERVER})"
    )
    parser.add_argument("--key", default=default(None), help="API key (env EMBEDSEG_API_KEY)")
    parser.add_argument(
        "--json", action="store_true", default=default(False), help="print one JSON document on standard output"
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=default(None),
        help="resends of a request the server did not answer (default 5; no count with --retry-for alone)",
    )
    parser.add_argument(
        "--retry-for",
        type=float,
        default=default(None),
        metavar="SECONDS",
        help="resend a request the server did not answer for at most this long (e.g. across a restart)",
    )
    parser.add_argument(
        "--poll",
        type=float,
        default=default(2.0),
        help="seconds between job polls once a job has run for a while (default 2; the first "
        "polls come sooner: 0.05 s, then 1.5 times the last wait)",
    )


def _voxel_size(text: str) -> str:
    try:
        [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers in array order, e.g. 2.0,0.5,0.5") from None
    return text


def _add_action(sub: Any, name: str, action: Action, help_text: str, wait: bool = False) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=action.__doc__)
    _global_options(parser, defaults=False)
    if wait:
        parser.add_argument("--timeout", type=float, help="stop waiting after this many seconds (exit 4)")
    parser.set_defaults(remote_action=action)
    return parser


def _callback_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--callback-url", metavar="URL", help="POST the finished job's JSON, signed, to this URL (a webhook)"
    )


def _add_job_actions(sub: Any) -> None:
    train = _add_action(sub, "train", do_train, "submit a training job", wait=True)
    train.add_argument("--images", nargs="+", required=True, metavar="ID", help="image volume ids")
    train.add_argument("--masks", nargs="+", required=True, metavar="ID", help="their mask volume ids, same order")
    train.add_argument("--dims", type=int, choices=(2, 3), help="2 or 3 (server default 2)")
    train.add_argument("--epochs", type=int, help="epochs (server default when left out)")
    train.add_argument("--max-minutes", type=float, help="time budget in minutes")
    train.add_argument("--seed", type=int, help="random seed")
    train.add_argument("--name", help="name of the trained model")
    train.add_argument("--wait", action="store_true", help="wait for the job (exit 1 when it fails)")
    _callback_option(train)

    predict = _add_action(sub, "predict", do_predict, "segment TIFFs in one job; write labels to --out", wait=True)
    predict.add_argument("model_id", help="the model's id (see: embedseg remote models)")
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="TIFF files, folders of TIFFs or glob patterns")
    predict.add_argument("--out", required=True, help="folder for one label TIFF per input, named as the input")
    predict.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help="test-time augmentation")
    predict.add_argument("--min-size", type=int, help="objects need more pixels than this")
    predict.add_argument("--axes", help="axes of the input files (overrides their metadata)")
    predict.add_argument("--voxel-size", type=_voxel_size, help="z,y,x (or y,x) voxel size of the inputs")
    _callback_option(predict)

    evaluate = _add_action(sub, "evaluate", do_evaluate, "submit an evaluation of predictions", wait=True)
    evaluate.add_argument("--gt", nargs="+", required=True, metavar="ID", help="ground-truth label volume ids")
    evaluate.add_argument("--pred", nargs="+", required=True, metavar="ID", help="predicted label ids, same order")
    evaluate.add_argument("--thresholds", type=float, nargs="+", help="IoU thresholds (server default when left out)")
    evaluate.add_argument("--wait", action="store_true", help="wait for the job (exit 1 when it fails)")
    _callback_option(evaluate)

    status = _add_action(sub, "status", do_status, "a job's state")
    status.add_argument("job_id")
    waiting = _add_action(sub, "wait", do_wait, "wait for a job; exit 1 when it failed or was cancelled", wait=True)
    waiting.add_argument("job_id")


def register_remote(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``embedseg remote upload|train|predict|evaluate|status|wait|download|models|export``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "remote",
        help="use a running service over HTTP: upload, train, predict, evaluate, status, wait, download, models, "
        "export",
        description=__doc__.split("\n\n", 1)[1].replace("``", "") if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _global_options(parser, defaults=True)
    sub = parser.add_subparsers(dest="remote_command", metavar="ACTION")
    sub.required = True
    upload = _add_action(sub, "upload", do_upload, "upload TIFF files, folders or globs as volumes")
    upload.add_argument("paths", nargs="+", metavar="PATH", help="TIFF files, folders of TIFFs or glob patterns")
    upload.add_argument("--kind", choices=("image", "labels"), default="image", help="volume kind (default image)")
    upload.add_argument("--axes", help="axes of the files (overrides their metadata)")
    upload.add_argument("--voxel-size", type=_voxel_size, help="z,y,x (or y,x) voxel size")
    _add_job_actions(sub)
    download = _add_action(sub, "download", do_download, "write a volume's TIFF to a file or folder")
    download.add_argument("volume_id")
    download.add_argument("path", help="a file, or a folder (the volume's name is used)")
    _add_action(sub, "models", do_models, "list the models")
    export = _add_action(sub, "export", do_export, "write a model's network as TorchScript or ONNX")
    export.add_argument("model_id")
    export.add_argument("path", help="a file, or a folder (the model's name is used)")
    export.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript",
                        help="torchscript (default, .pt) or onnx (.onnx)")  # fmt: skip
    parser.set_defaults(func=run_remote)
    return parser
