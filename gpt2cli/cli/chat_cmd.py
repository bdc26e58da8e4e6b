"""`gpt2 chat`: an interactive REPL over a ChatSession; with piped stdin, a scriptable filter.

On a terminal: readline editing and history, a banner on stderr, replies streamed to stdout,
slash commands. Ctrl-C during a reply stops it (the partial reply stays in the history);
Ctrl-C on an empty prompt or Ctrl-D ends the chat with exit code 0.

Not on a terminal: every input line is a user turn (or a slash command) and every reply is
written to stdout followed by an empty line (or as one JSON object per line with --json);
nothing else goes to stdout.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import typer

from gpt2cli.cli.console import debugging, err, error_line, print_error
from gpt2cli.cli.interrupts import StopRequest
from gpt2cli.cli.options import (
    DEFAULT_MODEL,
    Dtype,
    JsonOutput,
    MaxNewTokens,
    MinP,
    ModelRef,
    RepetitionPenalty,
    Seed,
    Steer,
    SteerLayer,
    SteerScale,
    Stop,
    Temperature,
    TokenizerRef,
    TopK,
    TopP,
    check_steer_flags,
    steering,
)
from gpt2cli.cli.text import check as check_utf8
from gpt2cli.cli.text import decode
from gpt2cli.errors import UserError

PROMPT = ">>> "
DEFAULT_NEW_TOKENS = 100

HELP = """\
/help              this list
/reset             forget the conversation (the preamble stays)
/system [TEXT]     show or replace the preamble
/set [NAME VALUE]  show settings, or change one: temperature, top_k, top_p, min_p,
                   repetition_penalty, seed, max_new_tokens
/save FILE [--force]  write the transcript: FILE.json as JSON, anything else as Markdown
/stats             speed of the last reply and tokens in the context
/quit              end the chat (also Ctrl-D, or Ctrl-C on an empty prompt)"""

# /set names and how to parse their values; the sampling ones go to SamplingParams.
SETTINGS = {
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "min_p": float,
    "repetition_penalty": float,
    "seed": int,
    "max_new_tokens": int,
}


class Repl:
    """Reads lines, runs commands, streams replies. `interactive` means stdin is a terminal."""

    def __init__(self, session, *, interactive: bool, json_lines: bool, banner: str = ""):
        self.session = session
        self.interactive = interactive
        self.json_lines = json_lines
        self.banner = banner
        self.lines_read = 0

    def run(self) -> None:
        if self.interactive:
            import readline  # noqa: F401 - importing it gives input() line editing and history

            err.print(self.banner)
        while True:
            try:
                line = self._read()
                if line is None:
                    return
                line = line.strip()
                if not line:
                    continue
                if line.startswith("/"):
                    if self.command(line) == "quit":
                        return
                else:
                    self.reply(line)
            except BrokenPipeError:
                raise
            except Exception as exc:  # noqa: BLE001 - one line, and the chat goes on
                if debugging():
                    raise
                print_error(error_line(exc, "chat"))

    def _read(self) -> str | None:
        """The next line, or None at the end (Ctrl-D, end of input, Ctrl-C on an empty line).
        A line that is not UTF-8 raises UserError (the loop says so and reads the next)."""
        if not self.interactive:
            data = sys.stdin.buffer.readline()
            if not data:
                return None
            self.lines_read += 1
            return decode(data, f"line {self.lines_read} of stdin", "; skipped")
        while True:
            try:
                return check_utf8(input(PROMPT), "the line", "; skipped")
            except EOFError:
                sys.stdout.write("\n")
                return None
            except UnicodeDecodeError:
                raise UserError("the line is not UTF-8 text; skipped") from None
            except KeyboardInterrupt:
                import readline

                typed = readline.get_line_buffer()
                sys.stdout.write("\n")
                if not typed:
                    return None

    # ---- replies ----------------------------------------------------------------------

    def reply(self, message: str) -> None:
        out = sys.stdout
        with StopRequest() as interrupt:
            stream = self.session.send(message)
            try:
                for piece in stream:
                    if not self.json_lines:
                        out.write(piece)
                        out.flush()
                    if interrupt.hit:
                        break
            finally:
                stream.close()
        turn = self.session.turns[-1]
        if self.json_lines:
            stats = self.session.last
            record = {
                "user": turn.user,
                "reply": turn.reply,
                "finish_reason": turn.finish_reason,
                "generated_tokens": stats.generated_tokens,
                "context_tokens": self.session.context_tokens,
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            out.write("\n" if self.interactive else "\n\n")
        out.flush()
        if interrupt.hit:
            err.print("[dim](reply interrupted; it stays in the history)[/]")

    # ---- slash commands ---------------------------------------------------------------

    def command(self, line: str) -> str | None:
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        handler = getattr(self, f"_cmd_{name.lower()}", None)
        if handler is None:
            err.print(f"unknown command /{name}; the commands are:\n{HELP}", markup=False)
            return None
        return handler(arg)

    def _cmd_help(self, arg: str) -> None:
        err.print(HELP, markup=False)

    def _cmd_quit(self, arg: str) -> str:
        return "quit"

    _cmd_exit = _cmd_quit

    def _cmd_reset(self, arg: str) -> None:
        self.session.reset()
        err.print("history cleared")

    def _cmd_system(self, arg: str) -> None:
        if arg:
            self.session.set_system(arg)
            err.print("preamble replaced")
        else:
            err.print(self.session.system, markup=False)

    def _cmd_set(self, arg: str) -> None:
        if not arg:
            err.print(settings_line(self.session), markup=False)
            return
        name, _, value = arg.partition(" ")
        name = name.replace("-", "_").lower()
        value = value.strip()
        if name not in SETTINGS or not value:
            raise UserError(f"usage: /set NAME VALUE with NAME one of {', '.join(SETTINGS)}")
        try:
            parsed = SETTINGS[name](value)
        except ValueError:
            kind = "a whole number" if SETTINGS[name] is int else "a number"
            raise UserError(f"/set {name}: {value!r} is not {kind}") from None
        if isinstance(parsed, float) and not math.isfinite(parsed):
            raise UserError(f"/set {name}: {value!r} is not a finite number")
        if name == "max_new_tokens":
            self.session.set_max_new_tokens(parsed)
        else:
            self.session.set_sampling(**{name: parsed})
        err.print(f"{name} = {parsed}")

    def _cmd_save(self, arg: str) -> None:
        force = arg == "--force" or arg.endswith(" --force")
        name = arg.removesuffix("--force").strip()
        if not name:
            raise UserError("usage: /save FILE [--force] (FILE.json for JSON, else Markdown)")
        path = save_transcript(self.session, Path(name).expanduser(), force=force)
        turns = len(self.session.turns)
        err.print(f"saved {turns} turn{'' if turns == 1 else 's'} to {path}", markup=False)

    def _cmd_stats(self, arg: str) -> None:
        s = self.session
        window = f"{s.context_tokens} of {s.n_positions} tokens in the context"
        if s.last is None:
            err.print(f"no reply yet; {window}")
            return
        last = s.last
        err.print(
            f"last reply: {last.generated_tokens} tokens in {last.total_s:.2f} s "
            f"({last.tokens_per_s:.1f} tokens/s), first token after {last.first_token_s * 1000:.0f} ms, "
            f"{last.prefilled_tokens} of {last.prompt_tokens} prompt tokens prefilled; {window}"
        )


def save_transcript(session, path: Path, *, force: bool) -> Path:
    """Write the transcript atomically (JSON for .json, else Markdown); never overwrite silently."""
    from gpt2cli.atomic import write_text

    if path.is_dir():
        raise UserError(f"{path} is a folder: give a file name such as {path / 'chat.md'}")
    if path.exists() and not force:
        raise UserError(f"{path} exists: choose another name or add --force to overwrite it")
    text = session.to_json() if path.suffix.lower() == ".json" else session.to_markdown()
    write_text(path, text)
    return path


def settings_line(session) -> str:
    sampling = ", ".join(f"{k}={v}" for k, v in vars(session.sampling).items())
    return f"{sampling}, max_new_tokens={session.max_new_tokens}"


def chat(
    model: ModelRef = DEFAULT_MODEL,
    tokenizer: TokenizerRef = None,
    dtype: Dtype = "float32",
    system: Annotated[
        str | None, typer.Option("--system", help="The preamble the chat starts with.")
    ] = None,
    template: Annotated[
        str,
        typer.Option(
            "--template",
            help="Transcript format: 'chat' (User:/Assistant: lines, the default) or 'qa' (Q:/A:).",
        ),
    ] = "chat",
    max_new_tokens: MaxNewTokens = None,
    temperature: Temperature = 0.7,
    top_k: TopK = 0,
    top_p: TopP = 0.9,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.1,
    seed: Seed = 0,
    stop: Stop = None,
    json_output: JsonOutput = False,
    steer: Steer = None,
    steer_layer: SteerLayer = None,
    steer_scale: SteerScale = None,
) -> None:
    """Chat with a model: streamed replies, slash commands (/help), Ctrl-D to quit.

    With stdin not a terminal, every line is a message (or a slash command) and every reply
    is printed followed by an empty line (or as one JSON object per line with --json).

    Examples:

    \b
      gpt2 chat -m shakespeare
      gpt2 chat -m gpt2.npz --system "A helpful assistant." --temperature 0
      printf 'Hello\\nHow are you?\\n' | gpt2 chat -m shakespeare --json
    """
    if system is not None:
        check_utf8(system, "--system")
    check_steer_flags(steer, steer_layer, steer_scale)
    from gpt2cli import chat as chat_core
    from gpt2cli import compile_cache
    from gpt2cli.generate import Engine, SamplingParams
    from gpt2cli.hub import load_model, load_tokenizer
    from gpt2cli.progress import hub_progress_class
    from gpt2cli.training import memory

    chosen = chat_core.template(template)
    sampling = SamplingParams(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    compile_cache.enable()
    interactive = sys.stdin.isatty()
    with err.status("loading the model", spinner="dots") if interactive else nullcontext():
        config, params = load_model(model, finite=True, tqdm_class=hub_progress_class())
        tok = load_tokenizer(tokenizer, model, tqdm_class=hub_progress_class())
        window = config.n_positions
        need = memory.generation_footprint(
            config, rows=1, length=window, prompt=window, compute_bytes=memory.compute_bytes(dtype)
        )
        memory.check_fits(need, f"a chat over the model's {window}-token window", "--dtype")
        steers = steering(config, steer, steer_layer, steer_scale)
        engine = Engine(config, params, dtype=dtype, steering=steers)
    session = chat_core.ChatSession(
        engine,
        tok,
        template=chosen,
        system=system,
        sampling=sampling,
        max_new_tokens=max_new_tokens or min(DEFAULT_NEW_TOKENS, config.n_positions // 4),
        stops=tuple(stop or ()),
    )
    banner = (
        f"[bold]gpt2 chat[/] · {model} · {dtype} · template {chosen.name} · "
        f"window {config.n_positions} tokens\n[dim]{settings_line(session)}\n"
        "/help for commands, Ctrl-D or /quit to leave[/]"
    )
    Repl(session, interactive=interactive, json_lines=json_output, banner=banner).run()
