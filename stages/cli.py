"""The `distill` command line. Each subcommand is a plain function in a stage module.

Known failures (`pipeline.errors.DistillError`: bad settings, bad data, a cache that cannot be
used) print one clear `error:` message to stderr and exit 2; tracebacks are kept for real bugs.
"""

from __future__ import annotations

import sys

import typer

from pipeline.errors import DistillError
from stages import cache as cache_commands
from stages import onpolicy as stage3
from stages import share
from stages import student as stage2
from stages import teacher_cache as stage1

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Offline LLM distillation: a teacher cache once, students from it.")
app.command("teacher-cache")(stage1.teacher_cache)
app.command("inspect")(cache_commands.inspect)
app.command("verify")(cache_commands.verify)
app.command("export")(cache_commands.export)
app.command("import")(cache_commands.import_cache)
app.command("convert-teacher")(stage1.convert_teacher)
app.command("student")(stage2.student)
app.command("generate")(stage3.generate)
app.command("onpolicy")(stage3.onpolicy)
app.command("redistill")(stage3.redistill)
app.command("push")(share.push)
app.command("pull")(share.pull)
app.command("ls")(share.ls)


def _rank_prefix() -> str:
    import os

    return f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def _teardown() -> None:
    if "torch.distributed" in sys.modules:  # joined by a stage run under torchrun
        from pipeline import distributed

        distributed.teardown()


def main() -> None:
    try:
        rc = app(standalone_mode=False)  # click returns typer.Exit's code here instead of raising
        _teardown()
        sys.exit(rc if isinstance(rc, int) else 0)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except DistillError as e:
        print(f"{_rank_prefix()}error: {e}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # click's usage errors carry their own exit code
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
