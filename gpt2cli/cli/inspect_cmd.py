"""`gpt2 inspect`: the config and the param tree of a model, with counts and size on disk."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from gpt2cli.cli.options import JsonOutput


def inspect(
    model: Annotated[
        str,
        typer.Argument(help="A .npz file, a HF folder, a Hub repo id, or a LoRA adapter folder."),
    ],
    json_output: JsonOutput = False,
) -> None:
    """Show a model's config and parameter tree: shapes, dtypes, counts, totals, size on disk
    (of an adapter folder: its LoRA settings, arrays and size).

    Examples:

    \b
      gpt2 inspect out.npz
      gpt2 inspect gpt2-medium --json
      gpt2 inspect runs/xl-lora/adapter
    """
    from gpt2cli.adapter import is_adapter

    if is_adapter(Path(model)):
        _inspect_adapter(Path(model), json_output)
        return
    from gpt2cli.checkpoint import describe_nonfinite, flatten, nonfinite
    from gpt2cli.cli.console import err
    from gpt2cli.hub import load_model, resolve
    from gpt2cli.progress import hub_progress_class

    with err.status(f"reading {model}"):
        path = resolve(model, tqdm_class=hub_progress_class())
        config, params = load_model(str(path))
    leaves = {
        name: {"shape": list(a.shape), "dtype": str(a.dtype), "count": int(a.size)}
        for name, a in flatten(params).items()
    }
    report = {
        "source": model,
        "path": str(path),
        "format": "hf" if path.is_dir() else "npz",
        "config": config.to_hf(),
        "params": leaves,
        "total_params": sum(leaf["count"] for leaf in leaves.values()),
        "size_bytes": _size_on_disk(path),
        "nonfinite": nonfinite(params),
    }
    if report["nonfinite"]:
        err.print(f"warning: {describe_nonfinite(report['nonfinite'])}", markup=False)
    if json_output:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_report(report)


def _inspect_adapter(path: Path, json_output: bool) -> None:
    from gpt2cli.adapter import CONFIG_FILE, load_adapter
    from gpt2cli.checkpoint import flatten
    from gpt2cli.headers import read_json

    spec, adapters = load_adapter(path)
    leaves = {
        name: {"shape": list(a.shape), "dtype": str(a.dtype), "count": int(a.size)}
        for name, a in flatten(adapters).items()
    }
    layers = sorted({int(name.split("/")[0][2:]) for name in leaves})
    report = {
        "source": str(path),
        "path": str(path),
        "format": "lora adapter (PEFT)",
        "config": {
            "rank": spec.rank,
            "alpha": spec.alpha,
            "scale": spec.scale,
            "dropout": spec.dropout,
            "targets": list(spec.targets),
            "layers": f"{layers[0]}..{layers[-1]} ({len(layers)})",
            "base_model": read_json(path / CONFIG_FILE).get("base_model_name_or_path"),
        },
        "params": leaves,
        "total_params": sum(leaf["count"] for leaf in leaves.values()),
        "size_bytes": _size_on_disk(path),
    }
    if json_output:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_report(report)


def _size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.tree import Tree

    # Rendered to a string, then written: a reader that left (`| head`) raises BrokenPipeError
    # for the error boundary to end quietly (rich itself would exit 1). A file or a pipe is
    # not cut to a terminal's width.
    terminal = sys.stdout.isatty()
    buffer = io.StringIO()
    width = shutil.get_terminal_size().columns if terminal else 10_000
    out = Console(file=buffer, highlight=False, force_terminal=terminal, width=width)
    table = Table(title=f"config of {report['source']}", show_header=False)
    for key, value in report["config"].items():
        table.add_row(key, str(value))
    out.print(table)

    tree = Tree(f"params ({report['format']}: {report['path']})")
    nodes: dict[str, Tree] = {}
    for name, leaf in report["params"].items():
        *parents, leaf_name = name.split("/")
        node, prefix = tree, ""
        for part in parents:
            prefix += part + "/"
            if prefix not in nodes:
                nodes[prefix] = node.add(part)
            node = nodes[prefix]
        shape = "x".join(map(str, leaf["shape"])) or "scalar"
        node.add(f"{leaf_name}  {shape}  {leaf['dtype']}  {leaf['count']:,}")
    out.print(tree)
    mib = report["size_bytes"] / 2**20
    out.print(f"total parameters: {report['total_params']:,}   size on disk: {mib:,.1f} MiB")
    sys.stdout.write(buffer.getvalue())
