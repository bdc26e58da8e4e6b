"""`gpt2 lens`: the logit lens as a table or JSON, one head's attention pattern, and steering
directions. The work is gpt2cli.lens's; this module reads flags and prints."""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from gpt2cli.cli.options import DEFAULT_MODEL, Dtype, JsonOutput, ModelRef, TokenizerRef
from gpt2cli.cli.text import check as check_utf8
from gpt2cli.errors import UserError


def _head(value: str | None) -> tuple[int, int] | None:
    """`--attention L.H` as (layer, head)."""
    if value is None:
        return None
    layer, dot, head = value.partition(".")
    if not (dot and layer.isdigit() and head.isdigit()):
        raise typer.BadParameter(f"{value!r} is not LAYER.HEAD, e.g. 9.6", param_hint="--attention")
    return int(layer), int(head)


def lens(
    prompt: Annotated[str | None, typer.Argument(help="The text to look into.")] = None,
    model: ModelRef = DEFAULT_MODEL,
    position: Annotated[
        int, typer.Option(help="The token position the table shows (negative: from the end).")
    ] = -1,
    top_k: Annotated[int, typer.Option("--top-k", help="Tokens per layer.", min=1, max=100)] = 5,
    attention: Annotated[
        str | None,
        typer.Option(
            metavar="LAYER.HEAD",
            help="Show this head's attention pattern instead (e.g. 9.6: layer 9, head 6).",
        ),
    ] = None,
    png: Annotated[
        Path | None,
        typer.Option(help="With --attention: also draw the pattern as a heatmap PNG (plot extra)."),
    ] = None,
    save_direction: Annotated[
        tuple[str, str, Path] | None,
        typer.Option(
            metavar="A B OUT.npy",
            help="Write the mean difference of prompt A's and prompt B's residual streams "
            "entering block --layer (an activation-addition vector) to OUT.npy.",
        ),
    ] = None,
    layer: Annotated[
        int | None, typer.Option(help="With --save-direction: the block whose input to read.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing OUT.npy or PNG.")] = False,
    json_output: JsonOutput = False,
    dtype: Dtype = "float32",
    tokenizer: TokenizerRef = None,
) -> None:
    """Look inside GPT-2: what each layer predicts (the logit lens), attention patterns,
    steering directions.

    The logit lens applies the final LayerNorm and the unembedding to the residual stream
    before the first block and after each block: the table shows each layer's top tokens at
    one position, the last row being the model's own prediction.

    Examples:

    \b
      gpt2 lens "The Eiffel Tower is in the city of" -m gpt2
      gpt2 lens "The Eiffel Tower is in the city of" -m gpt2 --position 3 --top-k 8
      gpt2 lens "When Mary and John went to the store, John gave a drink to" -m gpt2 --json
      gpt2 lens "When Mary and John went to the store, John gave a drink to" -m gpt2 --attention 9.6 --png attn.png
      gpt2 lens -m gpt2 --save-direction "Love" "Hate" love_hate.npy --layer 6
    """
    head = _check_flags(prompt, attention, png, save_direction, layer)

    from gpt2cli import compile_cache
    from gpt2cli import lens as core
    from gpt2cli.cli.console import err
    from gpt2cli.hub import load_model, load_tokenizer
    from gpt2cli.progress import hub_progress_class

    compile_cache.enable()
    with err.status(f"loading {model}"):
        config, params = load_model(model, finite=True, tqdm_class=hub_progress_class())
        tok = load_tokenizer(tokenizer, model, tqdm_class=hub_progress_class())
    encode = functools.partial(_ids, config, tok)

    if save_direction is not None:
        a, b, out = save_direction
        if out.exists() and not force:
            raise UserError(f"{out} exists: pass --force to overwrite it")
        _check_range(layer, config.n_layer, "--layer")
        vector = core.direction(config, params, encode(a), encode(b), layer, dtype=dtype)
        core.save_vector(out, vector, force=True)
        err.print(
            f"wrote {out}: blocks.{layer}.resid_pre of {a!r} minus {b!r} (mean over positions), "
            f"width {vector.shape[0]}, norm {float((vector**2).sum() ** 0.5):.4g}",
            markup=False,
            soft_wrap=True,
        )
        return

    check_utf8(prompt, "the prompt")
    ids = encode(prompt)
    tokens = [tok.decode([i]) for i in ids]
    if head is not None:
        _attention(core, config, params, ids, tokens, head, png, force, json_output, dtype)
        return
    if not -len(ids) <= position < len(ids):
        raise UserError(f"--position {position} is outside the prompt's {len(ids)} tokens")
    found = core.logit_lens(config, params, [ids], top_k=top_k, dtype=dtype)
    if json_output:
        typer.echo(json.dumps(_lens_json(found, tok, tokens), ensure_ascii=False))
    else:
        _print_lens(found, tok, tokens, position % len(ids))


def _check_flags(prompt, attention, png, save_direction, layer) -> tuple[int, int] | None:
    """Flags that cannot go together are usage errors, found before anything loads."""
    if save_direction is not None:
        if prompt is not None:
            raise typer.BadParameter(
                "takes its two prompts, not PROMPT", param_hint="--save-direction"
            )
        if layer is None:
            raise typer.BadParameter("needs --layer N", param_hint="--save-direction")
        if attention is not None or png is not None:
            raise typer.BadParameter(
                "goes without --attention and --png", param_hint="--save-direction"
            )
        return None
    if layer is not None:
        raise typer.BadParameter("is for --save-direction", param_hint="--layer")
    if png is not None and attention is None:
        raise typer.BadParameter("draws --attention LAYER.HEAD: give it too", param_hint="--png")
    if png is not None and importlib.util.find_spec("matplotlib") is None:
        raise UserError(
            "--png needs matplotlib, in the plot extra: uv pip install 'gpt2cli[plot]' "
            "(or: uv tool install '.[plot]', pipx inject gpt2cli matplotlib); or drop --png"
        )
    if prompt is None:
        raise typer.BadParameter("no prompt: give the text to look into", param_hint="PROMPT")
    return _head(attention)


def _check_range(value: int, size: int, flag: str) -> None:
    if not 0 <= value < size:
        raise UserError(f"{flag} {value} is outside this model's 0..{size - 1}")


def _ids(config, tok, text: str) -> list[int]:
    ids = tok.encode(text)
    if not ids:
        raise UserError("the prompt is empty: give some text to look into")
    config.check_ids(
        ids, f"the prompt {text[:30]!r}", "; pass the model's tokenizer with --tokenizer"
    )
    return ids


def _attention(core, config, params, ids, tokens, head, png, force, json_output, dtype) -> None:
    layer, index = head
    _check_range(layer, config.n_layer, "--attention's layer")
    _check_range(index, config.n_head, "--attention's head")
    if png is not None and png.exists() and not force:
        raise UserError(f"{png} exists: pass --force to overwrite it")
    pattern = core.attention_pattern(config, params, [ids], layer, index, dtype=dtype)
    if png is not None:
        from gpt2cli.cli.console import err

        title = f"attention of layer {layer}, head {index}"
        core.save_heatmap(png, pattern, [repr(t)[1:-1] for t in tokens], title)
        err.print(f"wrote {png}", markup=False)
    if json_output:
        record = {"layer": layer, "head": index, "tokens": tokens, "pattern": pattern.tolist()}
        typer.echo(json.dumps(record, ensure_ascii=False))
    elif png is None:
        _print_pattern(pattern, tokens, f"attention pattern of layer {layer}, head {index}")


def _lens_json(found, tok, tokens: list[str]) -> dict:
    layers = []
    for row, name in enumerate(found.names):
        positions = [
            {
                "position": t,
                "token": tokens[t],
                "top": [
                    {"token": tok.decode([int(i)]), "id": int(i), "prob": float(p)}
                    for i, p in zip(found.ids[row, 0, t], found.probs[row, 0, t], strict=True)
                ],
            }
            for t in range(len(tokens))
        ]
        layers.append({"layer": _layer_label(row), "stream": name, "positions": positions})
    return {"tokens": tokens, "layers": layers}


def _layer_label(row: int) -> str | int:
    return "embed" if row == 0 else row - 1


def _shade(prob: float) -> str:
    """A background from dark to bright blue as the probability grows."""
    level = int(40 + 180 * prob)
    return f"white on rgb({level // 4},{level // 2},{level})"


def _terminal_console():
    """A rich Console on a buffer: written at the end, so a reader that left (`| head`) raises
    BrokenPipeError for the error boundary; not cut to a terminal's width in a file or pipe."""
    from rich.console import Console

    terminal = sys.stdout.isatty()
    buffer = io.StringIO()
    width = shutil.get_terminal_size().columns if terminal else 10_000
    return Console(file=buffer, highlight=False, force_terminal=terminal, width=width), buffer


def _print_lens(found, tok, tokens: list[str], position: int) -> None:
    from rich.table import Table

    out, buffer = _terminal_console()
    title = f"logit lens at position {position} ({tokens[position]!r}): top {found.ids.shape[-1]}"
    table = Table(title=title)
    table.add_column("layer", justify="right")
    for k in range(found.ids.shape[-1]):
        table.add_column(f"#{k + 1}")
    for row in range(len(found.names)):
        cells = [
            (f"{tok.decode([int(i)])!r} {float(p):.3g}", _shade(float(p)))
            for i, p in zip(found.ids[row, 0, position], found.probs[row, 0, position], strict=True)
        ]
        table.add_row(str(_layer_label(row)), *(_cell(text, style) for text, style in cells))
    out.print(table)
    sys.stdout.write(buffer.getvalue())


def _cell(text: str, style: str):
    from rich.text import Text

    return Text(text, style=style)


def _print_pattern(pattern, tokens: list[str], title: str) -> None:
    from rich.table import Table

    out, buffer = _terminal_console()
    table = Table(title=title + " (rows: queries, columns: keys)")
    table.add_column("")
    for t, token in enumerate(tokens):
        table.add_column(f"{t} {token!r}", justify="right")
    for t, token in enumerate(tokens):
        cells = [
            _cell(f"{float(p):.2f}", _shade(float(p))) if u <= t else ""
            for u, p in enumerate(pattern[t])
        ]
        table.add_row(f"{t} {token!r}", *cells)
    out.print(table)
    sys.stdout.write(buffer.getvalue())
