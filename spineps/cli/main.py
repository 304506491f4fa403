"""``main(argv) -> int``: parse, build the settings, set up logging, dispatch to the
participant or group level, and turn typed errors into exit codes with a one-line message
(tracebacks only with ``-vv``). The only place that knows about exit codes.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

from spineps.cli.parser import TOOL_MODULES, build_parser, build_subcommand_parser, is_subcommand
from spineps.errors import OutputError, SpinepsError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from spineps.settings import Settings

__all__ = ["main", "entry_point", "Terminated", "EXIT_INTERRUPTED", "EXIT_TERMINATED"]

log = logging.getLogger("spineps.cli")

EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM (e.g. a scheduler's
    time limit), so it unwinds like Ctrl-C: temporary files are removed on the way out."""


def _on_sigterm(signum: int, frame: Optional[FrameType]) -> None:
    raise Terminated()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _say(message: str) -> None:
    """One line on stderr before logging is set up."""
    sys.stderr.write(f"spineps: error: {message}\n")
    sys.stderr.flush()


def _report(exc: BaseException, verbosity: int, logging_ready: bool) -> None:
    if isinstance(exc, SpinepsError):
        text = str(exc)
    else:
        text = f"unexpected error: {type(exc).__name__}: {exc}"
    if logging_ready:
        if verbosity >= 2:
            log.error("%s", text, exc_info=exc)
        else:
            log.error("%s", text)  # stderr stays one line; the traceback goes to the log file
            _log_traceback_to_file(exc)
    else:
        _say(text)
        if verbosity >= 2:
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)


def _log_traceback_to_file(exc: BaseException) -> None:
    """Put the traceback into the run's log file only (not on stderr)."""
    from spineps.logging_setup import file_handlers

    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    record = log.makeRecord(log.name, logging.DEBUG, __file__, 0, "traceback:\n%s", (tb,), None)
    for h in file_handlers():
        h.handle(record)


def _verbosity_guess(argv: Sequence[str]) -> int:
    """-v count from raw argv (for messages about errors that happen while parsing)."""
    n = 0
    for a in argv:
        if a == "--verbose":
            n += 1
        elif a.startswith("-") and not a.startswith("--") and set(a[1:]) == {"v"}:
            n += len(a) - 1
    return n


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbosity = _verbosity_guess(argv)
    try:
        from spineps.settings import Settings

        if argv and argv[0] == "instance":  # a participant run on semantic masks: same logging, logs, exit codes
            ns = build_subcommand_parser().parse_args(argv)
            verbosity = int(ns.verbose or 0)
            settings = Settings.from_instance_args(ns)
        elif is_subcommand(argv):
            return _run_subcommand(argv)
        else:
            ns = build_parser().parse_args(argv)
            verbosity = int(ns.verbose or 0)
            settings = Settings.from_args(ns)
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except SpinepsError as exc:
        _report(exc, verbosity, logging_ready=False)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return _run(settings)


def _run(settings: Settings) -> int:
    from spineps.fsutil import check_real_folder, write_text_atomic
    from spineps.logging_setup import setup_logging, teardown_logging

    try:
        try:
            check_real_folder(settings.logs_dir / "locks", settings.output_dir)  # never through a planted link
            settings.logs_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the output folder ({exc.strerror or exc})",
                              Path(exc.filename) if exc.filename else settings.logs_dir) from exc
    except SpinepsError as exc:
        _report(exc, settings.verbosity, logging_ready=False)
        return exc.exit_code

    try:
        setup_logging(settings.verbosity, settings.log_file)
    except OSError as exc:
        _say(f"{settings.log_file}: cannot create the log file ({exc.strerror or exc})")
        return OutputError.exit_code
    try:
        with _sigterm_as_interrupt():
            try:
                if settings.input_kind == "semantic-mask":
                    log.info("spineps %s, instance phase on semantic masks, run %s", settings.version, settings.run_id)
                    log.info("masks_dir=%s (%s) output_dir=%s", settings.bids_dir, settings.mask_pattern,
                             settings.output_dir)
                else:
                    log.info("spineps %s, %s level, run %s", settings.version, settings.analysis_level,
                             settings.run_id)
                    log.info("bids_dir=%s output_dir=%s", settings.bids_dir, settings.output_dir)
                log.info("log file: %s", settings.log_file)
                write_text_atomic(settings.settings_file, settings.to_json())
                if settings.analysis_level == "participant":
                    _participant(settings)
                else:
                    _group(settings)
                log.info("done")
                return 0
            except Terminated:
                log.error("terminated (SIGTERM); see the log for what finished: %s", settings.log_file)
                return EXIT_TERMINATED
            except KeyboardInterrupt:
                log.error("interrupted; see the log for what finished: %s", settings.log_file)
                return EXIT_INTERRUPTED
            except SpinepsError as exc:
                _report(exc, settings.verbosity, logging_ready=True)
                return exc.exit_code
            except Exception as exc:  # a bug: one line, traceback in the log (and on stderr with -vv)
                _report(exc, settings.verbosity, logging_ready=True)
                return 1
    except Terminated:  # arrived between the inner handlers and the restore
        return EXIT_TERMINATED
    finally:
        teardown_logging()


def _participant(settings: Settings) -> None:
    """The BIDS validator runs in the background (a process of its own) while the scans are
    selected and the models load; its verdict is awaited before the first scan, and comes
    first when any of these steps fails (``participant.validated_first``). The first scan's
    N4 runs in a helper process beside the model loading (``participant.start_n4_prefetch``)."""
    from spineps import loading, participant

    loading.announce_models(settings)  # before anything else: which models, and whether they are demonstrations
    pending = participant.start_validation(settings)
    discovery = participant.validated_first(settings, pending, lambda: participant.select_scans(settings))
    if settings.input_kind == "semantic-mask":
        participant.run_participant(settings, None, loading.load_instance_segmenter(settings), discovery=discovery)
        return
    # the first scan's N4 runs in a helper process while the models load (its result is used
    # only for exactly the voxels it corrected)
    prefetch = participant.start_n4_prefetch(settings, discovery)
    try:
        semantic, instance = participant.validated_first(settings, pending,
                                                         lambda: loading.load_segmenters(settings))
        if prefetch is not None and hasattr(semantic, "prefetched_n4"):
            semantic.prefetched_n4.append(prefetch)
        if settings.skip_bids_validation:
            log.info("BIDS validation skipped (--skip-bids-validation)")
        else:
            participant.finish_validation(settings, pending)
        participant.run_participant(settings, semantic, instance, discovery=discovery)
    finally:
        if prefetch is not None:
            prefetch.cancel()  # not used (complete, held by another run, failed): stopped, removed


def _group(settings: Settings) -> None:
    from spineps.group.report import run_group

    run_group(settings)


def _run_subcommand(argv: list[str]) -> int:
    from spineps.logging_setup import setup_logging, teardown_logging

    ns = build_subcommand_parser().parse_args(argv)
    setup_logging(int(getattr(ns, "verbose", 0) or 0), None)
    try:
        if ns.command == "demo":
            try:
                from spineps.synth.demo import write_demo_dataset
            except ImportError as exc:
                raise UsageError(f"the demo dataset writer is not available in this installation ({exc})") from exc
            out = write_demo_dataset(ns.out_dir, n_subjects=ns.subjects, seed=ns.seed)
            log.info("demo dataset written to %s", out)
            log.info("next: spineps %s %s participant", out, out / "derivatives" / "spineps")
            return 0
        if ns.command in TOOL_MODULES:
            import importlib

            module, _adder, runner, _kwargs, _help = TOOL_MODULES[ns.command]
            return int(getattr(importlib.import_module(module), runner)(ns))
        raise UsageError(f"unknown command {ns.command!r}")  # pragma: no cover - argparse rejects it first
    finally:
        teardown_logging()


def entry_point() -> None:
    """The ``spineps`` console script."""
    sys.exit(main())
