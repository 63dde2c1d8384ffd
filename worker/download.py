"""Model download jobs: fetch a model's files into the (shared) Hugging Face cache."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from tqdm.auto import tqdm

from schemas.registry import ModelSpec

Progress = Callable[[int, int], None]

log = structlog.get_logger("worker.download")


class DownloadFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class DownloadStopped(Exception):
    """The worker is stopping: the download ended early, its finished files kept in the cache."""


def abort_transfers() -> bool:
    """Cancel the Xet transfers huggingface_hub has in flight in this process (the worker is
    stopping). Files stored with Xet report their bytes from hf_xet's own threads, where raising
    DownloadStopped stops nothing; aborting the session makes their download call raise. Returns
    False where this huggingface_hub cannot abort them (before 1.19: the grace period ends them)."""
    try:
        from huggingface_hub.utils._xet import abort_xet_session
    except ImportError:
        log.warning("xet_abort_unavailable", detail="this huggingface_hub cannot abort Xet transfers")
        return False
    try:
        abort_xet_session()
    except Exception as exc:  # best effort: the grace period still ends the download
        log.warning("xet_abort_failed", error=str(exc))
        return False
    return True


def download(spec: ModelSpec, models_dir: Path, on_progress: Progress, stop: threading.Event | None = None) -> str:
    """Make the model's weights available to workers; return a sentence saying where they are.

    `stop` ends a download at its next progress update (huggingface_hub updates the bars of the
    file count and of each file's bytes as data arrives): it raises DownloadStopped, and a later
    download of the same model resumes from what the cache holds."""
    if spec.path is not None:
        folder = Path(spec.source(models_dir))
        if not (folder / "model_index.json").is_file():
            raise DownloadFailed(
                "model_missing",
                f"{spec.id!r} is configured as the local folder {folder}, "
                "which holds no diffusers pipeline (model_index.json)",
            )
        return f"{spec.id!r} is the local folder {folder}; nothing to download"

    from huggingface_hub import snapshot_download

    class Reporting(tqdm):
        """huggingface_hub counts finished files through this bar; pass the count on. It makes a
        bar for each file before downloading it: once stopped, no file starts."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if stop is not None and stop.is_set():
                self.disable = True  # what tqdm's __del__ looks at first
                raise DownloadStopped()
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if stop is not None and stop.is_set():
                raise DownloadStopped()
            shown = super().update(n)
            if self.total and self.unit != "B":  # the files bar, not a per-file bytes bar
                on_progress(int(self.n), int(self.total))
            return shown

    try:
        path = snapshot_download(spec.repo, revision=spec.revision, tqdm_class=Reporting)
    except Exception as exc:
        if stop is not None and stop.is_set():
            raise DownloadStopped() from exc
        raise DownloadFailed(
            "download_failed", f"could not download {spec.repo!r}: {type(exc).__name__}: {exc}"
        ) from exc
    return f"{spec.repo}@{spec.revision or 'default branch'} is in the Hugging Face cache at {path}"
