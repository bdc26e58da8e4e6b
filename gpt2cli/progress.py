"""Rich progress bars on stderr, and an adapter that lets huggingface_hub report into them."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

_console = Console(stderr=True)


def _bar(console: Console, *columns) -> Progress:
    """Drawn on a terminal only: in a log it would leave blank lines (and nothing else)."""
    return Progress(*columns, console=console, transient=True, disable=not console.is_terminal)


def task_progress() -> Progress:
    """A bar for counted work (tensors, steps)."""
    return _bar(
        _console,
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
    )


def bytes_progress(console: Console = _console) -> Progress:
    """A bar for bytes (downloads, files read): size done, MB/s and the time left."""
    return _bar(
        console,
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )


def hub_progress_class():
    """A tqdm class for `snapshot_download(tqdm_class=...)` that draws rich byte bars."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    progress = bytes_progress()

    class RichTqdm(hub_tqdm):
        rich_progress = progress

        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True  # tqdm draws nothing; rich does
            super().__init__(*args, **kwargs)
            if not progress.live.is_started:
                progress.start()
            description = kwargs.get("desc") or "downloading"
            self._task = progress.add_task(str(description), total=kwargs.get("total"))

        def update(self, n=1):
            if n:
                progress.advance(self._task, n)

        def close(self):
            progress.update(self._task, visible=False)
            if all(task.finished or not task.visible for task in progress.tasks):
                progress.stop()

    return RichTqdm
