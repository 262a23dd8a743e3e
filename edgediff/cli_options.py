"""What the `edgediff` commands share: click option types and callbacks built from the catalogues, and the
one-line error handling (the library's user errors and click's usage errors alike become `error: ...` on stderr
with exit code 2)."""

from __future__ import annotations

import errno
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from . import __version__
from .runtime.backends import BACKENDS

USAGE_ERROR = 2


def user_errors() -> tuple[type[Exception], ...]:
    from .bundle import BundleError
    from .runtime.images import ImageInputError, OutputError
    from .runtime.plan import RenderError
    from .runtime.sessions import FeedError

    return BundleError, RenderError, ImageInputError, FeedError, OutputError


@contextmanager
def one_line_errors(*extra: type[Exception]):
    """Turn the library's user-facing errors into `error: …` and exit code 2, and a full disk into one line and
    exit code 1 (what was being written is removed by the atomic writes); anything else is a bug and keeps its
    traceback."""
    try:
        yield
    except (*user_errors(), *extra) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(USAGE_ERROR)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        click.echo(f"error: no space left on the device{where}; free some space or write to another disk",
                   err=True)
        sys.exit(1)


class Named(click.Choice):
    """A name from one of the catalogues; an unknown one is refused with the kind and every choice."""

    def __init__(self, kind: str, names):
        super().__init__(list(names))
        self.kind = kind

    def convert(self, value, param, ctx):
        if value in self.choices:
            return value
        self.fail(f"unknown {self.kind} {value!r}; choose one of {', '.join(self.choices)}", param, ctx)


def described(catalogue: dict[str, str]) -> str:
    return "; ".join(f"{name}: {text}" for name, text in catalogue.items())


class UsageLine(click.ClickException):
    """A usage error shown as the one `error:` line every other bad input gets, not click's usage block."""

    exit_code = USAGE_ERROR

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


def usage_line(e: click.UsageError, where: str) -> UsageLine:
    message = " ".join(e.format_message().split())  # "did you mean" and wrapped messages come on several lines
    if not isinstance(e, click.BadParameter):  # an unknown option or command: say where the right ones are listed
        command = e.ctx.command_path if e.ctx is not None else where
        message = f"{message.rstrip('.')} (see {command} --help)"
    return UsageLine(message)


class Commands(click.Group):
    """Every usage error of every command (a missing argument, an unknown option or command, a bad value) becomes
    one `error:` line and exit code 2. `edgediff` alone still prints its help."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            raise usage_line(e, info_name or "edgediff") from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            raise usage_line(e, ctx.command_path) from None


def parse_size(ctx, param, value):
    if value is None:
        return None
    try:
        w, h = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not WIDTHxHEIGHT, e.g. 512x512") from None
    return w, h


def int_list(ctx, param, value):
    try:
        values = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 1,4") from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"{value!r}: give positive integers, e.g. 1,4")
    return values


def backend_list(ctx, param, value):
    names = list(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise click.BadParameter(f"unknown backend {', '.join(unknown) or repr(value)}; choose from "
                                 f"{', '.join(BACKENDS)}")
    return names


def png_parameters(prompt, negative, plan, bundle) -> str:
    """The PNG's `parameters` chunk, in the layout the popular UIs write and read. The prompts come with control
    characters escaped (printable): a raw newline would start a line the readers take for a field."""
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    optional = (("Denoising strength", plan.strength), ("Eta", plan.eta), ("True CFG scale", plan.true_cfg_scale))
    extra = "".join(f", {name}: {value:g}" for name, value in optional if value is not None)
    lines.append(
        f"Steps: {plan.steps}, Sampler: {plan.sampler}, Schedule: {plan.schedule}, CFG scale: {plan.guidance_scale:g}, "
        f"Seed: {plan.seed}, Size: {plan.width}x{plan.height}{extra}, "
        f"Model: {Path(bundle).name}, Engine: edgediff {__version__}"
    )
    return "\n".join(lines)


class LoraArg(click.ParamType):
    """FILE[:SCALE]: a LoRA and the scale it runs at (1 when not given), as (path, scale)."""

    name = "FILE[:SCALE]"

    def convert(self, value, param, ctx):
        from .lora_format import as_spec

        return value if isinstance(value, tuple) else as_spec(value)


def lora_option(help_text: str):
    """`--lora FILE[:SCALE]`, repeatable, into the command's `loras` as (path, scale) pairs in order."""
    return click.option("--lora", "loras", multiple=True, type=LoraArg(), metavar="FILE[:SCALE]", help=help_text)
