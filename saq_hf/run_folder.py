"""The run folder's safety: the staging folder and its writer lock, output_dir and checkpoint checks, resume
resolution, the message for an interrupted run, and the atomic renames that finish a run folder."""

import json
import os
import shlex
import shutil
import socket
import tempfile
import zipfile
from pathlib import Path

from .args import UserInputError
from .console import say
from .hub import RUN_INFO_NAME
from .trainer import SAQTrainingArguments

WRITER_FILE = "_saq_hf_writer.json"  # in a staging folder while a run writes it; "_*" files are never pushed
CHECKPOINT_PREFIX = "checkpoint-"


def staging_dir(output_dir: str | os.PathLike) -> Path:
    """Where a run builds its folder (checkpoints included) before renaming it to ``output_dir``."""
    output_dir = Path(output_dir).expanduser().absolute()
    return output_dir.with_name(output_dir.name + ".partial")


def _writer_alive(staging: Path) -> int | None:
    """PID of the live process writing ``staging``, or None when nobody is (finished, crashed or killed)."""
    try:
        writer = json.loads((staging / WRITER_FILE).read_text(encoding="utf-8"))
        pid, host = int(writer["pid"]), writer["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname():
        return pid  # another machine's process cannot be checked from here: assume it runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def _is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` looks like something saq-hf or the Trainer wrote, so replacing it loses no user files."""
    # training_args.json: what the Trainer writes; training_args.bin: the pickle earlier versions wrote.
    markers = (RUN_INFO_NAME, "config.json", "trainer_state.json", "training_args.json", "training_args.bin",
               WRITER_FILE)
    return any((folder / name).exists() for name in markers) or any(folder.glob(CHECKPOINT_PREFIX + "*"))


def _check_writable(folder: Path, key: str) -> None:
    """``folder`` (which may not exist yet) can be created and written: checked by writing a probe file."""
    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"{key} {str(folder)!r} is a file, not a folder: choose another {key}")
    existing = folder if folder.exists() else folder.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserInputError(f"{key} {str(folder)!r} is inside {str(existing)!r}, which is a file: choose another "
                             f"{key}")
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".saq_hf_probe_")
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise UserInputError(f"cannot write to {key} {str(folder)!r} ({err.strerror or err} in {str(existing)!r}): "
                             f"choose a writable {key}") from None


def _check_output_dir(args: SAQTrainingArguments) -> None:
    """Refuse to replace a finished run (without ``overwrite_output_dir``), to write where nothing can be written,
    and to share an output_dir with a live run; all before any work."""
    output_dir = Path(args.output_dir).expanduser().absolute()
    staging = staging_dir(output_dir)
    _check_writable(output_dir, "output_dir")
    _check_writable(staging.parent, "output_dir")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        what = "a finished saq-hf run" if (output_dir / RUN_INFO_NAME).is_file() else "files"
        if not args.overwrite_output_dir:
            raise UserInputError(f"output_dir {str(output_dir)!r} already holds {what}: pass --overwrite_output_dir "
                                 "true to replace it, or choose another output_dir")
        if not _is_run_folder(output_dir):
            raise UserInputError(f"output_dir {str(output_dir)!r} holds files that saq-hf did not write, so "
                                 "--overwrite_output_dir will not delete them: choose another output_dir")
    if staging.exists():
        pid = _writer_alive(staging)
        if pid is not None:
            raise UserInputError(f"another saq-hf run (pid {pid}) is writing output_dir {str(output_dir)!r} (in "
                                 f"{str(staging)!r}): wait for it, or choose another output_dir")
        if not args.resume_from_checkpoint and not args.overwrite_output_dir:
            checkpoint = newest_complete_checkpoint(staging, not args.save_only_model)
            if checkpoint is None:
                raise UserInputError(f"{str(staging)!r} holds an interrupted run that saved no complete checkpoint, "
                                     "so it cannot be continued: pass --overwrite_output_dir true to discard it and "
                                     "start over")
            raise UserInputError(f"{str(staging)!r} holds an interrupted run (last complete checkpoint: "
                                 f"{checkpoint.name}): pass --resume_from_checkpoint true to continue it, or "
                                 "--overwrite_output_dir true to discard it")


def _safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file ``path`` is unreadable (header, or data shorter than the header says), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            if size < 8 or header_size > size - 8:
                return f"{path.name} is truncated"
            header = json.loads(handle.read(header_size))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return f"{path.name} is not a readable safetensors file"
    if 8 + header_size + max(ends, default=0) > size:
        return f"{path.name} is truncated"
    return None


def checkpoint_problem(folder: Path, need_optimizer: bool = True) -> str | None:
    """Why the Trainer checkpoint ``folder`` cannot be resumed from (a file missing, truncated or unreadable), or
    None when it is complete. Reads headers and zip directories only; nothing is unpickled."""
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "trainer_state.json is not valid JSON"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return "no *.safetensors weights"
    for path in weights:
        problem = _safetensors_problem(path)
        if problem:
            return problem
    states = ("optimizer.pt", "scheduler.pt") if need_optimizer else ()
    for name in states:
        if not (folder / name).is_file():
            return f"no {name}"
    for path in sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth")):
        try:  # torch.save writes a zip archive: a truncated one has no central directory, a damaged one bad CRCs
            with zipfile.ZipFile(path) as archive:
                if archive.testzip() is not None:
                    return f"{path.name} is corrupt"
        except (OSError, zipfile.BadZipFile):
            return f"{path.name} is truncated or not a torch file"
    return None


def _checkpoints(folder: Path) -> list[Path]:
    """``checkpoint-N`` folders of ``folder``, newest (highest N) first."""
    steps = {p: p.name[len(CHECKPOINT_PREFIX):] for p in folder.glob(CHECKPOINT_PREFIX + "*") if p.is_dir()}
    return sorted((p for p, step in steps.items() if step.isdigit()), key=lambda p: int(steps[p]), reverse=True)


def newest_complete_checkpoint(folder: Path, need_optimizer: bool = True) -> Path | None:
    """The newest checkpoint of ``folder`` that a run can resume from, or None."""
    return next((c for c in _checkpoints(folder) if checkpoint_problem(c, need_optimizer) is None), None)


def _start_over(args: SAQTrainingArguments) -> str:
    """How to start afresh instead of resuming: the flag that also discards what is in the way, if anything is."""
    output_dir = Path(args.output_dir).expanduser().absolute()
    staging = staging_dir(output_dir)
    in_the_way = (f"the interrupted run in {str(staging)!r}" if staging.exists()
                  else f"the run in {str(output_dir)!r}" if output_dir.is_dir() and any(output_dir.iterdir())
                  else None)
    if in_the_way and not args.overwrite_output_dir:
        return f"drop resume_from_checkpoint and pass --overwrite_output_dir true to discard {in_the_way} and start over"
    return "drop resume_from_checkpoint to start over"


def _resolve_resume_checkpoint(args: SAQTrainingArguments) -> str | None:
    """``resume_from_checkpoint`` as a complete checkpoint folder: ``true`` means the newest complete checkpoint of
    this output_dir (an interrupted run's first); an incomplete one is an error naming what is missing."""
    value = args.resume_from_checkpoint
    if isinstance(value, bool):  # the Trainer's own API takes True for "the newest checkpoint"
        value = str(value).lower()
    if value is None or value.lower() in ("false", "no", "none", ""):
        return None
    need_optimizer = not args.save_only_model
    if value.lower() in ("true", "yes", "latest"):
        output_dir = Path(args.output_dir).expanduser().absolute()
        staging = staging_dir(output_dir)
        candidates = _checkpoints(staging) if staging.is_dir() else []
        candidates = candidates or (_checkpoints(output_dir) if output_dir.is_dir() else [])
        skipped = []
        for folder in candidates:
            problem = checkpoint_problem(folder, need_optimizer)
            if problem is None:
                if skipped:
                    say(f"skipping incomplete checkpoints ({'; '.join(skipped)}); resuming from {folder}")
                return str(folder)
            skipped.append(f"{folder.name}: {problem}")
        detail = f" ({'; '.join(skipped)})" if skipped else ""
        raise UserInputError(f"no complete checkpoint to resume from in {str(output_dir)!r}{detail}: "
                             f"{_start_over(args)}")
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise UserInputError(f"resume_from_checkpoint {value!r} is not a folder (recipe key: resume_from_checkpoint;"
                             " true resumes from the newest checkpoint of output_dir)")
    problem = checkpoint_problem(folder, need_optimizer)
    if problem:
        raise UserInputError(f"checkpoint {value!r} is incomplete ({problem}; interrupted while saving?): pass an "
                             "earlier checkpoint, or resume_from_checkpoint true for the newest complete one")
    return str(folder.absolute())


def interrupted(args: SAQTrainingArguments, command) -> str:
    """The line to print when a run is stopped (Ctrl-C): what it kept, and the exact commands that continue it (from
    its last complete checkpoint, if any) or discard it and start over. ``command(*flags)`` is the command that
    was run, without resume_from_checkpoint, plus ``flags``. Ends this process's claim on the staging folder."""
    staging = staging_dir(args.output_dir)
    if not staging.is_dir():
        return "interrupted before the run wrote anything"
    writer = staging / WRITER_FILE
    if _writer_alive(staging) == os.getpid():
        writer.unlink(missing_ok=True)
    start_over = f"start over with: rm -r {shlex.quote(str(staging))} && {command()}"
    checkpoint = newest_complete_checkpoint(staging, not args.save_only_model)
    if checkpoint is None:
        return f"interrupted; the unfinished run in {staging} saved no checkpoint to continue from; {start_over}"
    return (f"interrupted; the unfinished run is kept in {staging} (last complete checkpoint: {checkpoint.name}); "
            f"continue it with: {command('--resume_from_checkpoint', 'true')}; or {start_over}")


def _replace_folder(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``, replacing what is there: each rename is atomic, so ``target`` is always either
    the old folder or the new one, never a mix."""
    if target.exists():
        trash = target.with_name(f"{target.name}.replaced-{os.getpid()}")
        os.rename(target, trash)
        os.rename(new, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(new, target)


def _claim_staging(args: SAQTrainingArguments) -> Path:
    """Create (or, to resume an interrupted run, take over) the staging folder; ``mkdir`` is atomic, so of two runs
    started into one output_dir only one gets it."""
    output_dir = Path(args.output_dir).expanduser().absolute()
    staging = staging_dir(output_dir)
    resume = args.resume_from_checkpoint
    if not args.should_save:
        return staging
    resuming_here = resume is not None and staging.is_dir() and Path(resume).parent == staging
    if staging.exists() and not resuming_here:
        pid = _writer_alive(staging)
        if pid is not None or not args.overwrite_output_dir:
            who = f"another saq-hf run (pid {pid})" if pid else "another saq-hf run"
            raise UserInputError(f"{who} is writing output_dir {str(output_dir)!r} (in {str(staging)!r}): wait for "
                                 "it, or choose another output_dir")
        shutil.rmtree(staging)
    if not resuming_here:
        try:
            staging.mkdir(parents=True)
        except FileExistsError:
            raise UserInputError(f"another saq-hf run is writing output_dir {str(output_dir)!r} (in "
                                 f"{str(staging)!r}): wait for it, or choose another output_dir") from None
        if resume is not None and Path(resume).parent == output_dir:
            # Resuming a finished run: its checkpoints move into the new folder with it, none is lost.
            for checkpoint in _checkpoints(output_dir):
                shutil.copytree(checkpoint, staging / checkpoint.name)
            args.resume_from_checkpoint = str(staging / Path(resume).name)
    (staging / WRITER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}),
                                       encoding="utf-8")
    return staging


def _finish_run_folder(staging: Path, output_dir: Path, overwrite: bool) -> None:
    """Rename the finished staging folder to ``output_dir`` (replacing a previous run only with overwrite)."""
    (staging / WRITER_FILE).unlink(missing_ok=True)
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise UserInputError(f"output_dir {str(output_dir)!r} was filled by something else during training; this "
                             f"run is complete in {str(staging)!r}: move it where you want it")
    if output_dir.is_dir() and not any(output_dir.iterdir()):
        output_dir.rmdir()
    _replace_folder(staging, output_dir)
