"""The command line: ``spineps.cli.parser.build_parser`` (pure, no side effects) and
``spineps.cli.main.main(argv) -> int`` (the only place that maps errors to exit codes)."""
